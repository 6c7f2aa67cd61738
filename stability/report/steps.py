"""Per-step series of a run for drawing: read from metrics.jsonl, thinned for the screen without
losing a spike, and the per-group departure (the first step a module group's gradient norm leaves
its running band).

    s = load_steps(run)                      # StepSeries: step, loss, grad norm, clipped, finite, groups
    x, y = minmax_downsample(s.step, s.grad, 1000)   # at most ~1000 points, each bucket's min and max kept
    departures(s, window=20, z=6, warmup=10, ratio=3)  # group -> first step out of its band (or None)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stability.detectors.series import SpikeDetector, detect_spikes
from stability.record import format as rf
from stability.report.loading import Run
from stability.storage import read_jsonl


@dataclass
class StepSeries:
    """One run's step records as arrays (length = steps recorded). Non-finite values stay NaN/inf.
    `groups` maps a module group to its gradient norm per step (`grad/<group>`, NaN where a step
    lacks it); `skipped` is a step whose update was not applied (non-finite under
    train.on_nan=skip, or `recover/skipped` of train.on_spike=skip)."""

    step: np.ndarray  # (N,) int, global step
    epoch: np.ndarray  # (N,) int, 1-based
    loss: np.ndarray  # (N,) float
    grad: np.ndarray  # (N,) float, total norm before clipping
    clipped: np.ndarray  # (N,) bool
    finite: np.ndarray  # (N,) bool
    skipped: np.ndarray  # (N,) bool
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (N,) float

    def __len__(self) -> int:
        return len(self.step)


def _col(records: list[dict[str, Any]], key: str, default: float = math.nan) -> np.ndarray:
    out = np.empty(len(records))
    for i, r in enumerate(records):
        v = r.get(key, default)
        try:
            out[i] = float(v) if v is not None else default
        except (TypeError, ValueError):
            out[i] = default
    return out


def load_steps(run: Run) -> StepSeries:
    """The run's metrics.jsonl as arrays (unparsable lines skipped: the loader warned already)."""
    records, _ = read_jsonl(run.path / rf.METRICS)
    records = [r for r in records if isinstance(r.get(rf.STEP), int)]
    finite = np.array([bool(r.get(rf.FINITE, True)) for r in records], dtype=bool)
    on_nan = ((run.config or {}).get("train") or {}).get("on_nan")
    skipped = np.array([bool(r.get("recover/skipped", r.get("skipped", False))) for r in records], dtype=bool)
    if on_nan == "skip":
        skipped |= ~finite
    groups = [
        k[len("grad/") :]
        for k in dict.fromkeys(k for r in records[:1] for k in r)
        if k.startswith("grad/") and k not in (rf.GRAD_NORM, rf.CLIPPED)
    ]
    return StepSeries(
        step=_col(records, rf.STEP).astype(int),
        epoch=_col(records, rf.EPOCH, 0).astype(int),
        loss=_col(records, rf.LOSS),
        grad=_col(records, rf.GRAD_NORM),
        clipped=_col(records, rf.CLIPPED, 0.0) > 0,
        finite=finite,
        skipped=skipped,
        groups={g: _col(records, rf.grad_key(g)) for g in groups},
    )


def minmax_downsample(x: np.ndarray, y: np.ndarray, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~`max_points` points of (x, y) for drawing: the series cut into max_points/2
    buckets and each bucket's smallest and largest finite value kept, in step order, so a spike
    (a one-step extreme) is always drawn at its own x and never averaged away. Non-finite values
    come back as NaN (one per bucket that had any): a gap in the drawn line, to be marked apart.
    Series of at most `max_points` come back whole."""
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    y = np.where(np.isfinite(y), y, np.nan)
    if len(y) <= max_points:
        return x, y
    n_buckets = max(1, max_points // 2)
    edges = np.linspace(0, len(y), n_buckets + 1).astype(int)
    keep: list[int] = []
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        seg = y[a:b]
        bad = np.isnan(seg)
        picked = {a + int(np.argmax(bad))} if bad.any() else set()
        if not bad.all():
            picked |= {a + int(np.nanargmin(seg)), a + int(np.nanargmax(seg))}
        keep.extend(sorted(picked))
    idx = np.array(keep, dtype=int)
    return x[idx], y[idx]


def detect_settings(run: Run) -> dict[str, float]:
    """The run's own spike-detector settings (config `detect.spike_*`), the defaults where absent."""
    d = (run.config or {}).get("detect") or {}
    return {
        "window": int(d.get("spike_window", 20)),
        "z": float(d.get("spike_z", 6.0)),
        "warmup": int(d.get("spike_warmup", 10)),
        "ratio": float(d.get("spike_ratio", 3.0)),
    }


def spikes(values: np.ndarray, settings: dict[str, float]) -> np.ndarray:
    """Indices of spikes in a step series, by the run's own detector (`detectors.series.detect_spikes`)."""
    return np.array(
        detect_spikes(list(values), int(settings["window"]), settings["z"], int(settings["warmup"]), settings["ratio"]),
        dtype=int,
    )


def departures(series: StepSeries, settings: dict[str, float]) -> dict[str, int | None]:
    """Per module group, the first step its gradient norm leaves its running band: a spike by the
    run's own detector (above the running median of the last `window` steps by more than `z`
    robust standard deviations and `ratio` times it), or the first non-finite value; None if it
    never does."""
    out: dict[str, int | None] = {}
    for g, values in series.groups.items():
        det = SpikeDetector(int(settings["window"]), settings["z"], int(settings["warmup"]), settings["ratio"])
        found = None
        for s, v in zip(series.step, values):
            if not math.isfinite(v) or det.push(float(v)):
                found = int(s)
                break
        out[g] = found
    return out
