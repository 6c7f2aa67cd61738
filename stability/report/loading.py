"""Loading run folders for a report: find them, read each robustly, never drop one.

A run folder is any folder holding `status.json`, `summary.json` or `config.yaml`
(`rf.RUN_MARKERS`); a sweep is a folder of them. A run that is still going, was killed,
crashed, or has a torn or hand-damaged file is loaded as far as its files allow and carries
warnings. The file names and keys are `stability.record.format`'s; folders written before
`schema_version` (a wide grad table) read the same.

    runs = load_runs(Path("runs"))      # every run folder under runs/, sorted by folder
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stability.config import ConfigError, RunConfig, flatten
from stability.record import format as rf
from stability.record.folder import RunFolder, find_runs, sweep_overrides
from stability.record.records import EpochRecord, Event, Status, Summary

RUN_MARKERS = rf.RUN_MARKERS


class ReportError(Exception):
    """Nothing to report on (missing folder, no run folders): one line for the user."""


@dataclass
class Run:
    """One run folder, loaded as far as its files allow; `warnings` says what was missing or odd."""

    path: Path
    rel: str  # path relative to the report's root ("." for the root itself)
    state: str  # running | completed | failed | interrupted | unknown (no or unreadable status.json)
    verdict: str  # stable | exploding | scream | nan | failed, or the state while there is none
    status: Status = field(default_factory=Status)
    summary: Summary = field(default_factory=Summary)
    overrides: list[str] | None = None
    config: dict[str, Any] | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    grad_table: pd.DataFrame | None = None  # grad_norms.csv, long (rf.GRAD_COLUMNS), from either layout
    events: list[Event] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    steps_recorded: int = 0
    warnings: list[str] = field(default_factory=list)
    _flat: dict[str, Any] | None = field(default=None, repr=False)
    _inert: frozenset[str] | None = field(default=None, repr=False)

    @property
    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted key -> value (computed once)."""
        if self._flat is None:
            self._flat = flatten(self.config or {}, keep_empty=True)
        return self._flat

    @property
    def inert(self) -> frozenset[str]:
        """Dotted keys of the config that have no effect in it (`RunConfig.inert_keys`:
        fault.nan_module without fault.nan_at_step); none where the config does not validate
        (a run recorded by another stab version). Computed once."""
        if self._inert is None:
            try:
                self._inert = frozenset(RunConfig.from_dict(self.config or {}).inert_keys())
            except (ConfigError, TypeError, ValueError):
                self._inert = frozenset()
        return self._inert

    @property
    def group(self) -> str:
        """The folder the run sits in, relative to the root: a sweep's name, or `run`."""
        parent = str(Path(self.rel).parent)
        return "" if parent == "." else parent

    @property
    def params(self) -> dict[str, str]:
        """The overrides as key -> value (`+key=v` counts as `key`)."""
        out: dict[str, str] = {}
        for o in self.overrides or []:
            if "=" in o:
                k, v = o.split("=", 1)
                out[k.lstrip("+~")] = v
        return out

    def series(self, key: str) -> list[float]:
        """A per-epoch series from summary.json, else from epochs.jsonl (runs still going)."""
        from_epochs = {
            "grad_norm_by_epoch": "grad_norm_mean",
            "grad_norm_max_by_epoch": "grad_norm_max",
            "loss_by_epoch": "loss",
            "val_loss_by_epoch": "val_loss",
        }[key]
        values = self.summary.get(key)
        if not isinstance(values, list):
            values = [e.get(from_epochs) for e in self.epochs]
        return [_float(v) for v in values]

    @property
    def first_nan(self) -> Mapping[str, Any] | None:
        """The first_nan event's fields (summary.json, else events.jsonl), or None."""
        if "first_nan" in self.summary:
            return self.summary["first_nan"]
        return next((e for e in self.events if e.get("event") == "first_nan"), None)

    @property
    def scream_epoch(self) -> int | None:
        """The epoch the scream began (summary.json, else the scream event), or None."""
        if "scream_epoch" in self.summary:
            return self.summary["scream_epoch"]
        return next((e.get("epoch") for e in self.events if e.get("event") == "scream"), None)

    @property
    def final_loss(self) -> float | None:
        """The last step's loss (summary.json), else the last epoch's mean; None if it never trained."""
        if "final_loss" in self.summary:
            return _float(self.summary["final_loss"])
        losses = self.series("loss_by_epoch")
        return losses[-1] if losses else None

    @property
    def wall_s(self) -> float | None:
        """Seconds the run took (summary.json, else status.json's started and finished), or None."""
        if "wall_s" in self.summary:
            return _float(self.summary["wall_s"])
        start, end = self.status.get("started"), self.status.get("finished")
        return end - start if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None

    @property
    def last_finite_grad(self) -> float:
        """The last finite per-epoch mean gradient norm (NaN if no epoch had one)."""
        return next((g for g in reversed(self.series("grad_norm_by_epoch")) if math.isfinite(g)), math.nan)


def load_runs(root: Path) -> list[Run]:
    """All runs under `root`, sorted by folder; ReportError if there is nothing to report on."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root}: no such folder; pass a folder holding run folders or sweeps")
    if not root.is_dir():
        raise ReportError(f"{root}: is a file, not a folder; pass a folder holding run folders or sweeps")
    paths = find_runs(root)
    if not paths:
        raise ReportError(f"{root}: no run folders in it (a run folder holds {', '.join(RUN_MARKERS)})")
    index = sweep_overrides(root)
    return [load_run(p, root, index) for p in paths]


def load_run(path: Path, root: Path | None = None, sweep_overrides: dict[Path, list[str]] | None = None) -> Run:
    """Load one run folder through `RunFolder`; never raises on damaged or missing files, records a
    warning instead."""
    path = Path(path)
    rel = os.path.relpath(path, root) if root is not None else path.name
    run = Run(path=path, rel=rel, state="unknown", verdict="?")
    folder = RunFolder(path)
    folder.warnings = run.warnings  # one list, in the order the files are read
    warn = run.warnings.append

    status = folder.status()
    if not folder.has(rf.STATUS):
        warn(f"no {rf.STATUS}")
    run.status, run.state = status, status.state
    run.summary = folder.summary()

    ov = folder.json(rf.OVERRIDES)
    if isinstance(ov, dict) and isinstance(ov.get("overrides"), list):
        run.overrides = [str(o) for o in ov["overrides"]]
    elif sweep_overrides and path.resolve() in sweep_overrides:
        run.overrides = sweep_overrides[path.resolve()]
        warn(f"{rf.OVERRIDES} missing or unreadable; overrides taken from {rf.SWEEP_INDEX}")
    elif ov is None and folder.has(rf.CONFIG):
        warn(f"no {rf.OVERRIDES}; compared by {rf.CONFIG}")
    run.config = folder.config()
    run.epochs, run.events = folder.epochs(), folder.events()
    run.steps_recorded = len(folder.steps())
    run.data = folder.data()
    run.grad_table = folder.grad_table()

    if run.state == "running" and folder.state(status) == "interrupted":  # killed: it will never finish
        run.state = "interrupted"
        run.status = Status(
            status, error=f"status says running, but its writer (pid {status.pid} on {status.host}) is gone (killed?)"
        )
    if run.state == "completed" and folder.has(rf.SUMMARY) and not run.summary.get("verdict"):
        warn(f"completed, but {rf.SUMMARY} holds no verdict (damaged?); a sweep re-runs it")
    run.verdict = str(
        run.summary.get("verdict")
        or run.status.get("verdict")
        or (run.state if run.state in ("running", "interrupted", "failed") else "?")
    )
    _check_state(run)
    return run


def _check_state(run: Run) -> None:
    warn = run.warnings.append
    st = run.status
    if run.state == "running":
        started = st.get("started")
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        warn(f"still running (pid {st.get('pid')} on {st.get('host')}, since {since}); partial results")
    elif run.state == "interrupted":
        warn(f"interrupted: {st.get('error') or 'no error recorded'}; partial results")
    elif run.state == "failed":
        warn(f"failed: {st.get('error') or run.summary.get('evidence') or 'no error recorded'}")
    elif run.state not in ("completed", "unknown"):
        warn(f"unexpected state {run.state!r} in status.json")
    if run.state == "completed" and not (run.path / rf.SUMMARY).exists():
        warn("completed, but summary.json is missing")
    if (
        run.state in ("completed", "running", "interrupted")
        and run.epochs
        and run.grad_table is None
        and not (run.path / rf.GRAD_TABLE).exists()
    ):
        warn("no grad_norms.csv")


def _float(x: Any) -> float:
    """An element of a recorded series as float (NaN/inf kept); a missing element (None) is NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def is_valid_run(run: Run) -> bool:
    """A folder stab wrote a run into: a known state, a verdict, or a config with stab's sections
    (a `{}` summary.json beside a user's own files is not one)."""
    return (
        run.state in ("running", "completed", "failed", "interrupted")
        or bool(run.summary.get("verdict"))
        or bool(run.config and "train" in run.config)
    )
