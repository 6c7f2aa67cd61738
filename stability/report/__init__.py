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
    configurations,
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
    "configurations",
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
    configs: pd.DataFrame | None = None  # per configuration (seeds pooled): unstable share with interval, medians

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
    configs = configurations(runs, keys)
    extra = []
    if not configs.empty:
        write_csv(configs, out / "configs.csv")
        extra.append(out / "configs.csv")
    if lr_table is not None:
        write_csv(lr_table, out / "lr_sensitivity.csv")
        extra.append(out / "lr_sensitivity.csv")
    atomic_write_text(out / "report.md", _markdown(root, out, runs, keys, names, over, summary, heatmaps, lr_table,
                                                   ans, sentence, configs))
    files = [out / "report.md", out / "runs.csv", out / "factors.csv", *extra, *files]
    return Report(root, out, runs, keys, over, table, summary, files, heatmaps, lr_table, ans, sentence, configs)
