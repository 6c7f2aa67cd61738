"""The scream rules of `verdict.diagnose`: each epoch's collapse (`collapse_per_epoch`), and which
collapsed stretch is a scream (`judge_scream`) and which is not: a phase of learning
(`transient_collapse`), an undertrained model (`undertrained`) or a model that never left its
initial output (`never_learned`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stability.detectors.collapse import collapse_level, collapse_states, collapse_stretches
from stability.detectors.findings import Findings
from stability.detectors.loss_rules import Loss
from stability.detectors.series import learning_rate_per_epoch, stretch_learning_rate
from stability.record import verdicts as vd


@dataclass(frozen=True)
class Collapse:
    """The output's collapse per epoch: `epochs` (their numbers), `levels` (`collapse_level`,
    None without thresholds), `states` (collapsed, with hysteresis; None: not evaluated), the
    first and last evaluated epoch and how many were evaluated."""

    epochs: list[int]
    levels: list[float | None]
    states: list[bool | None]
    first_eval: int | None
    last_eval: int | None
    n_eval: int


def collapse_per_epoch(epochs: Sequence[dict[str, Any]], scream: Any, band: float) -> Collapse:
    """Each epoch's collapse level against its target and its collapsed state with hysteresis
    `band` (`collapse_states`); without thresholds or scores, the epochs' own `collapsed`."""
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
    return Collapse(ep_nums, levels, states, first_eval, last_eval, n_eval)


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


def held_text(col: Collapse, a: int, b: int, band: float) -> str:
    """The epochs of the collapse a..b that only the hysteresis keeps collapsed (their level below
    1, within `band` of it), as a clause: an epoch line or epochs.jsonl shows them not collapsed
    (`collapsed: false`, the raw threshold), and the verdict must say why it still counts them.
    "" when every epoch of the stretch is past the threshold itself."""
    held = [
        (ep, lv)
        for ep, lv, st in zip(col.epochs, col.levels, col.states)
        if a <= ep <= b and st and lv is not None and math.isfinite(lv) and lv < 1.0
    ]
    if not held:
        return ""
    shown = ", ".join(f"epoch {ep} at {lv:.2f}" for ep, lv in held)
    return (
        f" ({shown} of its threshold: below it, so not collapsed on its own line, but within the "
        f"{band:.0%} hysteresis band (detect.band), so the collapse is held, not ended)"
    )


def judge_scream(
    found: Findings, col: Collapse, loss: Loss, init_collapsed: bool, min_epochs: int, learning_rate: float
) -> int | None:
    """The scream: the first stretch of at least `min_epochs` collapsed epochs that is not a phase
    of learning (`_transient_collapse`), an undertrained model (`_undertrained`) or a model that
    never left its initial output (`_never_learned`). Returns its first epoch, None if none is."""
    losses = [loss.init_val, *loss.vals]
    rate = learning_rate_per_epoch(losses)
    for a, b, count in collapse_stretches(col.states, col.epochs):
        if count < min_epochs:
            continue
        if a == col.first_eval and b != col.last_eval:
            continue  # the untrained model's near-constant output, learned its way out
        through = stretch_learning_rate(losses, col.epochs, a, b)
        if b != col.last_eval and math.isfinite(through) and through > learning_rate:
            _transient_collapse(found, a, b, through, learning_rate)
        elif b == col.last_eval and math.isfinite(rate) and rate > learning_rate and not (loss.ratio > 1.0):
            _undertrained(found, a, rate, learning_rate, held_text(col, a, b, found.band))
        elif (
            a == col.first_eval
            and b == col.last_eval
            and init_collapsed
            and math.isfinite(loss.ratio)
            and found.lo <= loss.ratio <= 1.0
        ):
            _never_learned(found, a, loss)
        else:
            _scream_flag(found, col, a, b, count, min_epochs)
            return a
    return None


def _transient_collapse(found: Findings, a: int, b: int, through: float, learning_rate: float) -> None:
    """A collapse of epochs a..b the model learned its way out of, the loss falling `through` per
    epoch (> `learning_rate`) all through it: a phase of learning (the most frequent code first),
    not a scream; training longer must not turn "inconclusive, train longer" into a scream."""
    found.warnings.append(
        {
            "warning": "transient_collapse",
            "epoch": a,
            "message": f"output collapsed in epochs {a}-{b} and recovered while the validation loss "
            f"fell {through:.0%} per epoch through it (> {learning_rate:.0%}: detect.scream.learning): "
            "a phase of learning, not a scream",
        }
    )
    if found.lo * learning_rate <= through <= found.hi * learning_rate:
        found.borderline.append(
            {
                "what": "still learning",
                "value": through,
                "threshold": learning_rate,
                "message": f"validation loss fell {through:.1%} per epoch through the collapse of epochs "
                f"{a}-{b}, within {found.band:.0%} of {learning_rate:.0%} (detect.scream.learning): "
                "scream or a phase of learning is a toss-up",
            }
        )


def _undertrained(found: Findings, a: int, rate: float, learning_rate: float, held: str = "") -> None:
    """Collapsed from epoch `a` to the end while the loss still falls `rate` per epoch: an
    undertrained model (a char LM after 3 epochs emits one character, whatever its learning rate)
    and a scream look the same here. Not a scream, and not `stable` either: `inconclusive`."""
    why = (
        f"output collapsed from epoch {a} to the end{held} while the validation loss is still falling "
        f"({rate:.0%} per epoch, > {learning_rate:.0%}: detect.scream.learning) and below its start: "
        "an undertrained model and a scream look the same here; train longer"
    )
    found.warnings.append({"warning": "undertrained", "epoch": a, "message": why})
    found.flags.append({"flag": vd.INCONCLUSIVE, "epoch": a, "reason": "undertrained", "evidence": why})
    if found.lo * learning_rate <= rate <= found.hi * learning_rate:
        found.borderline.append(
            {
                "what": "still learning",
                "value": rate,
                "threshold": learning_rate,
                "message": f"validation loss falls {rate:.1%} per epoch, within {found.band:.0%} of the "
                f"undertrained threshold {learning_rate:.0%} (detect.scream.learning): "
                "scream or undertrained is a toss-up",
            }
        )


def _never_learned(found: Findings, a: int, loss: Loss) -> None:
    """Collapsed before the first step and never out of it, the loss within `band` of its start:
    nothing went from working to collapsed and nothing was learned, so a scream cannot be told:
    `inconclusive`. A model whose loss fell further and then stalled with its output still
    collapsed (a char LM stuck at its unigram loss, emitting one character) is a scream."""
    why = (
        f"output was collapsed at initialisation and stayed collapsed to the end; validation loss "
        f"{loss.init_val:.4g} at initialisation, {loss.last:.4g} at the end: the model never left its initial "
        "output, so a scream cannot be told from a model that has not learned; train longer or "
        "raise the learning rate"
    )
    found.warnings.append({"warning": "never_learned", "epoch": a, "message": why})
    found.flags.append({"flag": vd.INCONCLUSIVE, "epoch": a, "reason": "never_learned", "evidence": why})


def _scream_flag(found: Findings, col: Collapse, a: int, b: int, count: int, min_epochs: int) -> None:
    """The `scream` finding for the collapse of epochs a..b (`count` evaluated); borderline where
    its peak level stayed within `band` above the threshold."""
    to_end = " to the end" if b == col.last_eval else f" to epoch {b}"
    found.flags.append(
        {
            "flag": "scream",
            "epoch": a,
            "evidence": f"output collapsed to repeated tokens from epoch {a}{to_end} ({count} evaluated "
            f"epochs collapsed, >= {min_epochs}){held_text(col, a, b, found.band)}",
        }
    )
    peak_level = max(
        (lv for lv, ep in zip(col.levels, col.epochs) if lv is not None and math.isfinite(lv) and a <= ep <= b),
        default=math.nan,
    )
    if math.isfinite(peak_level) and peak_level < found.hi:
        found.borderline.append(
            {
                "what": "collapse",
                "value": peak_level,
                "threshold": 1.0,
                "message": f"the collapse from epoch {a} peaked at {peak_level:.2f}x its threshold, "
                f"within {found.band:.0%} of it",
            }
        )
