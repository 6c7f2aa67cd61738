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
        return {"dominant": math.nan, "longest_run": math.nan, f"distinct_{n}": math.nan, f"seq_rep_{n}": math.nan}
    dominant = Counter(t).most_common(1)[0][1] / L
    longest = run = 1
    for a, b in itertools.pairwise(t):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    grams = [tuple(t[i : i + n]) for i in range(L - n + 1)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    return {
        "dominant": dominant,
        "longest_run": longest / L,
        f"distinct_{n}": distinct,
        f"seq_rep_{n}": 1.0 - distinct if grams else 0.0,
    }


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


def is_degenerate(
    score: dict[str, float],
    dominant: float,
    longest_run: float,
    loop: float | None = None,
    seq_rep: float | None = None,
    n: int = 4,
) -> bool:
    """One token dominates, or repeats in one run, or (with `loop`) the sequence ends in a short
    loop, or (with `seq_rep`) at least that share of its n-grams repeat an earlier one."""
    looped = loop is not None and score.get("loop", 0.0) >= loop
    repeats = seq_rep is not None and score.get(f"seq_rep_{n}", 0.0) >= seq_rep
    return score["dominant"] >= dominant or score["longest_run"] >= longest_run or looped or repeats


def scream_check(
    output: dict[str, float],
    target: dict[str, float],
    dominant: float,
    longest_run: float,
    loop: float | None = None,
    seq_rep: float | None = None,
    n: int = 4,
) -> bool:
    """A collapsed epoch: the output is degenerate by a measure by which the target it should
    match is not (`collapse_level` >= 1 against the target)."""
    level = collapse_level(output, dominant, longest_run, loop, seq_rep, n, target)
    return bool(math.isfinite(level) and level >= 1.0)


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


# Primary verdict: the most severe finding wins. A crash (failed) is set by the runner before any
# of these; a NaN ends the measurement; an explosion explains a collapse or a divergence that
# comes with it, so it outranks both; a run whose loss ended above where it started (diverged)
# failed whatever its output looks like, so it outranks the scream; a run too short for the
# detectors (inconclusive) is only "not found unstable", so it sits between the unstable verdicts
# and stable.
SEVERITY = vd.SEVERITY  # ("failed", "nan", "exploding", "diverged", "scream", "inconclusive", "stable")
UNSTABLE = vd.UNSTABLE  # the verdicts that count as unstable


def collapse_level(
    score: dict[str, float],
    dominant: float,
    longest_run: float,
    loop: float | None = None,
    seq_rep: float | None = None,
    n: int = 4,
    target: dict[str, float] | None = None,
) -> float:
    """How far a token sequence's scores are past the degeneracy thresholds: the largest of
    dominant / `dominant`, longest_run / `longest_run`, loop / `loop` and seq_rep_n / `seq_rep`
    (the last two only where given and scored). >= 1: degenerate; 0.9: every measure is at least
    10% below its threshold. With `target` (the same scores of the real data), a measure counts
    only where the target itself is below its threshold: repetition is degenerate only against a
    target that does not repeat like that (seq-rep-n and distinct-n of Welleck et al. 2020, arXiv
    1908.04319, compare model text with human text the same way). NaN without scores.

        collapse_level({"dominant": 0.3, "longest_run": 0.1, "seq_rep_4": 0.83}, 0.6, 0.5, seq_rep=0.5,
                       target={"dominant": 0.2, "longest_run": 0.05, "seq_rep_4": 0.09})   # 1.66
    """
    pairs = [("dominant", dominant), ("longest_run", longest_run)]
    if loop is not None:
        pairs.append(("loop", loop))
    if seq_rep is not None:
        pairs.append((f"seq_rep_{n}", seq_rep))
    ratios = []
    for key, threshold in pairs:
        if key not in score:
            continue
        if target and key in target and target[key] >= threshold:
            continue  # the real data repeats like this itself: not a collapse by this measure
        ratios.append(score[key] / threshold)
    finite = [r for r in ratios if math.isfinite(r)]
    return max(finite) if finite else math.nan


def collapse_states(levels: Sequence[float | None], band: float) -> list[bool | None]:
    """The collapsed state of each epoch, with hysteresis: an output enters the collapsed state
    when its `collapse_level` reaches 1 and leaves it only when the level falls below 1 - `band`.
    A collapse of eight epochs is not ended by one epoch at 0.58 against a threshold of 0.6.
    None (not evaluated) keeps the state and yields None."""
    out: list[bool | None] = []
    state = False
    for lv in levels:
        if lv is None or not math.isfinite(lv):
            out.append(None)
            continue
        state = lv >= (1.0 - band if state else 1.0)
        out.append(state)
    return out


def collapse_stretches(collapsed: Sequence[bool | None], epochs: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first epoch, last epoch, evaluated epochs) of every stretch of collapsed epochs, in order;
    None entries (not evaluated) neither extend nor end a stretch."""
    out: list[tuple[int, int, int]] = []
    cur: list[int] = []
    for flag, epoch in zip(collapsed, epochs):
        if flag is None:
            continue
        if flag:
            cur.append(epoch)
        elif cur:
            out.append((cur[0], cur[-1], len(cur)))
            cur = []
    if cur:
        out.append((cur[0], cur[-1], len(cur)))
    return out


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


def diagnose(
    epochs: Sequence[dict[str, Any]],
    first_nan: dict[str, Any] | None,
    clip: float | None,
    explode_factor: float,
    explode_window: int,
    scream_min_epochs: int,
    learning_rate: float,
    stage_clamp: float = 0.5,
    logit_growth: float = 10.0,
    peak: dict[str, Any] | None = None,
    *,
    init: dict[str, Any] | None = None,
    band: float = 0.1,
    scream: Any = None,
    attn_logit_level: float = 50.0,
    attn_entropy_level: float = 0.1,
    first_train_loss: float = math.nan,
) -> dict[str, Any]:
    """Every finding of a finished run, its primary verdict and the warnings a researcher should
    see even in a stable run.

    epochs: the epoch records (`grad_norm_mean`, `grad_norm_max`, `val_loss`, `collapsed`,
    `scores`, `target_scores`, `clip_rate`, `stage_clamp_rate`, `health_summary`), in order.
    init: the evaluation before the first step ({"val_loss", "baseline_loss", "baseline",
    "collapsed"}: the validation loss at initialisation, the workload's no-learning baseline, e.g.
    the unigram entropy of the text, and whether the untrained output was already collapsed).
    first_train_loss: the first step's training loss, taken before any update: the reference for
    divergence when the run has no validation data (its epochs' mean training `loss` is compared). scream: the `detect.scream` thresholds (dominant, longest_run, loop,
    seq_rep, n), for the collapse's hysteresis; without them the epochs' `collapsed` is used as is.
    band: relative width around a threshold within which a finding is `borderline`, and the
    hysteresis of the collapsed state.

    Verdicts (most severe first, `SEVERITY`): nan; exploding (the grad norm grew more than
    `explode_factor` per epoch over `explode_window` epochs, or one step's was huge: `peak`);
    diverged (the last validation loss is above the loss at initialisation, or non-finite: the
    run ended worse than it started; without validation data the last epoch's mean training loss
    against the first step's; Wortsman et al. 2023, arXiv 2309.14322, count such a run as a
    complete failure); scream (a collapse of at least `scream_min_epochs` evaluated epochs, not
    the untrained model's output learning its way out, not a collapse the model recovered from
    while its validation loss fell faster than `learning_rate` per epoch through it (a
    `transient_collapse` warning), not an undertrained run); inconclusive (nothing unstable found
    in fewer evaluated epochs than the detectors need; an output collapsed to the end while the
    validation loss still falls below its start: undertrained or a scream cannot be told apart;
    an output collapsed from initialisation to the end with the loss within `band` of its start:
    `never_learned`); stable.

    Returns {"verdict", "evidence", "flags": [{"flag", "epoch"|"step", "evidence"}],
    "warnings": [{"warning", "message", ...}], "borderline": [{"what", "value", "threshold",
    "message"}], "scream_epoch", "val_loss_init", "baseline_loss", "loss_ratio"}.
    """
    init = init or {}
    norms = [e["grad_norm_mean"] for e in epochs]
    vals = [e.get("val_loss", math.nan) for e in epochs]
    series = ", ".join(f"{v:.3g}" for v in norms)
    flags: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    borderline: list[dict[str, Any]] = []
    lo_b, hi_b = 1.0 - band, 1.0 + band
    if first_nan:
        flags.append(
            {
                "flag": "nan",
                "epoch": first_nan["epoch"],
                "step": first_nan["step"],
                "evidence": f"first non-finite {first_nan['kind']} at epoch {first_nan['epoch']}, batch "
                f"{first_nan['batch']} (step {first_nan['step']}), {nan_place(first_nan)}",
            }
        )
    window = min(explode_window, max(2, sum(math.isfinite(v) for v in norms)))
    start, growth = explosion(norms, explode_factor, explode_window)
    if start is not None:
        flags.append(
            {
                "flag": "exploding",
                "epoch": start,
                "growth": growth,
                "evidence": f"grad norm grew {growth:.2f}x per epoch from epoch {start} "
                f"(> {explode_factor} over {window} epochs): {series}",
            }
        )
    if math.isfinite(growth) and lo_b * explode_factor <= growth <= hi_b * explode_factor:
        borderline.append(
            {
                "what": "grad norm growth",
                "value": growth,
                "threshold": explode_factor,
                "message": f"grad norm growth {growth:.2f}x per epoch is within {band:.0%} of the "
                f"exploding threshold {explode_factor:g} (detect.explode_factor)",
            }
        )
    if peak:
        huge = (
            f"grad norm reached {peak['value']:.3g} at epoch {peak['epoch']}, batch {peak['batch']} (step "
            f"{peak['step']}), {peak['ratio']:.3g}x the run's median step, with every gradient finite"
        )
        if start is None:
            flags.append({"flag": "exploding", "epoch": peak["epoch"], "step": peak["step"], "evidence": huge})
        else:
            flags[-1]["evidence"] += f"; {huge}"

    # divergence: the last validation loss against the loss at initialisation (validation against validation)
    init_val = _num(init.get("val_loss"))
    baseline = _num(init.get("baseline_loss"))
    first_train = _num(first_train_loss)
    has_val = any(math.isfinite(_num(v)) for v in vals)
    loss_name = "validation loss"
    if math.isfinite(init_val):
        reference, ref_name = init_val, "its validation loss at initialisation"
    elif math.isfinite(baseline):
        reference, ref_name = baseline, f"the no-learning baseline ({init.get('baseline') or 'baseline'})"
    elif not has_val and math.isfinite(first_train):
        # No validation data (a monitor, Trainer or Lightning run without `val`): the training loss
        # against the first step's, taken before any update, so still the loss at initialisation
        vals = [_num(e.get("loss", math.nan)) for e in epochs]
        loss_name = "mean training loss of the last epoch (no validation data)"
        reference, ref_name = first_train, "the first step's training loss"
    else:
        reference, ref_name = math.nan, ""
    unjudged: list[dict[str, Any]] = []  # said after the findings: what could not be judged
    if not has_val:
        unjudged.append(
            {
                "warning": "no_validation",
                "message": "no validation data: the scream check did not run"
                + (
                    f", and divergence was judged on the training loss against {ref_name}"
                    if math.isfinite(reference)
                    else ", and divergence was not judged (no loss at initialisation to compare with)"
                ),
            }
        )
    elif not math.isfinite(reference):
        unjudged.append(
            {
                "warning": "divergence_not_judged",
                "message": "no validation loss at initialisation and no no-learning baseline: whether the run "
                "ended worse than it started was not judged",
            }
        )
    evaluated = list(vals)
    last, ratio = divergence(evaluated, reference) if evaluated else (math.nan, math.nan)
    if not first_nan and evaluated and (ratio > 1.0 or (not math.isfinite(last) and math.isfinite(ratio))):
        flags.append(
            {
                "flag": "diverged",
                "epoch": epochs[-1]["epoch"],
                "ratio": ratio,
                "evidence": f"{loss_name} ended at {last:.4g}, above {ref_name} {reference:.4g} "
                f"({ratio:.3g}x): the run ended worse than it started",
            }
        )
    if math.isfinite(ratio) and lo_b <= ratio <= hi_b:
        borderline.append(
            {
                "what": "final loss",
                "value": ratio,
                "threshold": 1.0,
                "message": f"{loss_name} ended at {last:.4g}, within {band:.0%} of {ref_name} "
                f"{reference:.4g}: cannot tell a run that barely learned from one that diverged",
            }
        )
    if (
        math.isfinite(init_val)
        and math.isfinite(baseline)
        and math.isfinite(last)
        and last > baseline
        and not any(f["flag"] == "diverged" for f in flags)
    ):
        warnings.append(
            {
                "warning": "above_baseline",
                "baseline": baseline,
                "last": last,
                "message": f"validation loss ended at {last:.4g}, above the no-learning baseline "
                f"{baseline:.4g} ({init.get('baseline') or 'baseline'}): the model has not "
                "learned more than that baseline predicts",
            }
        )

    # the scream: a collapse of at least scream_min_epochs evaluated epochs, with hysteresis
    ep_nums = [e["epoch"] for e in epochs]
    levels = [_level(e, scream) for e in epochs]
    states = (
        collapse_states(levels, band)
        if scream is not None and any(lv is not None and math.isfinite(lv) for lv in levels)
        else [e.get("collapsed") for e in epochs]
    )
    n_eval = sum(s is not None for s in states)
    last_eval = next((ep for s, ep in zip(reversed(states), reversed(ep_nums)) if s is not None), None)
    first_eval = next((ep for s, ep in zip(states, ep_nums) if s is not None), None)
    onset = None
    rate = learning_rate_per_epoch([init_val, *vals])
    init_collapsed = bool(init.get("collapsed"))
    for a, b, count in collapse_stretches(states, ep_nums):
        if count < scream_min_epochs:
            continue
        if a == first_eval and b != last_eval:
            continue  # the untrained model's near-constant output, learned its way out
        through = stretch_learning_rate([init_val, *vals], ep_nums, a, b)
        if b != last_eval and math.isfinite(through) and through > learning_rate:
            # A collapse the model learned its way out of, the loss falling fast all through it: a phase of
            # learning (the most frequent code first), not a scream; training longer must not turn
            # "inconclusive, train longer" into a scream
            warnings.append(
                {
                    "warning": "transient_collapse",
                    "epoch": a,
                    "message": f"output collapsed in epochs {a}-{b} and recovered while the validation loss "
                    f"fell {through:.0%} per epoch through it (> {learning_rate:.0%}: detect.scream.learning): "
                    "a phase of learning, not a scream",
                }
            )
            if lo_b * learning_rate <= through <= hi_b * learning_rate:
                borderline.append(
                    {
                        "what": "still learning",
                        "value": through,
                        "threshold": learning_rate,
                        "message": f"validation loss fell {through:.1%} per epoch through the collapse of epochs "
                        f"{a}-{b}, within {band:.0%} of {learning_rate:.0%} (detect.scream.learning): "
                        "scream or a phase of learning is a toss-up",
                    }
                )
            continue
        if b == last_eval and math.isfinite(rate) and rate > learning_rate and not (ratio > 1.0):
            # Collapsed to the end while still learning: an undertrained model (a char LM after 3 epochs
            # emits one character, whatever its learning rate) and a scream look the same here. Not a
            # scream, and not `stable` either: the run cannot tell, and says so.
            why = (
                f"output collapsed from epoch {a} to the end while the validation loss is still falling "
                f"({rate:.0%} per epoch, > {learning_rate:.0%}: detect.scream.learning) and below its start: "
                "an undertrained model and a scream look the same here; train longer"
            )
            warnings.append({"warning": "undertrained", "epoch": a, "message": why})
            flags.append({"flag": vd.INCONCLUSIVE, "epoch": a, "reason": "undertrained", "evidence": why})
            if lo_b * learning_rate <= rate <= hi_b * learning_rate:
                borderline.append(
                    {
                        "what": "still learning",
                        "value": rate,
                        "threshold": learning_rate,
                        "message": f"validation loss falls {rate:.1%} per epoch, within {band:.0%} of the "
                        f"undertrained threshold {learning_rate:.0%} (detect.scream.learning): "
                        "scream or undertrained is a toss-up",
                    }
                )
            continue
        if a == first_eval and b == last_eval and init_collapsed and math.isfinite(ratio) and lo_b <= ratio <= 1.0:
            # Collapsed before the first step and never out of it, the loss within `band` of its start:
            # nothing went from working to collapsed and nothing was learned, so a scream cannot be told.
            # A model whose loss fell further and then stalled with its output still collapsed (a char LM
            # stuck at its unigram loss, emitting one character) is a scream.
            why = (
                f"output was collapsed at initialisation and stayed collapsed to the end; validation loss "
                f"{init_val:.4g} at initialisation, {last:.4g} at the end: the model never left its initial "
                "output, so a scream cannot be told from a model that has not learned; train longer or "
                "raise the learning rate"
            )
            warnings.append({"warning": "never_learned", "epoch": a, "message": why})
            flags.append({"flag": vd.INCONCLUSIVE, "epoch": a, "reason": "never_learned", "evidence": why})
            continue
        onset = a
        to_end = " to the end" if b == last_eval else f" to epoch {b}"
        flags.append(
            {
                "flag": "scream",
                "epoch": a,
                "evidence": f"output collapsed to repeated tokens from epoch {a}{to_end} ({count} evaluated "
                f"epochs collapsed, >= {scream_min_epochs})",
            }
        )
        peak_level = max(
            (lv for lv, ep in zip(levels, ep_nums) if lv is not None and math.isfinite(lv) and a <= ep <= b),
            default=math.nan,
        )
        if math.isfinite(peak_level) and peak_level < hi_b:
            borderline.append(
                {
                    "what": "collapse",
                    "value": peak_level,
                    "threshold": 1.0,
                    "message": f"the collapse from epoch {a} peaked at {peak_level:.2f}x its threshold, "
                    f"within {band:.0%} of it",
                }
            )
        break
    warnings += _warnings(
        epochs, clip, stage_clamp, logit_growth, first_nan, peak, attn_logit_level, attn_entropy_level
    )
    warnings += unjudged
    unstable = [f for f in flags if f["flag"] != "inconclusive"]
    need = max(2, scream_min_epochs)
    if not unstable and n_eval < need and len(epochs) < need:
        flags.append(
            {
                "flag": "inconclusive",
                "epoch": epochs[-1]["epoch"] if epochs else 0,
                "evidence": f"{len(epochs)} epoch(s) evaluated: too short to judge (a scream needs "
                f"{scream_min_epochs} (detect.scream.min_epochs), an explosion the grad norms of at "
                f"least 2 epochs; this run has no sign of either): train at least {need} epochs",
            }
        )
    verdict, evidence = "stable", f"grad norm per epoch {series}"
    for f in sorted(flags, key=lambda f: SEVERITY.index(f["flag"])):
        verdict, evidence = f["flag"], f["evidence"]
        break
    if verdict == "stable" and math.isfinite(growth):
        evidence += f" (at most {growth:.2f}x per epoch over {window} epochs)"
    if verdict == "stable" and math.isfinite(ratio):
        evidence += f"; validation loss {last:.4g}, {ratio:.3g}x {ref_name}"
    return {
        "verdict": verdict,
        "evidence": evidence,
        "flags": flags,
        "warnings": warnings,
        "borderline": borderline,
        "scream_epoch": onset,
        "val_loss_init": init_val,
        "baseline_loss": baseline,
        "loss_ratio": ratio,
    }


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _level(epoch: dict[str, Any], sc: Any) -> float | None:
    """An epoch's `collapse_level` against its target's scores; NaN when the epoch has no scores
    (not evaluated, non-finite output); None without thresholds."""
    if sc is None:
        return None
    scores = epoch.get("scores") or {}
    if not scores or epoch.get("collapsed") is None:
        return math.nan
    return collapse_level(
        scores,
        sc.dominant,
        sc.longest_run,
        getattr(sc, "loop", None),
        getattr(sc, "seq_rep", None),
        getattr(sc, "n", 4),
        epoch.get("target_scores") or {},
    )


def _warnings(
    epochs: Sequence[dict[str, Any]],
    clip: float | None,
    stage_clamp: float,
    logit_growth: float,
    first_nan: dict[str, Any] | None = None,
    peak: dict[str, Any] | None = None,
    attn_logit_level: float = 50.0,
    attn_entropy_level: float = 0.1,
) -> list[dict[str, Any]]:
    """What a researcher should see even in a stable run (see `diagnose`).

    Attention: on absolute levels, the state the papers describe, not on growth from a tiny
    start (a healthy run's max logit goes 0.23 -> 2.45, 10x, and means nothing): `attn_logit`
    when the largest pre-softmax logit reaches `attn_logit_level` (a logit 50 above its
    neighbours takes 1 - 2e-22 of the softmax: one-hot attention; Dehghani et al. 2023, arXiv
    2302.05442, and Wortsman et al. 2023, arXiv 2309.14322, describe this logit growth), and
    `attn_entropy_collapse` when the lowest layer's mean attention entropy falls to
    `attn_entropy_level` nats (Zhai et al. 2023, arXiv 2303.06296: entropy collapse; 0.1 nats is
    a row with ~98% of its weight on one key). Growth over the run (>= `logit_growth`x) is quoted
    as supporting evidence."""
    out: list[dict[str, Any]] = []
    if not epochs:
        return out
    rates = np.array([e.get("stage_clamp_rate") or [] for e in epochs], dtype=float)
    if rates.size:
        for i, r in enumerate(np.nanmean(rates, axis=0)):
            if r > stage_clamp:
                out.append(
                    {
                        "warning": "clamp_saturated",
                        "stage": i,
                        "rate": float(r),
                        "message": f"stage {i}'s RMS-match clamp bound on {r:.0%} of steps: its scale is "
                        "pinned at a bound, so the stage cannot reach the target's RMS",
                    }
                )
    health = [(e["epoch"], e.get("health_summary") or {}) for e in epochs]
    logits = [(ep, _num(h.get("attn_logit_max"))) for ep, h in health]
    logits = [(ep, v) for ep, v in logits if math.isfinite(v)]
    entropies = [(ep, _num(h.get("attn_entropy_min"))) for ep, h in health]
    entropies = [(ep, v) for ep, v in entropies if math.isfinite(v)]
    growth = ""
    if len(logits) >= 2 and logits[0][1] > 0:
        g = max(v for _, v in logits) / logits[0][1]
        if g >= logit_growth:
            growth = f"; it grew {g:.0f}x from {logits[0][1]:.3g} at epoch {logits[0][0]}"
    top = max(logits, key=lambda t: t[1], default=None)
    if top is not None and top[1] >= attn_logit_level:
        out.append(
            {
                "warning": "attn_logit",
                "epoch": top[0],
                "value": top[1],
                "level": attn_logit_level,
                "message": f"max attention logit {top[1]:.3g} at epoch {top[0]}, past {attn_logit_level:g} "
                f"(detect.attn_logit_max): near one-hot attention{growth} (Wortsman et al. 2023, "
                "arXiv 2309.14322); qk_norm caps it",
            }
        )
    low = min(entropies, key=lambda t: t[1], default=None)
    if low is not None and low[1] <= attn_entropy_level:
        out.append(
            {
                "warning": "attn_entropy_collapse",
                "epoch": low[0],
                "value": low[1],
                "level": attn_entropy_level,
                "message": f"attention entropy fell to {low[1]:.3g} nats at epoch {low[0]} (a layer's mean, at "
                f"most {attn_entropy_level:g}: detect.attn_entropy_min): attention entropy collapse "
                "(Zhai et al. 2023, arXiv 2303.06296)",
            }
        )
    nonfinite = bool(first_nan) or any(not math.isfinite(e.get("grad_norm_max", math.nan)) for e in epochs)
    if clip is not None:
        clip_rates = [e["clip_rate"] for e in epochs if math.isfinite(e.get("clip_rate", math.nan))]
        grad_peak = max((e["grad_norm_max"] for e in epochs if math.isfinite(e["grad_norm_max"])), default=math.nan)
        if clip_rates and max(clip_rates) == 0 and not nonfinite:  # a NaN run's norms say nothing of the clip
            out.append(
                {
                    "warning": "clip_never",
                    "clip": clip,
                    "grad_norm_max": grad_peak,
                    "message": f"clip={clip:g} never fired (largest grad norm {grad_peak:.3g}): "
                    "at this setting the clip axis changes nothing",
                }
            )
        elif clip_rates and min(clip_rates) >= 0.95:
            out.append(
                {
                    "warning": "clip_always",
                    "clip": clip,
                    "rate": float(np.mean(clip_rates)),
                    "message": f"clip={clip:g} fired on {np.mean(clip_rates):.0%} of steps: every update is "
                    "clipped, so the learning rate is effectively lr x clip / grad norm",
                }
            )
    vals = [(e["epoch"], e["val_loss"]) for e in epochs if math.isfinite(e.get("val_loss", math.nan))]
    if len(vals) >= 2 and min(v for _, v in vals[1:]) >= vals[0][1]:
        out.append(
            {
                "warning": "val_not_improving",
                "first": vals[0][1],
                "last": vals[-1][1],
                "message": f"validation loss never went below its epoch-{vals[0][0]} value "
                f"{vals[0][1]:.4g} (last {vals[-1][1]:.4g})",
            }
        )
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
