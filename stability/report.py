"""Reports over run folders: find them, load them robustly, tabulate, summarise by factor, plot.

A run folder is any folder holding `status.json`, `summary.json` or `config.yaml` (see
`stability.training`); a sweep is a folder of them. Everything here reads those files and
nothing else, so a report works on runs that are still going, were killed, crashed, or have a
torn or hand-damaged file: such runs are loaded as far as their files allow and carry warnings,
they are never dropped. NaN and inf stay NaN and inf in every table, CSV cell and plot.

    report = write_report(Path("runs"), Path("runs"))   # report.md, runs.csv, factors.csv, plots/
    report.overview                                     # the printed table, as strings
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stability import runformat
from stability.config import OPERATIONAL_KEYS, SHORT_NAMES
from stability.formatting import format_number
from stability.lr_sensitivity import initial_loss, lr_sensitivity, varies_lr
from stability.progress import phase
from stability.rundirs import writer_gone
from stability.storage import atomic_write_bytes, atomic_write_text, loads, read_jsonl

RUN_MARKERS = runformat.RUN_MARKERS
VERDICTS = ("stable", "exploding", "scream", "nan", "failed")  # least to most broken
UNSET = "(default)"  # a factor a run did not override
PLOTS = "plots"


class ReportError(Exception):
    """Nothing to report on (missing folder, no run folders): one line for the user."""


# ----------------------------------------------------------------------------------------------
# Loading


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
            self._flat = _flatten(self.config or {})
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


# ----------------------------------------------------------------------------------------------
# What differs between runs


# The short names and where each is read in a resolved config (the last stage's residual).
ALIAS_PATHS = {name: short.path for name, short in SHORT_NAMES.items()}


def _operational(key: str) -> bool:
    """Keys that say where or how a run ran, never what it computed: not factors."""
    return key in OPERATIONAL_KEYS or key.split(".")[0] == "hydra"


def factors(runs: Sequence[Run]) -> list[str]:
    """The keys whose values differ between runs: override keys (compared on the runs' resolved
    values, so `norm=post` and the default post-norm are one value), or config paths where a
    run's overrides are unknown (no overrides.json and no sweep.json entry). Operational keys
    (device, threads, trackers, hydra.*) are never factors."""
    if len(runs) < 2:
        return []
    if all(r.overrides is not None for r in runs):
        keys = [k for k in dict.fromkeys(k for r in runs for k in r.params) if not _operational(k)]
        by_path = {ALIAS_PATHS.get(k, k): k for k in reversed(keys)}  # `clip` and `train.clip` are one factor
        keys = [k for k in keys if by_path[ALIAS_PATHS.get(k, k)] == k]
        differ = [k for k in keys if len({factor_value(r, k) for r in runs}) > 1]
        if differ or len({json.dumps(r.config, sort_keys=True, default=str) for r in runs}) <= 1:
            return differ
    flat = [_flatten(r.config or {}) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if not _operational(k) and len({repr(f.get(k)) for f in flat}) > 1]


def _canonical(v: Any) -> str:
    """One spelling per value: `10`, `10.0` and `1e1` -> `10`; quotes dropped; null/none -> `none`;
    booleans lower case."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    text = str(v).strip().strip("'\"")
    if text.lower() in ("none", "null"):
        return "none"
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        x = float(text)
    except ValueError:
        return text
    return f"{x:g}" if math.isfinite(x) else text


def factor_value(run: Run, key: str) -> str:
    """A run's value of a factor: the value its resolved config holds at that key (for a short
    name, where the model reads it), else its override, else UNSET; spelled canonically."""
    flat = run.flat
    path = ALIAS_PATHS.get(key, key)
    if path in flat:
        v = flat[path]
        return _canonical(v[-1] if key == "residual" and isinstance(v, list) and v else v)
    params = run.params
    if key in params:
        return _canonical(params[key])
    return UNSET


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Absent:
    """A key one config has and the other lacks (e.g. a run recorded before the key existed)."""

    def __repr__(self) -> str:
        return "(absent)"

    __str__ = __repr__


ABSENT = _Absent()


def config_diff(defaults: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, default, this run's value) for every leaf that differs, in the config's order;
    a key only one side has gives ABSENT on the other."""
    a, b = _flatten(defaults), _flatten(actual)
    rows = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if not _same(va, vb):
            rows.append((key, va, vb))
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def labels(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, str]:
    """Short names for runs (by `rel`): the differing overrides each sets (`residual=0.1 norm=pre`),
    or the config values where factors are config paths; the folder is added where names collide."""
    override_keys = {k for r in runs for k in r.params}
    base = {}
    for r in runs:
        params = r.params
        mine = [k for k in keys if k in params or k not in override_keys]
        base[r.rel] = " ".join(f"{k}={factor_value(r, k)}" for k in mine)
    count: dict[str, int] = {}
    for name in base.values():
        count[name] = count.get(name, 0) + 1
    return {rel: (name if name and count[name] == 1 else f"{name} ({rel})".strip() if name else rel)
            for rel, name in base.items()}


def _value_order(v: str) -> tuple[int, float, str]:
    if v == UNSET:
        return (2, 0.0, v)
    try:
        x = float(v)
    except ValueError:
        return (1, 0.0, v)
    return (0, x, v) if not math.isnan(x) else (1, 0.0, v)


def sort_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Run]:
    """By folder group (sweep), then by factor values (numbers numerically)."""
    return sorted(runs, key=lambda r: (r.group, [_value_order(factor_value(r, k)) for k in keys], r.rel))


# ----------------------------------------------------------------------------------------------
# Tables


def first_nan_text(nan: dict[str, Any] | None) -> str:
    """`e3 b205 stage2.layer0.mlp`: 1-based epoch, 0-based batch within it, module group."""
    if not nan:
        return "-"
    return f"e{nan.get('epoch', '?')} b{nan.get('batch', '?')} {nan.get('module') or '?'}"


def _series_text(values: Sequence[float], keep: int = 8) -> str:
    cells = [format_number(v) for v in values]
    if len(cells) > keep:  # the start and the end; runs.csv has all of them
        cells = [*cells[:3], "…", *cells[-(keep - 4):]]
    return " ".join(cells) or "-"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return format_number(seconds)
    if seconds < 10:
        return f"{seconds:.2g} s"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def overview(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """The printed table: one row per run, as display strings (NaN/inf spelled out)."""
    ids = [(r.group, *(factor_value(r, k) for k in keys)) for r in runs]
    show_run = not keys or len(set(ids)) < len(ids)  # the factors do not tell the runs apart
    show_group = not show_run and len({r.group for r in runs}) > 1
    show_state = any(r.state not in ("completed", "failed") for r in runs)  # failed: the verdict says so
    rows = []
    for r in runs:
        row: dict[str, str] = {}
        if show_run:
            row["run"] = r.rel
        elif show_group:
            row["sweep"] = r.group or "."
        row.update({k: factor_value(r, k) for k in keys})
        if show_state:
            row["state"] = r.state
        maxes = r.series("grad_norm_max_by_epoch")
        scream = r.scream_epoch
        wall = r.wall_s
        row.update({
            "verdict": r.verdict,
            "first NaN": first_nan_text(r.first_nan),
            # warning time: steps between the first grad/loss spike and the first NaN
            "spike lead": f"{r.summary['spike_lead_steps']} steps" if r.summary.get("spike_lead_steps") is not None else "-",
            "scream": f"e{scream}" if scream is not None else "-",
            "grad norm per epoch": _series_text(r.series("grad_norm_by_epoch")),
            "max, last epoch": format_number(maxes[-1]) if maxes else "-",
            "final loss": format_number(r.final_loss),
            "max attn logit": format_number(_health(r).get("attn_logit_max")),
            "wall": _duration(wall),
        })
        rows.append(row)
    frame = pd.DataFrame(rows)
    optional = [c for c in ("spike lead", "max attn logit") if c in frame and (frame[c] == "-").all()]
    return frame.drop(columns=optional)  # columns with nothing to say for these runs


def _health(run: Run) -> dict[str, Any]:
    """The last evaluated epoch's health summary (attention entropy, max logit, sinks, ...)."""
    return next((e["health_summary"] for e in reversed(run.epochs) if e.get("health_summary")), {})


_HEALTH_FIELDS = ("attn_entropy_min", "attn_logit_max", "sink_max", "sink_layers", "massive_max", "grad_sink_max")
_SUMMARY_FIELDS = ("evidence", "scream_epoch", "final_loss", "final_val_loss", "growth_per_epoch",
                   "first_spike_step", "spike_lead_steps", "n_grad_spikes", "n_loss_spikes", "clip_rate", "nonfinite_steps", "epochs_run", "steps",
                   "stopped_early", "latent_scale", "device", "wall_s")
_NAN_FIELDS = ("epoch", "batch", "step", "kind", "module", "where", "loss", "grad_norm")


def runs_frame(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """runs.csv: one row per run with every number; NaN/inf kept, None (not applicable) as None."""
    n_epochs = max((len(r.series("grad_norm_by_epoch")) for r in runs), default=0)
    n_stages = max((len(r.summary.get("stage_rms_last_epoch") or []) for r in runs), default=0)
    fixed = {"path", "sweep", "run_id", "state", "verdict", "warnings", "overrides", "error"}
    rows = []
    for r in runs:
        row: dict[str, Any] = {"path": r.rel, "sweep": r.group, "run_id": r.summary.get("run_id") or r.status.get("run_id"),
                               "state": r.state, "verdict": r.verdict}
        for k in keys:
            row[f"override.{k}" if k in fixed else k] = factor_value(r, k)
        row["overrides"] = " ".join(r.overrides) if r.overrides is not None else None
        row["last_finite_grad_norm"] = r.last_finite_grad
        nan = r.first_nan or {}
        row.update({f"first_nan_{f}": nan.get(f) for f in _NAN_FIELDS})
        for f in _SUMMARY_FIELDS:
            row[f] = r.summary.get(f)
        if "scream_epoch" not in r.summary:
            row["scream_epoch"] = r.scream_epoch
        if "final_loss" not in r.summary and r.epochs:
            row["final_loss"] = r.final_loss
        if row["wall_s"] is None:
            row["wall_s"] = r.wall_s
        codec = r.summary.get("codec") or r.data.get("codec") or {}
        row.update({f"codec_{k}": codec.get(k) for k in ("weights", "seed", "checksum")})
        row["steps_recorded"] = r.steps_recorded
        health = _health(r)
        row.update({f"health_{k}": health.get(k) for k in _HEALTH_FIELDS})
        for key, name in (("grad_norm_by_epoch", "grad_mean"), ("grad_norm_max_by_epoch", "grad_max"),
                          ("loss_by_epoch", "loss"), ("val_loss_by_epoch", "val_loss")):
            s = r.series(key)
            row.update({f"{name}_e{e}": (s[e - 1] if e <= len(s) else None) for e in range(1, n_epochs + 1)})
        for key, name in (("stage_rms_last_epoch", "rms"), ("stage_scale_last_epoch", "scale")):
            s = r.summary.get(key) or []
            row.update({f"stage{i}_{name}_last": (_float(s[i]) if i < len(s) else None) for i in range(n_stages)})
        row["error"] = r.status.get("error")
        row["warnings"] = "; ".join(r.warnings)
        rows.append(row)
    # object dtype keeps None (not applicable: no NaN happened) apart from NaN (a NaN result), and ints as ints
    return pd.DataFrame(rows, dtype=object)


def factor_summary(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """For each factor and value: runs, share per verdict, median of the last finite grad norm."""
    rows = []
    others = sorted({r.verdict for r in runs} - set(VERDICTS))
    for k in keys:
        values = sorted({factor_value(r, k) for r in runs}, key=_value_order)
        for v in values:
            mine = [r for r in runs if factor_value(r, k) == v]
            row: dict[str, Any] = {"factor": k, "value": v, "runs": len(mine)}
            for verdict in (*VERDICTS, *others):
                row[verdict] = sum(r.verdict == verdict for r in mine) / len(mine)
            finite = [g for g in (r.last_finite_grad for r in mine) if math.isfinite(g)]
            row["median last grad norm"] = statistics.median(finite) if finite else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


UNSTABLE = ("exploding", "scream", "nan")  # verdicts that count as "unstable" in the answer
DECISIVE = 0.5  # a factor is decisive when the unstable share differs by at least this between its values


def _max_grad(run: Run) -> float:
    finite = [g for g in run.series("grad_norm_max_by_epoch") if math.isfinite(g)]
    return max(finite) if finite else math.nan


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def answer(runs: Sequence[Run], keys: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """The report's opening: per factor and value, unstable runs out of runs with a verdict
    (`exploding`, `scream` or `nan` out of those that did not crash), the median final
    validation loss and the median largest grad norm; and one sentence naming the decisive
    factor(s), those whose unstable share differs by at least `DECISIVE` between two values,
    largest difference first, e.g. "residual: 0/6 unstable at 0.3 vs 5/6 at 0.1"."""
    judged = [r for r in runs if r.verdict in VERDICTS and r.verdict != "failed"]
    rows, spreads = [], []
    for k in keys:
        values = sorted({factor_value(r, k) for r in judged}, key=_value_order)
        counts = []
        for v in values:
            mine = [r for r in judged if factor_value(r, k) == v]
            bad = sum(r.verdict in UNSTABLE for r in mine)
            counts.append((v, bad, len(mine)))
            rows.append({"factor": k, "value": v, "unstable": f"{bad}/{len(mine)}",
                         "unstable_share": bad / len(mine),
                         "median final val loss": _median([_float(r.summary.get("final_val_loss")) for r in mine]),
                         "median max grad norm": _median([_max_grad(r) for r in mine])})
        if len(counts) > 1:
            lo, hi = min(counts, key=lambda c: c[1] / c[2]), max(counts, key=lambda c: c[1] / c[2])
            spread = hi[1] / hi[2] - lo[1] / lo[2]
            if spread >= DECISIVE:
                spreads.append((spread, f"{k}: {lo[1]}/{lo[2]} unstable at {lo[0]} vs {hi[1]}/{hi[2]} at {hi[0]}"))
    n_bad = sum(r.verdict in UNSTABLE for r in judged)
    crashed = sum(r.verdict == "failed" for r in runs)
    others = len(runs) - len(judged) - crashed  # still running, interrupted, unreadable
    aside = "".join(f"; {n} {what} not counted" for n, what in ((crashed, "crashed (failed)"), (others, "without a verdict"))
                    if n)
    def all_runs(n: int, what: str) -> str:
        return f"The one run is {what}" if n == 1 else f"All {n} runs are {what}"

    if not judged:
        sentence = f"No run has a verdict yet{aside}."
    elif n_bad == 0:
        sentence = (f"{all_runs(len(judged), 'stable')}{aside}: no factor changed the verdict at these settings "
                    "(compare the validation losses below).")
    elif n_bad == len(judged):
        sentence = f"{all_runs(len(judged), 'unstable')}{aside}: no value of any factor fixed it."
    elif spreads:
        spreads.sort(key=lambda t: -t[0])
        sentence = f"Decisive: {'; '.join(t for _, t in spreads)}{aside}."
    else:
        sentence = (f"{n_bad}/{len(judged)} runs unstable{aside}; no single factor separates them "
                    f"(no factor's unstable share differs by {DECISIVE:.0%} or more between its values).")
    return pd.DataFrame(rows, columns=["factor", "value", "unstable", "unstable_share", "median final val loss",
                                       "median max grad norm"]), sentence


def answer_display(table: pd.DataFrame) -> pd.DataFrame:
    """`answer`'s table as strings."""
    out = table.drop(columns=["unstable_share"]).astype(object)
    for col in ("median final val loss", "median max grad norm"):
        out[col] = [format_number(v) for v in table[col]]
    return out


def factor_display(summary: pd.DataFrame) -> pd.DataFrame:
    """factor_summary as strings: shares in percent, the median as a number."""
    out = summary.copy()
    for col in out.columns:
        if col in ("factor", "value", "runs"):
            out[col] = out[col].astype(str)
        elif col == "median last grad norm":
            out[col] = [format_number(v) for v in out[col]]
        else:
            out[col] = [f"{round(100 * v)}%" for v in out[col]]
    return out


# ----------------------------------------------------------------------------------------------
# One run (`stab show`)


def is_run_folder(path: Path) -> bool:
    return Path(path).is_dir() and any((Path(path) / m).exists() for m in RUN_MARKERS)


def grad_epoch_frame(run: Run) -> pd.DataFrame:
    """The grad table's wide view: group x epoch means, plus `max`, the largest step norm over all
    epochs (NaN if any epoch's max is NaN: a group that went NaN is not hidden by its earlier maxima)."""
    return runformat.wide_view(run.grad_table)


def epoch_frame(run: Run) -> pd.DataFrame:
    """Per epoch: loss, validation loss, grad norm mean/max, clip rate, collapsed (the scream check)."""
    cols = {"epoch": "epoch", "steps": "steps", "loss": "loss", "val_loss": "val loss",
            "grad_norm_mean": "grad mean", "grad_norm_max": "grad max", "clip_rate": "clipped",
            "collapsed": "collapsed"}
    return pd.DataFrame([{name: e.get(key) for key, name in cols.items()} for e in run.epochs],
                        columns=list(cols.values()), dtype=object)


def stage_frame(run: Run) -> pd.DataFrame:
    """Per epoch and stage: output RMS, the ratio the RMS match needed, the scale applied after
    clamping, and the share of steps where the clamp bound was hit."""
    rows = []
    for e in run.epochs:
        rms, ratio, scale, clamp = (e.get(k) or [] for k in ("stage_rms", "stage_ratio", "stage_scale", "stage_clamp_rate"))
        for i in range(max(len(rms), len(ratio), len(scale))):
            def at(xs: list[Any]) -> Any:
                return xs[i] if i < len(xs) else None
            rows.append({"epoch": e.get("epoch"), "stage": i, "rms": at(rms), "needed ratio": at(ratio),
                         "scale": at(scale), "clamped": at(clamp)})
    return pd.DataFrame(rows, columns=["epoch", "stage", "rms", "needed ratio", "scale", "clamped"], dtype=object)


def event_text(ev: dict[str, Any]) -> str:
    """The details of one events.jsonl record, in words."""
    kind = ev.get("event")
    f = format_number
    if kind == "first_nan":
        return (f"non-finite {ev.get('kind', '?')} first in {ev.get('module', '?')} ({ev.get('where', '?')}); "
                f"loss {f(ev.get('loss'))}, grad norm {f(ev.get('grad_norm'))}"
                + (f"; batch and state saved: stab replay {ev['forensics']}" if ev.get("forensics") else ""))
    if kind in ("grad_spike", "loss_spike"):
        return f"{'grad norm' if kind == 'grad_spike' else 'loss'} {f(ev.get('value', ev.get('grad_norm')))}"
    if kind == "clamp_saturation":
        return f"stage {ev.get('stage')}: needed ratio {f(ev.get('ratio'))}, clamped to {f(ev.get('scale'))}"
    if kind == "scream":
        s, t = ev.get("scores") or {}, ev.get("target_scores") or {}
        return "output collapsed: " + ", ".join(f"{k} {f(v)} (target {f(t.get(k))})" for k, v in s.items())
    skip = {"event", "epoch", "batch", "step"}
    return ", ".join(f"{k} {f(v)}" for k, v in ev.items() if k not in skip)


def events_frame(run: Run) -> pd.DataFrame:
    order = {"first_nan": 0, "scream": 1, "grad_spike": 2, "clamp_saturation": 3}
    def when(e: dict[str, Any]) -> tuple[int, int, int]:  # a scream has an epoch, no step: it ends the epoch
        epoch, step = e.get("epoch"), e.get("step")
        return (epoch if isinstance(epoch, int) else 1 << 62, step if isinstance(step, int) else 1 << 62,
                order.get(e.get("event"), 9))

    evs = sorted(run.events, key=when)
    return pd.DataFrame([{"event": e.get("event"), "epoch": e.get("epoch"), "batch": e.get("batch"),
                          "step": e.get("step"), "details": event_text(e)} for e in evs],
                        columns=["event", "epoch", "batch", "step", "details"], dtype=object)


# ----------------------------------------------------------------------------------------------
# Files


def csv_cell(x: Any) -> str:
    """A CSV cell: floats at full precision, NaN as 'NaN', inf as 'inf', not applicable as ''."""
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)) and math.isfinite(x):
        return repr(float(x))
    return format_number(x)  # NaN, inf, -inf, and non-numbers as text


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    cells = frame.astype(object).map(csv_cell)
    buf = io.StringIO()
    cells.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of display strings (`|` escaped)."""
    if frame.empty:
        return "_(none)_\n"

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: Path) -> None:
    """Render to memory, then write atomically (a reader never sees half a PNG), with the
    permissions of any other result file (the umask's)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


_VERDICT_COLOURS = {"nan": "tab:red", "scream": "tab:purple", "exploding": "tab:orange"}


def plot_grad_norms(runs: Sequence[Run], names: dict[str, str], path: Path) -> Path:
    """Mean gradient norm per epoch, one line per run (log y); the epoch where a run's norm went
    NaN or inf is marked with a red X on its last finite value, the per-epoch max is dotted."""
    plotted = [r for r in runs if r.series("grad_norm_by_epoch")]
    fig = Figure(figsize=(9, 4.8 + 0.22 * max(0, len(plotted) - 12)))
    ax = fig.add_subplot()
    palette = [f"C{i}" for i in range(10) if i != 3]  # C3 is red: red is kept for the NaN marks
    colours = [palette[i % len(palette)] for i in range(len(plotted))]
    styles = ["-", "--", "-.", ":"]
    marked = False
    for i, (r, c) in enumerate(zip(plotted, colours)):
        means = np.array(r.series("grad_norm_by_epoch"), dtype=float)
        maxes = np.array(r.series("grad_norm_max_by_epoch"), dtype=float)
        epochs = np.arange(1, len(means) + 1)
        ls = styles[(i // len(palette)) % len(styles)]
        ok = np.isfinite(means) & (means > 0)
        ax.plot(epochs[ok], means[ok], ls, color=c, marker="o", ms=4, lw=1.6,
                label=f"{names.get(r.rel, r.rel)}  [{r.verdict}]")
        if len(maxes) == len(means):
            okm = np.isfinite(maxes) & (maxes > 0)
            ax.plot(epochs[okm], maxes[okm], ":", color=c, lw=1, alpha=0.7)
        last = None
        for e, g in zip(epochs, means):
            if math.isfinite(g):
                last = g if g > 0 else last
                continue
            y = last if last is not None else np.nanmax(np.where(np.isfinite(means), means, np.nan)) \
                if np.isfinite(means).any() else 1.0
            ax.plot([e], [y], "x", color="red", ms=12, mew=2.5, zorder=5)
            ax.annotate("NaN" if math.isnan(g) else "inf", (e, y), textcoords="offset points", xytext=(6, 6),
                        color="red", fontsize=9, fontweight="bold")
            marked = True
            break  # training stops at the first non-finite epoch; later ones repeat it
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient norm (total, mean over the epoch)")
    n_ep = max((len(r.series("grad_norm_by_epoch")) for r in plotted), default=1)
    ax.set_xticks(range(1, n_ep + 1) if n_ep <= 20 else ax.get_xticks())
    ax.set_xlim(0.7, n_ep + 0.3 + (0.4 if marked else 0))
    ax.grid(True, which="both", alpha=0.25)
    title = "Gradient norm per epoch (dotted: max within the epoch"
    ax.set_title(title + ("; red X: went NaN/inf" if marked else "") + ")", fontsize=10)
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        _plain_log_ticks(ax)
    else:
        ax.text(0.5, 0.5, "no run has a finished epoch yet", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    return path


def _attn_logit_series(run: Run) -> list[float]:
    return [_float((e.get("health_summary") or {}).get("attn_logit_max")) for e in run.epochs]


def plot_curves(runs: Sequence[Run], names: dict[str, str], path: Path) -> Path:
    """Three panels per epoch, one colour per run: training loss (solid) and validation loss
    (dashed); total gradient norm (mean over the epoch); max attention logit on the validation
    batch (Wortsman et al. 2023, arXiv 2309.14322: its growth precedes attention-entropy
    collapse). Log y; non-finite values are left out (the grad-norm plot marks them)."""
    plotted = [r for r in runs if r.epochs or r.series("grad_norm_by_epoch")]
    fig = Figure(figsize=(15, 4.6 + 0.22 * max(0, len(plotted) - 12)))
    axes = fig.subplots(1, 3)
    palette = [f"C{i}" for i in range(10) if i != 3]  # as in plot_grad_norms: one colour per run in both
    for i, r in enumerate(plotted):
        c, label = palette[i % len(palette)], f"{names.get(r.rel, r.rel)}  [{r.verdict}]"
        for ax, ys, ls, lab in ((axes[0], r.series("loss_by_epoch"), "-", label),
                                (axes[0], r.series("val_loss_by_epoch"), "--", None),
                                (axes[1], r.series("grad_norm_by_epoch"), "-", None),
                                (axes[2], _attn_logit_series(r), "-", None)):
            y = np.array(ys, dtype=float)
            x = np.arange(1, len(y) + 1)
            ok = np.isfinite(y) & (y > 0)
            if ok.any():
                ax.plot(x[ok], y[ok], ls, color=c, marker="o", ms=3, lw=1.4, label=lab)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("loss (solid: train, dashed: validation)", "gradient norm (total, epoch mean)",
                                "max attention logit (validation batch)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(True, which="both", alpha=0.25)
        if ax.lines:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    if plotted:
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(plotted)), fontsize=8, frameon=False)
    _save(fig, path)
    return path


def _plain_log_ticks(ax: Any) -> None:
    """Log-axis labels as plain numbers (`4`, `0.01`, `1e+04`), minor ones too when under ~1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and math.log10(hi / lo) < 1.5 else NullFormatter())


def plot_heatmap(run: Run, name: str, path: Path) -> Path:
    """Per-module-group gradient norm (epoch mean) by epoch, log colour scale; NaN/inf cells are
    hatched red and labelled, the cell of the first NaN is boxed."""
    assert run.grad_table is not None
    groups, epochs, values = runformat.grad_means(run.grad_table)
    n_g, n_e = values.shape
    fig = Figure(figsize=(3.2 + 0.75 * max(n_e, 2), 1.6 + 0.26 * n_g))
    ax = fig.add_subplot()
    good = np.isfinite(values) & (values > 0)
    lo, hi = (values[good].min(), values[good].max()) if good.any() else (1e-3, 1.0)
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    masked = np.ma.masked_where(~good, values)
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for gi in range(n_g):
        for ei in range(n_e):
            v = values[gi, ei]
            if math.isfinite(v) and v > 0:
                shade = norm(v)
                ax.text(ei, gi, format_number(v, 2), ha="center", va="center", fontsize=6.5,
                        color="black" if shade > 0.55 else "white")
                continue
            if not math.isfinite(v):
                ax.add_patch(_rect(ei, gi, fill=False, hatch="//", edgecolor="#f4a0a0", lw=0))
            ax.text(ei, gi, format_number(v) if not math.isfinite(v) else "0", ha="center", va="center",
                    fontsize=7, fontweight="bold", color="red" if not math.isfinite(v) else "black",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"))
    nan = run.first_nan
    if nan and nan.get("module") in groups and nan.get("epoch") in epochs:
        ax.add_patch(_rect(epochs.index(nan["epoch"]), groups.index(nan["module"]), fill=False,
                           edgecolor="red", lw=2.5))
    if "total" in groups:
        ax.axhline(groups.index("total") + 0.5, color="white", lw=2)
    ax.set_xticks(range(n_e), [f"e{e}" for e in epochs])
    ax.set_yticks(range(n_g), groups, fontsize=7)
    ax.set_xlabel("epoch")
    head = name
    sub = f"verdict {run.verdict}"
    if nan:
        sub += f", first NaN {first_nan_text(nan)} (boxed)"
    if run.scream_epoch is not None:
        sub += f", scream from e{run.scream_epoch}"
    ax.set_title(f"{head}\n{sub}", fontsize=9)
    fig.colorbar(im, ax=ax, label="gradient norm (epoch mean, log)", fraction=0.05, pad=0.02)
    _save(fig, path)
    return path


def _rect(x: int, y: int, **kw: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, **kw)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:100] or "run"


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
    return Report(root, out, runs, keys, over, table, summary, files, heatmaps, lr_table, ans, sentence)


def lr_summary(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame | None:
    """Wortsman et al.'s LR sensitivity per configuration of the other factors, when the
    completed runs cover more than one learning rate; None otherwise."""
    done = [r for r in runs if r.config and r.summary.get("verdict") not in (None, "failed")]
    others = [k for k in keys if k not in ("train.lr", "lr")]
    frame = pd.DataFrame([{**{k: factor_value(r, k) for k in others}, "train.lr": r.config["train"]["lr"],
                           "initial_loss": initial_loss(r.path),
                           # validation loss, not the last training batch's (one batch is noisy)
                           "final_loss": _float(r.summary.get("final_val_loss"))}
                          for r in done])
    if frame.empty or not varies_lr(frame):
        return None
    return lr_sensitivity(frame, factors=others)


def lr_display(table: pd.DataFrame) -> pd.DataFrame:
    """The LR-sensitivity table for reading: 3 significant digits, the LR grid as text."""
    shown = table.copy()
    for col in ("best_lr", "best_final_loss", "lr_sensitivity"):
        if col in shown:
            shown[col] = shown[col].map(format_number)
    if "lrs" in shown:
        shown["lrs"] = shown["lrs"].map(lambda v: ", ".join(format_number(float(x)) for x in v)
                                        if isinstance(v, (list, tuple)) else str(v))
    return shown


def _markdown(root: Path, out: Path, runs: Sequence[Run], keys: Sequence[str], names: dict[str, str],
              over: pd.DataFrame, summary: pd.DataFrame, heatmaps: dict[str, Path],
              lr_table: pd.DataFrame | None = None, ans: pd.DataFrame | None = None, sentence: str = "") -> str:
    seen = sorted({r.verdict for r in runs}, key=lambda v: (VERDICTS.index(v) if v in VERDICTS else len(VERDICTS), v))
    counts = {v: sum(r.verdict == v for r in runs) for v in seen}
    parts = [f"# Stability report: `{root}`\n",
             f"{len(runs)} run(s), {time.strftime('%Y-%m-%d %H:%M')}: "
             + ", ".join(f"{n} {v}" for v, n in counts.items()) + ". "
             + (f"Factors that differ: {', '.join(f'`{k}`' for k in keys)}." if keys else "No factor differs between runs.")
             + " Every number of every run is in [runs.csv](runs.csv) (NaN and inf written as such, an empty cell"
             " where a value does not apply; in pandas: `pd.read_csv('runs.csv', keep_default_na=False,"
             " na_values=['', 'NaN'])`, so that the verdict `nan` stays a word).\n"]
    if sentence:
        parts.insert(1, f"**{sentence}**\n")
    if ans is not None and not ans.empty:
        parts.insert(2, "Unstable = `exploding`, `scream` or `nan`, out of the runs that did not crash; medians over "
                        "the runs at each value (across all other factors).\n\n" + markdown_table(answer_display(ans)))
    warned = [(r.rel, w) for r in runs for w in r.warnings]
    if warned:
        parts.append(f"**{len(warned)} warning(s)**, see [Warnings](#warnings).\n")
    parts += ["## Runs\n", "First NaN: epoch (1-based), batch within the epoch (0-based), and the module "
              "group that went first. Gradient norm: total norm, mean over each epoch.\n", markdown_table(over)]
    if keys:
        parts += ["## By factor\n", "Share of runs per verdict for each value of each factor (across all other "
                  "factors), and the median over those runs of the last finite epoch-mean gradient norm.\n",
                  markdown_table(factor_display(summary))]
    if lr_table is not None:
        parts += ["## Learning-rate sensitivity\n", "Per configuration of the other factors: the mean over the LR "
                  "grid of min(final validation loss, initial loss) minus the best final validation loss "
                  "(Wortsman et al. 2023, arXiv 2309.14322; the initial loss is the first step's, at init). "
                  "0: every LR reached the best loss; smaller is flatter.\n",
                  markdown_table(lr_display(lr_table))]
    rel_plots = os.path.relpath(out / PLOTS, out)
    parts += ["## Loss, gradient norm and attention logits per epoch\n", f"![curves]({rel_plots}/curves.png)\n",
              "## Gradient norm per epoch\n", f"![gradient norm per epoch]({rel_plots}/grad_norm.png)\n"]
    if heatmaps:
        parts.append("## Unstable runs: gradient norm by module group\n")
        for r in runs:
            if r.rel in heatmaps:
                parts += [f"### {names[r.rel]}: {r.verdict}\n",
                          f"`{r.rel}`" + (f": {r.summary['evidence']}" if r.summary.get("evidence") else "") + "\n",
                          f"![{_slug(r.rel)}]({rel_plots}/{heatmaps[r.rel].name})\n"]
    if warned:
        parts += ["## Warnings\n", "\n".join(f"- `{rel}`: {w}" for rel, w in warned) + "\n"]
    found = diagnostic_warnings(runs)
    if found:
        parts += ["## What the detectors saw\n", "Warnings the runs raised about themselves (`warnings` in each "
                  "`summary.json`), whatever their verdict.\n",
                  "\n".join(f"- `{names.get(rel, rel)}`: {w}" for rel, w in found) + "\n"]
    return "\n".join(parts)


def diagnostic_warnings(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(run, message) for every warning in the runs' summaries (saturated clamps, attention-logit
    growth, a clip that never or always fires, validation loss not improving, undertraining)."""
    return [(r.rel, w.get("message", str(w))) for r in runs for w in (r.summary.get("warnings") or [])
            if isinstance(w, dict)]
