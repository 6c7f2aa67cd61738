"""`write_report`: every table, plot and file of one report, each file named before any is written
and none overwritten that `stab report` did not write (out/.stab-report.json, one report at a
time per folder: out/.stab-report.lock).

    report = write_report(Path("runs"))   # report.md, report.html, runs.csv, factors.csv, plots/
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stability.progress import phase
from stability.record import verdicts as vd
from stability.report.answer import answer, configurations
from stability.report.factors import (
    factors,
    labels,
    repeats_text,
    replicates,
    sort_runs,
)
from stability.report.grouped import plot_grouped
from stability.report.html import html_report
from stability.report.loading import (
    ReportError,
    Run,
    is_valid_run,
    load_runs,
)
from stability.report.markdown import (
    PLOTS,
    _markdown,
    write_csv,
)
from stability.report.plots import _slug, plot_curves, plot_grad_norms, plot_heatmap
from stability.report.result import Report
from stability.report.stepplots import (
    departure_frame,
    departure_table,
    plot_departure,
    plot_steps,
)
from stability.report.steps import StepSeries, load_steps
from stability.report.tables import (
    factor_summary,
    lr_summary,
    overview,
    runs_frame,
)
from stability.rundirs import LeaseBusy, RunLease
from stability.storage import atomic_write_text

log = logging.getLogger("stab.report")


def build_report(root: Path) -> tuple[list[Run], list[str]]:
    """Every run under `root`, sorted by the factors that vary between them, and those factors (override keys)."""
    runs = load_runs(root)
    keys = factors(runs)
    return sort_runs(runs, keys), keys


def write_report(root: Path, out: Path | None = None) -> Report:
    """Load every run under `root`; write report.md, report.html, runs.csv, factors.csv (configs.csv,
    lr_sensitivity.csv) and plots/ into `out` (default `root`).

    Raises ReportError, before anything is written, when `root` holds no valid run or when a file
    the report would write is not one `stab report` wrote (`check_ours`); a plot left from an
    earlier report that this one does not draw is removed only if that report wrote it. OSError
    (a full disk) propagates from the first file that cannot be written."""
    root = Path(root)
    out = Path(out) if out is not None else root
    runs, keys = build_report(root)
    _require_a_valid_run(root, runs)
    report, plan = _analyse(root, out, runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    with one_report_at_a_time(out):  # what is checked below stays true while this report writes
        ours = check_ours(out, [*plan.tables, *plan.drawn])
        _remember(out, [out / rel for rel in sorted(ours)], writing=True)
        plotted = _draw_plots(report, plan)
        for stale in _optional_files(out):  # not written this time: removed only if a report wrote it
            if stale not in plan.tables and stale not in plan.drawn and stale.relative_to(out).as_posix() in ours:
                stale.unlink(missing_ok=True)
        tables = _write_tables(report, plan.names)
        report.files = [*tables, *plotted]
        _remember(out, report.files)
    return report


@dataclass
class _Plan:
    """What one report draws and writes: every path named before any file is written, so that
    `check_ours` can refuse a user's file first."""

    names: dict[str, str]  # run.rel -> short label (`labels`)
    series: dict[str, StepSeries]  # run.rel -> its per-step records
    mapped: list[Run]  # unstable runs with a gradient table: a heatmap each
    stepped: list[Run]  # runs with recorded steps: a per-step plot each
    spread: dict[str, float]  # factor -> spread of the unstable share between its values
    dep_rows: list[dict[str, Any]]  # `departure_table`: which group left its band first, per run
    heat_paths: dict[str, Path]  # run.rel -> its heatmap PNG
    step_paths: dict[str, Path]  # run.rel -> its per-step PNG
    draw_grouped: bool  # 2+ runs with steps: plots/grouped.png
    draw_departure: bool  # an unstable run's group left its band: plots/departure.png
    tables: list[Path]  # report.md, report.html and the CSV files
    drawn: list[Path]  # every PNG


def _require_a_valid_run(root: Path, runs: Sequence[Run]) -> None:
    """Raises ReportError naming the first few runs (and why each is not valid) when none under
    `root` is a run stab wrote."""
    if not any(is_valid_run(r) for r in runs):
        shown = ", ".join(f"{r.rel} ({'; '.join(r.warnings[:1]) or 'nothing stab wrote'})" for r in runs[:3])
        raise ReportError(
            f"{root}: no valid run in it ({shown}{', ...' if len(runs) > 3 else ''}); a run folder "
            f"holds status.json with a state, summary.json with a verdict or a stab config.yaml"
        )


def _analyse(root: Path, out: Path, runs: list[Run], keys: list[str]) -> tuple[Report, _Plan]:
    """Every table of the report (nothing written yet) and the plan of its files; the Report's
    files, plots and heatmaps are filled in as they are written."""
    # the statistics count each configuration-and-seed once; the runs table lists every folder
    counted, repeats = replicates(runs, keys)
    over = overview(runs, keys)
    table = runs_frame(runs, keys)
    summary = factor_summary(counted, keys)
    names = labels(runs, keys)
    mapped = [r for r in runs if vd.is_unstable(r.verdict) and r.grad_table is not None and not r.grad_table.empty]
    series: dict[str, StepSeries] = {r.rel: load_steps(r) for r in runs}
    stepped = [r for r in runs if len(series[r.rel])]
    ans, sentence = answer(counted, keys)
    if repeats:
        sentence += " " + repeats_text(repeats)
    spread = (
        {k: float(g["unstable_share"].max() - g["unstable_share"].min()) for k, g in ans.groupby("factor")}
        if not ans.empty
        else {}
    )
    dep_rows = departure_table(stepped, series)
    departures = departure_frame(dep_rows) if dep_rows else None
    lr_table = lr_summary(counted, keys)
    configs = configurations(counted, keys)
    report = Report(
        root=root,
        out=out,
        runs=runs,
        keys=keys,
        overview=over,
        table=table,
        summary=summary,
        files=[],
        heatmaps={},
        lr_table=lr_table,
        answer=ans,
        sentence=sentence,
        departures=departures,
        configs=configs,
    )
    return report, _plan_files(report, names, series, mapped, stepped, spread, dep_rows)


def _plan_files(
    report: Report,
    names: dict[str, str],
    series: dict[str, StepSeries],
    mapped: list[Run],
    stepped: list[Run],
    spread: dict[str, float],
    dep_rows: list[dict[str, Any]],
) -> _Plan:
    """Name every file the report will write (plots get unique slugs of their run folders)."""
    out, plots = report.out, report.out / PLOTS
    used: set[str] = set()
    heat_paths = {r.rel: plots / f"{_unique(_slug(f'heatmap_{r.rel}'), used)}.png" for r in mapped}
    step_paths = {r.rel: plots / "steps" / f"{_unique(_slug(f'steps_{r.rel}'), used)}.png" for r in stepped}
    draw_grouped = len(stepped) > 1
    draw_departure = bool(dep_rows) and any(r["unstable"] for r in dep_rows)
    tables = [out / "report.md", out / "report.html", out / "runs.csv", out / "factors.csv"]
    tables += [out / "configs.csv"] if report.configs is not None and not report.configs.empty else []
    tables += [out / "lr_sensitivity.csv"] if report.lr_table is not None else []
    drawn = [plots / "curves.png", plots / "grad_norm.png", *heat_paths.values(), *step_paths.values()]
    drawn += [plots / "grouped.png"] if draw_grouped else []
    drawn += [plots / "departure.png"] if draw_departure else []
    return _Plan(
        names,
        series,
        mapped,
        stepped,
        spread,
        dep_rows,
        heat_paths,
        step_paths,
        draw_grouped,
        draw_departure,
        tables,
        drawn,
    )


def _draw_plots(report: Report, plan: _Plan) -> list[Path]:
    """Draw every PNG of the plan (a progress phase), recording the heatmaps, per-step, grouped
    and departure plots in `report`; the PNGs in the order report.files lists them."""
    plots, runs, names = report.out / PLOTS, report.runs, plan.names
    plots.mkdir(parents=True, exist_ok=True)
    with phase("drawing plots", total=len(plan.drawn), unit="plots") as p:
        files = [plot_curves(runs, names, plots / "curves.png")]
        p.advance()
        files.append(plot_grad_norms(runs, names, plots / "grad_norm.png"))
        p.advance()
        for r in plan.mapped:
            report.heatmaps[r.rel] = plot_heatmap(r, names[r.rel], plan.heat_paths[r.rel])
            p.advance()
        for r in plan.stepped:
            report.step_plots[r.rel] = plot_steps(r, plan.series[r.rel], names[r.rel], plan.step_paths[r.rel]).path
            p.advance()
        if plan.draw_grouped:
            report.grouped = plot_grouped(plan.stepped, plan.series, report.keys, plots / "grouped.png", plan.spread)
            files.append(report.grouped.path)
            p.advance()
        if plan.draw_departure:
            report.departure = plot_departure(plan.dep_rows, plots / "departure.png")
            files.append(report.departure.path)
            p.advance()
    return [*files, *report.heatmaps.values(), *report.step_plots.values()]


def _write_tables(report: Report, names: dict[str, str]) -> list[Path]:
    """Write runs.csv, factors.csv (configs.csv, lr_sensitivity.csv when they have rows), then
    report.md and report.html; the files in the order report.files lists them."""
    out = report.out
    write_csv(report.table, out / "runs.csv")
    write_csv(report.summary, out / "factors.csv")
    extra = []
    if report.configs is not None and not report.configs.empty:
        write_csv(report.configs, out / "configs.csv")
        extra.append(out / "configs.csv")
    if report.lr_table is not None:
        write_csv(report.lr_table, out / "lr_sensitivity.csv")
        extra.append(out / "lr_sensitivity.csv")
    atomic_write_text(out / "report.md", _markdown(report, names))
    atomic_write_text(out / "report.html", html_report(report, names))
    return [out / "report.md", out / "report.html", out / "runs.csv", out / "factors.csv", *extra]


MANIFEST = ".stab-report.json"  # in the report's folder: the files `stab report` wrote there, with their sha256
LOCK = ".stab-report.lock"  # in the report's folder: held by the one `stab report` writing there


@contextmanager
def one_report_at_a_time(out: Path) -> Iterator[None]:
    """Hold out/.stab-report.lock (an flock, `stability.rundirs.RunLease`) while a report checks
    and writes its files, so that a second report into the same folder (two shells, a sweep's own
    report) cannot interleave with it and leave the manifest out of step with a file (the next
    report would then refuse that file as "changed since"). A second report waits for the first
    to end, saying so in one warning on the `stab.report` logger."""
    lease = RunLease(out, LOCK, purpose="stab report")
    try:
        lease.acquire()
    except LeaseBusy as e:
        since = e.holder.get("started")
        when = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        log.warning(
            f"{out}: another stab report (pid {e.holder.get('pid', '?')} on {e.holder.get('host', '?')}, "
            f"since {when}) is writing there; waiting for it to end"
        )
        lease.acquire(wait=True)
    try:
        yield
    finally:
        lease.release()


def _unique(name: str, used: set[str]) -> str:
    while name in used:
        name += "_"
    used.add(name)
    return name


def _optional_files(out: Path) -> list[Path]:
    """The files an earlier report may have written in `out` that this one may not write again
    (plots of runs since removed or now stable, the tables of a factor no longer swept)."""
    plots = out / PLOTS
    fixed = [out / "configs.csv", out / "lr_sensitivity.csv", plots / "grouped.png", plots / "departure.png"]
    return [p for p in fixed if p.is_file()] + sorted(plots.glob("heatmap_*.png")) + sorted(plots.glob("steps/*.png"))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_ours(out: Path, planned: list[Path]) -> set[str]:
    """The files under `out` (relative, posix) that an earlier `stab report` wrote and left as it
    wrote them: listed in out/.stab-report.json with the same content; a folder reported on before
    that list existed counts as ours when its report.md opens as stab's does; a report cut short
    (full disk, kill) left "writing", and its files are ours.

    Raises ReportError, before anything is written, naming the first of `planned` (the files this
    report will write) that exists and is not ours: the user's own report.md or plots/grouped.png."""
    out = Path(out)
    existing = {p.relative_to(out).as_posix(): p for p in [*planned, *_optional_files(out)] if p.is_file()}
    if not existing:
        return set()
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        known, writing = dict(manifest["files"]), bool(manifest.get("writing"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        known, writing = None, False
    if known is None:  # before the list: ours if report.md is stab's
        try:
            with open(out / "report.md", encoding="utf-8", errors="replace") as f:
                legacy = f.readline().startswith("# Stability report: ")
        except OSError:
            legacy = False
        ours = set(existing) if legacy else set()
    else:
        ours = {rel for rel, path in existing.items() if writing or known.get(rel) == _sha256(path)}
    for path in planned:
        rel = path.relative_to(out).as_posix()
        if rel in existing and rel not in ours:
            raise ReportError(
                f"{path} was not written by stab report (or was changed since): not overwriting it; "
                f"move it, or pass --out to another folder"
            )
    return ours


def _remember(out: Path, files: list[Path], writing: bool = False) -> None:
    """out/.stab-report.json: what this report wrote, so the next one knows what it may overwrite;
    `writing` marks a report under way (its files may be half new)."""
    listed = {p.relative_to(out).as_posix(): _sha256(p) for p in files if p.is_file()}
    atomic_write_text(out / MANIFEST, json.dumps({"files": listed, "writing": writing}, indent=1) + "\n")
