"""The doctor's view of a run folder: its config, summary, epochs, steps and events as one
`RunRecord` (`read_run`), or a DoctorError saying what is missing.

    rec = read_run(Path("runs/run/20261129-111902_defaults"))   # rec.series("grad/norm"), rec.get("train.lr")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.record.records import EpochRecord, Event, Summary


class DoctorError(ValueError):
    """The folder is not a run folder the doctor can read (what is missing is in the message)."""


# --- reading the run folder ----------------------------------------------------------------


@dataclass
class RunRecord:
    """One run folder's records: `config` (the resolved config.yaml mapping), `summary`,
    `epochs` (epochs.jsonl), `steps` (metrics.jsonl: `step`, `loss`, `grad/norm`, `grad/<group>`,
    `grad/clipped`, `lr`, `stage{i}/...`), `events`, and the overrides it was run with (if known)."""

    path: Path
    config: dict[str, Any]
    summary: Summary
    epochs: list[EpochRecord]
    steps: list[dict[str, Any]]
    events: list[Event]
    overrides: list[str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (`train.lr`), or `default` where the config lacks it."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def groups(self) -> list[str]:
        """The module groups with a per-step grad norm, in recorded (forward) order."""
        if not self.steps:
            return []
        return [k[5:] for k in self.steps[0] if k.startswith("grad/") and k not in ("grad/norm", "grad/clipped")]

    def series(self, key: str) -> np.ndarray:
        """One step-record key over the run as floats (missing or non-numeric: NaN). Shape (steps,)."""
        return np.array([_float(r.get(key)) for r in self.steps], dtype=float)


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_run(run_dir: Path) -> RunRecord:
    """Read a finished run folder. Raises DoctorError naming what is missing."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        what = "is a file, not a folder" if folder.path.exists() else "no such folder"
        raise DoctorError(f"{run_dir}: {what}; pass a run folder (with {rf.METRICS})")
    steps = folder.steps()
    if not steps:
        raise DoctorError(
            f"{run_dir} holds no step records ({rf.METRICS} missing or empty): "
            "expected a run folder written by stab run, stab sweep or the monitor API"
        )
    return RunRecord(
        folder.path,
        folder.config() or {},
        folder.summary(),
        folder.epochs(),
        steps,
        folder.events(),
        folder.overrides(),
    )
