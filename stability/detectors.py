"""Detectors: pure functions over recorded histories, easy to test on hand-made sequences.

    scream_score([7, 7, 7, 7, 3])            # dominant 0.8, longest run 0.8, ...
    detect_spikes([1, 1.1, 0.9, 1, 40], window=4, z=6, warmup=3)   # [4]
    growth_per_epoch([2.45, 6.66, 16.71])     # ~2.61
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stability.formatting import nan_place
from stability.record import verdicts as vd


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
    for a, b in itertools.pairwise(t):
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


def scream_onset(collapsed: Sequence[bool | None], epochs: Sequence[int], min_epochs: int = 1) -> int | None:
    """The epoch from which the output stayed collapsed to the end, or None.

    The collapse must cover at least `min_epochs` evaluated epochs: one collapsed epoch at the
    end is a state, not yet a scream. An untrained model's output is often near-constant at
    first and learns its way out; that is not a scream either. `None` entries (epochs not
    evaluated, e.g. stopped at a NaN) are skipped.
    """
    onset, length = None, 0
    for flag, epoch in zip(collapsed, epochs):
        if flag is None:
            continue
        onset, length = ((onset or epoch), length + 1) if flag else (None, 0)
    return onset if onset is not None and length >= min_epochs else None


def still_learning(val_losses: Sequence[float], rate: float) -> bool:
    """True if the validation loss fell by more than `rate` (relative) per epoch over the last two
    epochs: a model whose output is still collapsed but whose loss keeps falling is undertrained."""
    v = [x for x in val_losses if math.isfinite(x)]
    if len(v) < 3 or v[-3] <= 0:
        return False
    return (v[-1] / v[-3]) ** 0.5 < 1.0 - rate


def detect_spikes(values: Sequence[float], window: int, z: float, warmup: int, ratio: float = 1.0) -> list[int]:
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


def spike_lead(first_spike: int | None, first_nan: dict[str, Any] | None, verdict: str,
               grad_norms: Sequence[float]) -> int | None:
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
        for v in x[i:i + window]:  # the window, cut at the first non-finite epoch
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


def certainly_unstable(epoch_norms: Sequence[float], first_nan: dict[str, Any] | None, factor: float,
                       window: int) -> str | None:
    """Why a run still going is certain to end `nan` or `exploding`, or None: a first NaN (it stays
    in the record), or a full window of `window` finite epochs growing more than `factor` per epoch
    (`explosion` finds it in every longer history too). A shorter window at the end of a history
    is not enough: more epochs can dilute it. Neither is a scream (it must last to the end) nor the
    step peak (its median is over the whole run). Used by `train.stop_early`."""
    if first_nan:
        return f"first non-finite value at step {first_nan['step']}"
    x = [float(v) for v in epoch_norms]
    for i in range(len(x) - window + 1):
        seg = x[i:i + window]
        if all(math.isfinite(v) and v > 0 for v in seg):
            g = (seg[-1] / seg[0]) ** (1.0 / (window - 1))
            if g > factor:
                return f"grad norm grew {g:.2f}x per epoch over epochs {i + 1}-{i + window}"
    return None


def diagnose(epochs: Sequence[dict[str, Any]], first_nan: dict[str, Any] | None, clip: float | None,
             explode_factor: float, explode_window: int, scream_min_epochs: int,
             learning_rate: float, stage_clamp: float = 0.5, logit_growth: float = 10.0,
             peak: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every finding of a finished run, its primary verdict and the warnings a researcher should
    see even in a stable run.

    epochs: the epoch records (`grad_norm_mean`, `grad_norm_max`, `val_loss`, `collapsed`,
    `clip_rate`, `stage_clamp_rate`, `health_summary`), in order. Returns {"verdict", "evidence",
    "flags": [{"flag", "epoch"|"step", "evidence"}], "warnings": [{"warning", "message", ...}],
    "scream_epoch"}. The verdict is the most severe flag (`verdicts.SEVERITY`), else `stable`.
    `peak` ({value, ratio, step, epoch, batch}, from `peak_norm`) is a step whose finite grad norm
    was huge against the run's median step: an explosion even when every gradient was finite.
    """
    norms = [e["grad_norm_mean"] for e in epochs]
    vals = [e["val_loss"] for e in epochs]
    series = ", ".join(f"{v:.3g}" for v in norms)
    flags: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    if first_nan:
        flags.append({"flag": "nan", "epoch": first_nan["epoch"], "step": first_nan["step"],
                      "evidence": f"first non-finite {first_nan['kind']} at epoch {first_nan['epoch']}, batch "
                                  f"{first_nan['batch']} (step {first_nan['step']}), {nan_place(first_nan)}"})
    start, growth = explosion(norms, explode_factor, explode_window)
    if start is not None:
        flags.append({"flag": "exploding", "epoch": start, "growth": growth,
                      "evidence": f"grad norm grew {growth:.2f}x per epoch from epoch {start} "
                                  f"(> {explode_factor} over {explode_window} epochs): {series}"})
    if peak:
        huge = (f"grad norm reached {peak['value']:.3g} at epoch {peak['epoch']}, batch {peak['batch']} (step "
                f"{peak['step']}), {peak['ratio']:.3g}x the run's median step, with every gradient finite")
        if start is None:
            flags.append({"flag": "exploding", "epoch": peak["epoch"], "step": peak["step"], "evidence": huge})
        else:
            flags[-1]["evidence"] += f"; {huge}"
    onset = scream_onset([e["collapsed"] for e in epochs], [e["epoch"] for e in epochs], scream_min_epochs)
    if onset is not None and onset == epochs[0]["epoch"] and still_learning(vals, learning_rate):
        warnings.append({"warning": "undertrained", "epoch": onset,
                         "message": f"output collapsed from epoch {onset} to the end while the validation loss is "
                                    f"still falling (>{learning_rate:.0%} per epoch): undertrained, not a scream; "
                                    "train longer"})
        onset = None
    if onset is not None:
        flags.append({"flag": "scream", "epoch": onset,
                      "evidence": f"output collapsed to one repeated token from epoch {onset} to the end "
                                  f"({epochs[-1]['epoch'] - onset + 1} epochs)"})
    warnings += _warnings(epochs, clip, stage_clamp, logit_growth)
    verdict, evidence = vd.STABLE, f"grad norm per epoch {series}"
    for f in sorted(flags, key=lambda f: vd.severity(f["flag"])):
        verdict, evidence = f["flag"], f["evidence"]
        break
    if verdict == vd.STABLE and math.isfinite(growth):
        evidence += f" (at most {growth:.2f}x per epoch over {explode_window} epochs)"
    return {"verdict": verdict, "evidence": evidence, "flags": flags, "warnings": warnings, "scream_epoch": onset}


def _warnings(epochs: Sequence[dict[str, Any]], clip: float | None, stage_clamp: float,
              logit_growth: float) -> list[dict[str, Any]]:
    """What a researcher should see even in a stable run (see `diagnose`)."""
    out: list[dict[str, Any]] = []
    if not epochs:
        return out
    rates = np.array([e.get("stage_clamp_rate") or [] for e in epochs], dtype=float)
    if rates.size:
        for i, r in enumerate(np.nanmean(rates, axis=0)):
            if r > stage_clamp:
                out.append({"warning": "clamp_saturated", "stage": i, "rate": float(r),
                            "message": f"stage {i}'s RMS-match clamp bound on {r:.0%} of steps: its scale is "
                                       "pinned at a bound, so the stage cannot reach the target's RMS"})
    logits = [(e["epoch"], (e.get("health_summary") or {}).get("attn_logit_max", math.nan)) for e in epochs]
    logits = [(ep, v) for ep, v in logits if v is not None and math.isfinite(v) and v > 0]
    if len(logits) >= 2 and logits[-1][1] / logits[0][1] >= logit_growth:
        out.append({"warning": "attn_logit_growth", "from": logits[0][1], "to": logits[-1][1],
                    "message": f"max attention logit grew {logits[-1][1] / logits[0][1]:.0f}x "
                               f"({logits[0][1]:.3g} at epoch {logits[0][0]} -> {logits[-1][1]:.3g} at epoch "
                               f"{logits[-1][0]}): attention-entropy collapse ahead (Wortsman et al. 2023, "
                               "arXiv 2309.14322); qk_norm caps it"})
    if clip is not None:
        clip_rates = [e["clip_rate"] for e in epochs if math.isfinite(e.get("clip_rate", math.nan))]
        peak = max((e["grad_norm_max"] for e in epochs if math.isfinite(e["grad_norm_max"])), default=math.nan)
        if clip_rates and max(clip_rates) == 0:
            out.append({"warning": "clip_never", "clip": clip, "grad_norm_max": peak,
                        "message": f"clip={clip:g} never fired (largest grad norm {peak:.3g}): "
                                   "at this setting the clip axis changes nothing"})
        elif clip_rates and min(clip_rates) >= 0.95:
            out.append({"warning": "clip_always", "clip": clip, "rate": float(np.mean(clip_rates)),
                        "message": f"clip={clip:g} fired on {np.mean(clip_rates):.0%} of steps: every update is "
                                   "clipped, so the learning rate is effectively lr x clip / grad norm"})
    vals = [(e["epoch"], e["val_loss"]) for e in epochs if math.isfinite(e.get("val_loss", math.nan))]
    if len(vals) >= 2 and min(v for _, v in vals[1:]) >= vals[0][1]:
        out.append({"warning": "val_not_improving", "first": vals[0][1], "last": vals[-1][1],
                    "message": f"validation loss never went below its epoch-{vals[0][0]} value "
                               f"{vals[0][1]:.4g} (last {vals[-1][1]:.4g})"})
    return out


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
