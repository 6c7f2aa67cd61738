"""Reports over run folders: find them, load them robustly, tabulate, summarise by factor, plot.

A package by job: `loading` (run folders into `Run`s), `factors` (what differs between runs),
`tables` (the overview, runs.csv, the answer, one run's tables), `plots` and `markdown`
(report.md and the CSV files). Everything reads the run folder's files and nothing else
(`stability.runformat`), so a report works on runs that are still going, were killed, crashed,
or have a damaged file. NaN and inf stay NaN and inf in every table, CSV cell and plot.

    report = write_report(Path("runs"), Path("runs"))   # report.md, runs.csv, factors.csv, plots/
    report.overview                                     # the printed table, as strings
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stability.progress import phase
from stability.report.factors import (
    ABSENT,
    ALIAS_PATHS,
    UNSET,
    _canonical,
    config_diff,
    factor_value,
    factors,
    labels,
    sort_runs,
)
from stability.report.loading import RUN_MARKERS, VERDICTS, ReportError, Run, _float, find_runs, load_run, load_runs
from stability.report.markdown import PLOTS, _markdown, csv_cell, diagnostic_warnings, markdown_table, write_csv
from stability.report.plots import _slug, plot_curves, plot_grad_norms, plot_heatmap
from stability.report.tables import (
    DECISIVE,
    UNSTABLE,
    answer,
    answer_display,
    epoch_frame,
    event_text,
    events_frame,
    factor_display,
    factor_summary,
    first_nan_text,
    grad_epoch_frame,
    is_run_folder,
    lr_display,
    lr_summary,
    overview,
    runs_frame,
    stage_frame,
)
from stability.storage import atomic_write_text

__all__ = [
    "ABSENT",
    "ALIAS_PATHS",
    "DECISIVE",
    "PLOTS",
    "RUN_MARKERS",
    "UNSET",
    "UNSTABLE",
    "VERDICTS",
    "Report",
    "ReportError",
    "Run",
    "_canonical",
    "_float",
    "answer",
    "answer_display",
    "build_report",
    "config_diff",
    "csv_cell",
    "diagnostic_warnings",
    "epoch_frame",
    "event_text",
    "events_frame",
    "factor_display",
    "factor_summary",
    "factor_value",
    "factors",
    "find_runs",
    "first_nan_text",
    "grad_epoch_frame",
    "is_run_folder",
    "labels",
    "load_run",
    "load_runs",
    "lr_display",
    "lr_summary",
    "markdown_table",
    "overview",
    "plot_curves",
    "plot_grad_norms",
    "plot_heatmap",
    "runs_frame",
    "sort_runs",
    "stage_frame",
    "write_csv",
    "write_report",
]


@dataclass
class Report:
    """What `write_report` computed and wrote."""

    root: Path
    out: Path
    runs: list[Run]
    keys: list[str]
    overview: pd.DataFrame
    table: pd.DataFrame  # runs.csv
    summary: pd.DataFrame  # factor_summary, numbers
    files: list[Path]
    heatmaps: dict[str, Path]  # run.rel -> PNG
    lr_table: pd.DataFrame | None = None  # LR sensitivity per configuration, when the LR was swept
    answer: pd.DataFrame | None = None  # unstable share per factor value (see `answer`)
    sentence: str = ""  # the report's one-sentence answer

    @property
    def warnings(self) -> list[tuple[str, str]]:
        return [(r.rel, w) for r in self.runs for w in r.warnings]


def build_report(root: Path) -> tuple[list[Run], list[str]]:
    runs = load_runs(root)
    keys = factors(runs)
    return sort_runs(runs, keys), keys


def write_report(root: Path, out: Path | None = None) -> Report:
    """Load every run under `root`; write report.md, runs.csv, factors.csv and plots/ into `out`."""
    root = Path(root)
    out = Path(out) if out is not None else root
    runs, keys = build_report(root)
    if not any(_valid(r) for r in runs):
        shown = ", ".join(f"{r.rel} ({'; '.join(r.warnings[:1]) or 'nothing stab wrote'})" for r in runs[:3])
        raise ReportError(f"{root}: no valid run in it ({shown}{', ...' if len(runs) > 3 else ''}); a run folder "
                          f"holds status.json with a state, summary.json with a verdict or a stab config.yaml")
    check_ours(out)
    out.mkdir(parents=True, exist_ok=True)
    _remember(out, [out / rel for rel in _OUTPUTS] + sorted((out / PLOTS).glob("heatmap_*.png")), writing=True)
    over = overview(runs, keys)
    table = runs_frame(runs, keys)
    summary = factor_summary(runs, keys)
    plots = out / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    names = labels(runs, keys)
    mapped = [r for r in runs if r.verdict in UNSTABLE and r.grad_table is not None and not r.grad_table.empty]
    heatmaps: dict[str, Path] = {}
    used: set[str] = set()
    with phase("drawing plots", total=2 + len(mapped), unit="plots") as p:
        files = [plot_curves(runs, names, plots / "curves.png")]
        p.advance()
        files.append(plot_grad_norms(runs, names, plots / "grad_norm.png"))
        p.advance()
        for r in mapped:
            name = _slug(f"heatmap_{r.rel}")
            while name in used:
                name += "_"
            used.add(name)
            heatmaps[r.rel] = plot_heatmap(r, names[r.rel], plots / f"{name}.png")
            p.advance()
    for stale in plots.glob("heatmap_*.png"):  # from an earlier report of runs since removed or now stable
        if stale not in heatmaps.values():
            stale.unlink(missing_ok=True)
    files += heatmaps.values()
    write_csv(table, out / "runs.csv")
    write_csv(summary, out / "factors.csv")
    lr_table = lr_summary(runs, keys)
    ans, sentence = answer(runs, keys)
    extra = []
    if lr_table is not None:
        write_csv(lr_table, out / "lr_sensitivity.csv")
        extra.append(out / "lr_sensitivity.csv")
    atomic_write_text(out / "report.md", _markdown(root, out, runs, keys, names, over, summary, heatmaps, lr_table,
                                                   ans, sentence))
    files = [out / "report.md", out / "runs.csv", out / "factors.csv", *extra, *files]
    _remember(out, files)
    return Report(root, out, runs, keys, over, table, summary, files, heatmaps, lr_table, ans, sentence)


MANIFEST = ".stab-report.json"  # in the report's folder: the files `stab report` wrote there, with their sha256
_OUTPUTS = ("report.md", "runs.csv", "factors.csv", "lr_sensitivity.csv", f"{PLOTS}/curves.png",
            f"{PLOTS}/grad_norm.png")


def _valid(run: Run) -> bool:
    """A folder stab wrote a run into: a known state, a verdict, or a config with stab's sections."""
    return (run.state in ("running", "completed", "failed", "interrupted") or bool(run.summary.get("verdict"))
            or bool(run.config and "train" in run.config))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_ours(out: Path) -> None:
    """Raise ReportError, before anything is written, if `out` holds a file the report would
    overwrite or remove that `stab report` did not write (the user's own report.md, say). Ours:
    listed in out/.stab-report.json with the same content; a folder reported on before that list
    existed counts as ours when its report.md opens as stab's does."""
    out = Path(out)
    existing = [out / rel for rel in _OUTPUTS if (out / rel).is_file()] + sorted((out / PLOTS).glob("heatmap_*.png"))
    if not existing:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        known, writing = dict(manifest["files"]), bool(manifest.get("writing"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        known, writing = None, False
    for path in existing:
        rel = path.relative_to(out).as_posix()
        if known is not None:  # a report cut short (full disk, kill) left "writing": its files are ours
            ours = writing or known.get(rel) == _sha256(path)
        else:
            try:
                with open(out / "report.md", encoding="utf-8", errors="replace") as f:
                    ours = f.readline().startswith("# Stability report: ")
            except OSError:
                ours = False
        if not ours:
            raise ReportError(f"{path} was not written by stab report (or was changed since): not overwriting it; "
                              f"move it, or pass --out to another folder")


def _remember(out: Path, files: list[Path], writing: bool = False) -> None:
    """out/.stab-report.json: what this report wrote, so the next one knows what it may overwrite;
    `writing` marks a report under way (its files may be half new)."""
    listed = {p.relative_to(out).as_posix(): _sha256(p) for p in files if p.is_file()}
    atomic_write_text(out / MANIFEST, json.dumps({"files": listed, "writing": writing}, indent=1) + "\n")
