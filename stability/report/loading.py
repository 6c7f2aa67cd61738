"""Loading run folders for a report: find them, read each robustly, never drop one.

A run folder is any folder holding `status.json`, `summary.json` or `config.yaml`
(`runformat.RUN_MARKERS`); a sweep is a folder of them. A run that is still going, was killed,
crashed, or has a torn or hand-damaged file is loaded as far as its files allow and carries
warnings. The file names and keys are `stability.runformat`'s; folders written before
`schema_version` (a wide grad table) read the same.

    runs = load_runs(Path("runs"))      # every run folder under runs/, sorted by folder
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from stability import detectors, runformat
from stability.config import flatten
from stability.rundirs import writer_gone
from stability.storage import loads, read_jsonl

RUN_MARKERS = runformat.RUN_MARKERS
VERDICTS = tuple(reversed(detectors.SEVERITY))  # least to most broken


class ReportError(Exception):
    """Nothing to report on (missing folder, no run folders): one line for the user."""


@dataclass
class Run:
    """One run folder, loaded as far as its files allow; `warnings` says what was missing or odd."""

    path: Path
    rel: str  # path relative to the report's root ("." for the root itself)
    state: str  # running | completed | failed | interrupted | unknown (no or unreadable status.json)
    verdict: str  # stable | exploding | scream | nan | failed, or the state while there is none
    status: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] | None = None
    config: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    grad_table: pd.DataFrame | None = None  # grad_norms.csv, long (runformat.GRAD_COLUMNS), from either layout
    events: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    steps_recorded: int = 0
    warnings: list[str] = field(default_factory=list)
    _flat: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted key -> value (computed once)."""
        if self._flat is None:
            self._flat = flatten(self.config or {}, keep_empty=True)
        return self._flat

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
        from_epochs = {"grad_norm_by_epoch": "grad_norm_mean", "grad_norm_max_by_epoch": "grad_norm_max",
                       "loss_by_epoch": "loss", "val_loss_by_epoch": "val_loss"}[key]
        values = self.summary.get(key)
        if not isinstance(values, list):
            values = [e.get(from_epochs) for e in self.epochs]
        return [_float(v) for v in values]

    @property
    def first_nan(self) -> dict[str, Any] | None:
        if "first_nan" in self.summary:
            return self.summary["first_nan"]
        return next((e for e in self.events if e.get("event") == "first_nan"), None)

    @property
    def scream_epoch(self) -> int | None:
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
        if "wall_s" in self.summary:
            return _float(self.summary["wall_s"])
        start, end = self.status.get("started"), self.status.get("finished")
        return end - start if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None

    @property
    def last_finite_grad(self) -> float:
        """The last finite per-epoch mean gradient norm (NaN if no epoch had one)."""
        return next((g for g in reversed(self.series("grad_norm_by_epoch")) if math.isfinite(g)), math.nan)


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root`, at any depth; hidden folders (`.hydra`) are skipped."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(m in filenames for m in RUN_MARKERS):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run folder holds no runs
    return found


def load_runs(root: Path) -> list[Run]:
    """All runs under `root`, sorted by folder; ReportError if there is nothing to report on."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root}: no such folder")
    if not root.is_dir():
        raise ReportError(f"{root}: not a folder")
    paths = find_runs(root)
    if not paths:
        raise ReportError(f"{root}: no run folders in it (a run folder holds {', '.join(RUN_MARKERS)})")
    index = _sweep_overrides(root)
    return [load_run(p, root, index) for p in paths]


def load_run(path: Path, root: Path | None = None, sweep_overrides: dict[Path, list[str]] | None = None) -> Run:
    """Load one run folder; never raises on damaged or missing files, records a warning instead."""
    path = Path(path)
    rel = os.path.relpath(path, root) if root is not None else path.name
    run = Run(path=path, rel=rel, state="unknown", verdict="?")
    warn = run.warnings.append

    status = _read_json(path / runformat.STATUS, warn)
    if status is None and not (path / runformat.STATUS).exists():
        warn("no status.json")
    run.status = status if isinstance(status, dict) else {}
    run.state = str(run.status.get("state") or "unknown")

    summary = _read_json(path / runformat.SUMMARY, warn)
    run.summary = summary if isinstance(summary, dict) else {}

    ov = _read_json(path / runformat.OVERRIDES, warn)
    if isinstance(ov, dict) and isinstance(ov.get("overrides"), list):
        run.overrides = [str(o) for o in ov["overrides"]]
    elif sweep_overrides and path.resolve() in sweep_overrides:
        run.overrides = sweep_overrides[path.resolve()]
        warn("overrides.json missing or unreadable; overrides taken from sweep.json")
    elif ov is None and (path / runformat.CONFIG).exists():
        warn("no overrides.json; compared by config.yaml")

    if (path / runformat.CONFIG).exists():
        try:
            cfg = yaml.safe_load((path / runformat.CONFIG).read_text())
            run.config = cfg if isinstance(cfg, dict) else None
            if run.config is None:
                warn("config.yaml is not a mapping")
        except (OSError, yaml.YAMLError) as e:
            warn(f"config.yaml unreadable: {_first_line(e)}")
    else:
        warn("no config.yaml")

    for name in (runformat.EPOCHS, runformat.EVENTS, runformat.METRICS):
        records, bad = read_jsonl(path / name)
        if bad:
            warn(f"{name}: {bad} unparsable line(s) skipped")
        if name == runformat.EPOCHS:
            run.epochs = records
        elif name == runformat.EVENTS:
            run.events = records
        else:
            run.steps_recorded = len(records)
    data = _read_json(path / runformat.DATA, warn)
    run.data = data if isinstance(data, dict) else {}

    grad_csv = path / runformat.GRAD_TABLE
    if grad_csv.exists():
        try:
            run.grad_table = runformat.read_grad_table(grad_csv)
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            warn(f"grad_norms.csv unreadable: {_first_line(e)}")

    if run.state == "running" and writer_gone(path, run.status):  # killed: it will never finish
        run.state = "interrupted"
        run.status = dict(run.status, error=f"status says running, but its writer (pid {run.status.get('pid')} on "
                                            f"{run.status.get('host')}) is gone (killed?)")
    if run.state == "completed" and path.joinpath(runformat.SUMMARY).exists() and not run.summary.get("verdict"):
        warn("completed, but summary.json holds no verdict (damaged?); a sweep re-runs it")
    run.verdict = str(run.summary.get("verdict") or run.status.get("verdict") or
                      (run.state if run.state in ("running", "interrupted", "failed") else "?"))
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
    if run.state == "completed" and not (run.path / runformat.SUMMARY).exists():
        warn("completed, but summary.json is missing")
    if run.state in ("completed", "running", "interrupted") and run.epochs and run.grad_table is None \
            and not (run.path / runformat.GRAD_TABLE).exists():
        warn("no grad_norms.csv")


def _read_json(path: Path, warn: Any) -> Any:
    """The parsed file, or None (missing: silently; unreadable or truncated: with a warning)."""
    if not path.exists():
        return None
    try:
        return loads(path.read_text())
    except (OSError, ValueError) as e:
        warn(f"{path.name} unreadable (truncated?): {_first_line(e)}")
        return None


def _sweep_overrides(root: Path) -> dict[Path, list[str]]:
    """Job folder -> overrides, from every sweep.json under root (a fallback for a lost overrides.json)."""
    out: dict[Path, list[str]] = {}
    for index in root.rglob(runformat.SWEEP_INDEX):
        try:
            for job in json.loads(index.read_text()).get("jobs", []):
                out[(index.parent / job["folder"]).resolve()] = [str(o) for o in job["overrides"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _float(x: Any) -> float:
    """An element of a recorded series as float (NaN/inf kept); a missing element (None) is NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


