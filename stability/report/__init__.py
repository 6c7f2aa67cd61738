"""Reports over run folders: find them, load them robustly, tabulate, summarise by factor, plot.

A package by job: `loading` (run folders into `Run`s), `factors` (what differs between runs),
`tables` (the overview, runs.csv, the factor summary, the learning-rate sensitivity), `answer`
(the unstable share per factor value and the one-sentence answer), `runtables` (one run's tables,
for `stab show`), `plots`, `stepplots` and `grouped` (the PNGs), `markdown` and `html` (report.md,
report.html and the CSV files), `result` (the `Report`) and `writer` (`write_report`: every file,
none a user's). Everything reads the run folder's files and nothing else
(`stability.record.format`), so a report works on runs that are still going, were killed, crashed,
or have a damaged file. NaN and inf stay NaN and inf in every table, CSV cell and plot.

    report = write_report(Path("runs"), Path("runs"))   # report.md, report.html, runs.csv, factors.csv, plots/
    report.overview                                     # the printed table, as strings
"""

from __future__ import annotations

from stability.report.answer import DECISIVE, answer, answer_display, configurations
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
from stability.report.grouped import plot_grouped
from stability.report.loading import (
    RUN_MARKERS,
    ReportError,
    Run,
    _float,
    find_runs,
    is_valid_run,
    load_run,
    load_runs,
)
from stability.report.markdown import ANSWER_TITLE, PLOTS, csv_cell, diagnostic_warnings, markdown_table, write_csv
from stability.report.plots import plot_curves, plot_grad_norms, plot_heatmap
from stability.report.result import Report
from stability.report.runtables import (
    epoch_frame,
    event_text,
    events_frame,
    grad_epoch_frame,
    is_run_folder,
    stage_frame,
)
from stability.report.stepplots import Drawn, departure_frame, departure_table, plot_departure, plot_steps
from stability.report.steps import StepSeries, load_steps, minmax_downsample
from stability.report.tables import (
    factor_display,
    factor_summary,
    first_nan_text,
    lr_display,
    lr_summary,
    overview,
    runs_frame,
)
from stability.report.writer import build_report, write_report

__all__ = [
    "ABSENT",
    "ALIAS_PATHS",
    "ANSWER_TITLE",
    "DECISIVE",
    "PLOTS",
    "RUN_MARKERS",
    "UNSET",
    "Drawn",
    "Report",
    "ReportError",
    "Run",
    "StepSeries",
    "_canonical",
    "_float",
    "answer",
    "answer_display",
    "build_report",
    "config_diff",
    "configurations",
    "csv_cell",
    "departure_frame",
    "departure_table",
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
    "is_valid_run",
    "labels",
    "load_run",
    "load_runs",
    "load_steps",
    "lr_display",
    "lr_summary",
    "markdown_table",
    "minmax_downsample",
    "overview",
    "plot_curves",
    "plot_departure",
    "plot_grad_norms",
    "plot_grouped",
    "plot_heatmap",
    "plot_steps",
    "runs_frame",
    "sort_runs",
    "stage_frame",
    "write_csv",
    "write_report",
]
