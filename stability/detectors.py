"""Detectors: pure functions over recorded histories, easy to test on hand-made sequences.

    scream_score([7, 7, 7, 7, 3])            # dominant 0.8, longest run 0.8, ...
    detect_spikes([1, 1.1, 0.9, 1, 40], window=4, z=6, warmup=3)   # [4]
    growth_per_epoch([2.45, 6.66, 16.71])     # ~2.61
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np


def scream_score(tokens: Sequence[int], n: int = 4) -> dict[str, float]:
    """How collapsed one token sequence is.

    dominant: share of the most common token; longest_run: longest run of one token over the
    length; distinct_n: distinct n-grams over all n-grams (1.0: no n-gram repeats);
    seq_rep_n: share of n-grams that repeat an earlier one (Welleck et al. 2020, arXiv 1908.04319).
    """
    t = list(tokens)
    L = len(t)
    if L == 0:
        return {"dominant": math.nan, "longest_run": math.nan, f"distinct_{n}": math.nan,
                f"seq_rep_{n}": math.nan}
    dominant = Counter(t).most_common(1)[0][1] / L
    longest = run = 1
    for a, b in zip(t, t[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    grams = [tuple(t[i: i + n]) for i in range(L - n + 1)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    return {"dominant": dominant, "longest_run": longest / L, f"distinct_{n}": distinct,
            f"seq_rep_{n}": 1.0 - distinct if grams else 0.0}


def mean_scores(rows: Sequence[Sequence[int]], n: int = 4) -> dict[str, float]:
    """Average `scream_score` over several sequences (e.g. the items of a validation batch)."""
    scores = [scream_score(r, n) for r in rows]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def loop_share(tokens: Sequence[int], max_period: int) -> float:
    """Share of the sequence covered by the loop it ends in, for loops of period <= max_period.

    `eeee` and `e e e ` end in loops of period 1 and 2; greedy decoding, once in such a loop,
    stays there. A suffix counts only if it repeats its period at least twice; 0.0 if none does.
    Longer loops ("the the the ") are the ordinary repetition of greedy decoding (Welleck et al.
    2020, arXiv 1908.04319, report seq-rep-4 = 0.43 for greedy text), not a collapse.
    """
    t = list(tokens)
    L = len(t)
    best = 0
    for p in range(1, min(max_period, L // 2) + 1):
        j = L - 1
        while j - p >= 0 and t[j] == t[j - p]:
            j -= 1
        covered = (L - 1 - j) + p  # positions j+1..L-1 repeat the p before them
        if covered >= 2 * p:
            best = max(best, covered)
    return best / L if L else math.nan


def is_degenerate(score: dict[str, float], dominant: float, longest_run: float,
                  loop: float | None = None) -> bool:
    """One token dominates, or repeats in one run, or (with `loop`) the sequence ends in a short loop."""
    looped = loop is not None and score.get("loop", 0.0) >= loop
    return score["dominant"] >= dominant or score["longest_run"] >= longest_run or looped


def scream_check(output: dict[str, float], target: dict[str, float], dominant: float,
                 longest_run: float, loop: float | None = None) -> bool:
    """A scream: the output is degenerate and the target it should match is not."""
    return (is_degenerate(output, dominant, longest_run, loop)
            and not is_degenerate(target, dominant, longest_run, loop))


def scream_onset(collapsed: Sequence[bool | None], epochs: Sequence[int]) -> int | None:
    """The epoch from which the output stayed collapsed to the end, or None.

    An untrained model's output is often near-constant at first and learns its way out; that
    is not a scream. `None` entries (epochs not evaluated, e.g. stopped at a NaN) are skipped.
    """
    onset = None
    for flag, epoch in zip(collapsed, epochs):
        if flag is None:
            continue
        onset = (onset or epoch) if flag else None
    return onset


def detect_spikes(values: Sequence[float], window: int, z: float, warmup: int) -> list[int]:
    """Indices where a value exceeds the running median of the previous `window` finite values
    by more than `z` robust standard deviations (1.4826 x MAD). Non-finite values are not
    spikes (they are NaN events) and do not enter the baseline."""
    x = np.asarray(values, dtype=float)
    spikes: list[int] = []
    history: list[float] = []
    for i, v in enumerate(x):
        if not math.isfinite(v):
            continue
        if i >= warmup and len(history) >= 3:
            base = np.asarray(history[-window:])
            med = float(np.median(base))
            mad = 1.4826 * float(np.median(np.abs(base - med)))
            scale = max(mad, 0.05 * abs(med), 1e-12)  # a flat baseline must not make noise a spike
            if (v - med) / scale > z:
                spikes.append(i)
        history.append(float(v))
    return spikes


def growth_per_epoch(epoch_norms: Sequence[float]) -> float:
    """Geometric-mean growth factor of the gradient norm per epoch over the finite epochs."""
    finite = [v for v in epoch_norms if math.isfinite(v) and v > 0]
    if len(finite) < 2:
        return math.nan
    return (finite[-1] / finite[0]) ** (1.0 / (len(finite) - 1))


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


def verdict(first_nan: dict[str, Any] | None, scream_epoch: int | None, epoch_norms: Sequence[float],
            explode_factor: float, peak: dict[str, Any] | None = None) -> tuple[str, str]:
    """(verdict, evidence). Precedence: nan > scream > exploding > stable. `failed` is set by
    the runner when the job crashed, before any of these are looked at. `peak` ({value, ratio,
    step, epoch, batch}, from `peak_norm`) is a step whose finite grad norm was huge: an
    explosion, said in the evidence of whichever verdict wins."""
    huge = (f"grad norm reached {peak['value']:.3g} at epoch {peak['epoch']}, batch {peak['batch']} (step "
            f"{peak['step']}), {peak['ratio']:.3g}x the run's median step, with every gradient finite") if peak else ""
    if first_nan:
        return "nan", (f"first non-finite {first_nan['kind']} at epoch {first_nan['epoch']}, batch "
                       f"{first_nan['batch']} (step {first_nan['step']}), in {first_nan['module']}")
    if scream_epoch is not None:
        return "scream", f"output collapsed to one repeated code at epoch {scream_epoch}" + (f"; {huge}" if huge else "")
    g = growth_per_epoch(epoch_norms)
    norms = ", ".join(f"{v:.3g}" for v in epoch_norms)
    if math.isfinite(g) and g > explode_factor:
        return "exploding", f"grad norm grew {g:.2f}x per epoch (> {explode_factor}): {norms}" + (f"; {huge}" if huge else "")
    if huge:
        return "exploding", f"{huge}; grad norm per epoch {norms}"
    return "stable", f"grad norm per epoch {norms}" + (f" ({g:.2f}x per epoch)" if math.isfinite(g) else "")
