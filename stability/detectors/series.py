"""Measures over a run's number series: spikes in the step series, the grad norm's growth per
epoch and its explosion, the loss's fall per epoch and its divergence from where it started.

    detect_spikes([1, 1.1, 0.9, 1, 40], window=4, z=6, warmup=3)   # [4]
    growth_per_epoch([2.45, 6.66, 16.71])     # ~2.61
    explosion([1.0, 2.5, 6.0, 14.0], factor=2.0, window=3)          # (1, 2.45)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def as_float(v: Any) -> float:
    """`v` as a float, NaN where it is not a number (None, a string): a record's optional value."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def still_learning(val_losses: Sequence[float], rate: float) -> bool:
    """True if the validation loss fell by more than `rate` (relative) per epoch over the last two
    epochs: a model whose output is still collapsed but whose loss keeps falling is undertrained."""
    v = [x for x in val_losses if math.isfinite(x)]
    if len(v) < 3 or v[-3] <= 0:
        return False
    return (v[-1] / v[-3]) ** 0.5 < 1.0 - rate


def detect_spikes(
    values: Sequence[float] | np.ndarray, window: int, z: float, warmup: int, ratio: float = 1.0
) -> list[int]:
    """Indices where a value exceeds the running median of the previous `window` finite values
    by more than `z` robust standard deviations (1.4826 x MAD) and is at least `ratio` times that
    median. Non-finite values are not spikes (they are NaN events) and do not enter the baseline.

    The ratio floor is what keeps a stable run quiet: over a near-flat baseline a robust z of 6
    alone fired five times in a stable default run, at values like 2.32 against a median of 1.75.
    The same test as `SpikeDetector`, over a whole series."""
    detector = SpikeDetector(window, z, warmup, ratio)
    return [i for i, v in enumerate(values) if detector.push(float(v))]


class SpikeDetector:
    """`detect_spikes` one value at a time, for a run in progress: holds only the last `window`
    finite values (the baseline), so its memory does not grow with the run.

        d = SpikeDetector(window=20, z=6, warmup=10, ratio=3)
        [d.push(v) for v in norms]     # True where a spike is
    """

    def __init__(self, window: int, z: float, warmup: int, ratio: float = 1.0) -> None:
        self.z, self.warmup, self.ratio = z, warmup, ratio
        self.history: deque[float] = deque(maxlen=window)
        self.seen = 0  # finite values so far
        self.i = -1  # index of the last value pushed

    def push(self, v: float) -> bool:
        """Whether `v`, the next value of the series, is a spike over the values before it."""
        self.i += 1
        if not math.isfinite(v):
            return False
        spike = False
        if self.i >= self.warmup and self.seen >= 3:
            med = _median(self.history)
            mad = 1.4826 * _median([abs(b - med) for b in self.history])
            scale = max(mad, 0.05 * abs(med), 1e-12)  # a flat baseline must not make noise a spike
            spike = (v - med) / scale > self.z and v >= self.ratio * med
        self.history.append(v)
        self.seen += 1
        return spike


def _median(values: Iterable[float]) -> float:
    """np.median of a short sequence of finite floats, in plain Python (a few microseconds)."""
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def spike_lead(
    first_spike: int | None, first_nan: dict[str, Any] | None, verdict: str, grad_norms: Sequence[float] | np.ndarray
) -> int | None:
    """Steps from the first spike to the event it warned of: the first NaN's step, else, for an
    exploding run, the step of its largest finite grad norm. None without a spike before it."""
    if first_spike is None:
        return None
    if first_nan:
        event = first_nan["step"]
    elif verdict == "exploding":
        g = np.asarray(grad_norms, dtype=float)
        if not np.isfinite(g).any():
            return None
        event = int(np.nanargmax(np.where(np.isfinite(g), g, np.nan)))
    else:
        return None
    return event - first_spike if first_spike <= event else None


def growth_per_epoch(epoch_norms: Sequence[float]) -> float:
    """Geometric-mean growth factor of the gradient norm per epoch over the finite epochs."""
    finite = [v for v in epoch_norms if math.isfinite(v) and v > 0]
    if len(finite) < 2:
        return math.nan
    return (finite[-1] / finite[0]) ** (1.0 / (len(finite) - 1))


def explosion(epoch_norms: Sequence[float], factor: float, window: int) -> tuple[int | None, float]:
    """(first epoch of the first window of `window` consecutive epochs over which the grad norm
    grew by more than `factor` per epoch (geometric mean), the growth over that window), or
    (None, the largest windowed growth). Epochs count from 1; non-finite epochs end a window.

    A window, not the whole run: a trajectory that grows 2.2x per epoch and then collapses or
    goes NaN is exploding, whatever its mean over all epochs. With fewer finite epochs than
    `window`, the window is all of them (at least 2)."""
    x = [float(v) for v in epoch_norms]
    best = math.nan
    for i in range(len(x)):
        seg: list[float] = []
        for v in x[i : i + window]:  # the window, cut at the first non-finite epoch
            if not (math.isfinite(v) and v > 0):
                break
            seg.append(v)
        if len(seg) < 2:
            continue
        g = (seg[-1] / seg[0]) ** (1.0 / (len(seg) - 1))
        best = g if not math.isfinite(best) else max(best, g)
        if g > factor:
            return i + 1, g
    return None, best


def certainly_unstable(
    epoch_norms: Sequence[float], first_nan: dict[str, Any] | None, factor: float, window: int
) -> str | None:
    """Why a run still going is certain to end `nan` or `exploding`, or None: a first NaN (it stays
    in the record), or a full window of `window` finite epochs growing more than `factor` per epoch
    (`explosion` finds it in every longer history too). A shorter window at the end of a history
    is not enough: more epochs can dilute it. Neither is a scream (it must last to the end) nor the
    step peak (its median is over the whole run). Used by `train.stop_early`."""
    if first_nan:
        return f"first non-finite value at step {first_nan['step']}"
    x = [float(v) for v in epoch_norms]
    for i in range(len(x) - window + 1):
        seg = x[i : i + window]
        if all(math.isfinite(v) and v > 0 for v in seg):
            g = (seg[-1] / seg[0]) ** (1.0 / (window - 1))
            if g > factor:
                return f"grad norm grew {g:.2f}x per epoch over epochs {i + 1}-{i + window}"
    return None


def learning_rate_per_epoch(val_losses: Sequence[float]) -> float:
    """Relative fall of the validation loss per epoch over the last two intervals (geometric
    mean; one interval with two points): 0.1 = falling 10% per epoch, negative = rising. NaN
    with fewer than two finite positive values."""
    v = [x for x in val_losses if math.isfinite(x) and x > 0]
    if len(v) < 2:
        return math.nan
    k = min(2, len(v) - 1)
    return 1.0 - (v[-1] / v[-1 - k]) ** (1.0 / k)


def stretch_learning_rate(losses: Sequence[float], epochs: Sequence[int], first: int, last: int) -> float:
    """Relative fall of the validation loss per epoch through a collapse of epochs `first`..`last`
    (geometric mean, from the epoch before `first` to `last`): 0.1 = falling 10% per epoch.

    losses: the loss at initialisation, then one per entry of `epochs`; a non-finite loss before
    the stretch is skipped back to the last finite one. NaN when either end is missing."""
    by_epoch = dict(zip(epochs, losses[1:]))
    end = by_epoch.get(last, math.nan)
    before = [(0, losses[0]), *((e, v) for e, v in zip(epochs, losses[1:]) if e < first)]
    start_epoch, start = next(((e, v) for e, v in reversed(before) if math.isfinite(v) and v > 0), (0, math.nan))
    if not (math.isfinite(end) and end > 0 and math.isfinite(start)):
        return math.nan
    return 1.0 - (end / start) ** (1.0 / max(1, last - start_epoch))


def divergence(vals: Sequence[float], reference: float) -> tuple[float, float]:
    """(the last evaluated validation loss, its ratio to `reference`, the loss at initialisation
    or a no-learning baseline). A non-finite last value has ratio inf; NaN without a reference."""
    if not vals:
        return math.nan, math.nan
    last = float(vals[-1])
    if not math.isfinite(reference) or reference <= 0:
        return last, math.nan
    return last, (last / reference if math.isfinite(last) else math.inf)


def peak_norm(step_norms: Sequence[float], factor: float) -> tuple[int, float] | None:
    """(index, ratio) of the largest finite step norm if it exceeds the median finite step norm by
    more than `factor`, else None: a gradient explosion even when later steps recover. Huge is
    not non-finite: a norm of 1e31 from finite gradients is an explosion, not a NaN."""
    x = np.asarray(step_norms, dtype=float)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return None
    i = int(np.argmax(np.where(ok, x, -np.inf)))
    med = float(np.median(x[ok]))
    ratio = x[i] / med if med > 0 else math.inf
    return (i, ratio) if ratio > factor else None
