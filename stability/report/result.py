"""What one report computed and wrote (`Report`): the runs, their tables, the answer and the
paths of every file and plot; `write_report` fills it, report.md, report.html and the CLI read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stability.report.loading import Run
from stability.report.stepplots import Drawn


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
    step_plots: dict[str, Path] = field(default_factory=dict)  # run.rel -> per-step PNG
    grouped: Drawn | None = None  # per-step curves grouped by factor (2+ runs)
    departure: Drawn | None = None  # which module group left its band first (unstable and stable runs)
    departures: pd.DataFrame | None = None  # per group: how often it left first, unstable vs stable runs
    configs: pd.DataFrame | None = None  # per configuration (seeds pooled): unstable share with interval, medians

    @property
    def warnings(self) -> list[tuple[str, str]]:
        """(run folder relative to the root, warning) for every run read with a damaged or missing file."""
        return [(r.rel, w) for r in self.runs for w in r.warnings]
