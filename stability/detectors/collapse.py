"""How collapsed a model's output is: token-sequence scores, their level against thresholds, and
the collapsed state of each epoch (the scream detector's measures).

    scream_score([7, 7, 7, 7, 3])            # dominant 0.8, longest run 0.8, ...
    loop_share(list(b"abcee e e e"), 3)      # 0.64: its closing loop "e e e e" is 7 of its 11 codes
    collapse_states([0.5, 1.2, 0.95, 0.5], band=0.1)   # [False, True, True, False]: hysteresis
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

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
