"""The verdict rules: every finding of a finished run, its primary verdict, and why (`diagnose`).

The primary verdict is the most severe finding (`record.verdicts.SEVERITY`). A crash (failed) is
set by the runner before any of these; a NaN ends the measurement; an explosion explains a
collapse or a divergence that comes with it, so it outranks both; a run whose loss ended above
where it started (diverged) failed whatever its output looks like, so it outranks the scream; a
run too short for the detectors (inconclusive) is only "not found unstable", so it sits between
the unstable verdicts and stable. The findings, most severe first:

- nan: a first non-finite value (the loop's first_nan event).
- exploding: the grad norm grew more than `explode_factor` per epoch over `explode_window`
  epochs (`series.explosion`), or one step's was huge (`peak`).
- diverged: the last validation loss is above the loss at initialisation, or non-finite: the run
  ended worse than it started; without validation data the last epoch's mean training loss
  against the first step's (Wortsman et al. 2023, arXiv 2309.14322, count such a run as a
  complete failure).
- scream: a collapse of at least `scream_min_epochs` evaluated epochs (`collapse`), not the
  untrained model's output learning its way out, not a collapse the model recovered from while
  its validation loss fell faster than `learning_rate` per epoch through it (a
  `transient_collapse` warning), not an undertrained run.
- inconclusive: nothing unstable found in fewer evaluated epochs than the detectors need; an
  output collapsed to the end while the validation loss still falls below its start
  (`undertrained`: undertrained or a scream cannot be told apart); an output collapsed from
  initialisation to the end with the loss within `band` of its start (`never_learned`).
- stable: none of these.

A finding within `band` (relative) of its threshold is also listed as `borderline`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from stability.detectors.findings import Findings
from stability.detectors.loss_rules import Loss, judge_divergence, loss_reference, unjudged, warn_above_baseline
from stability.detectors.run_warnings import run_warnings
from stability.detectors.scream_rules import collapse_per_epoch, judge_scream
from stability.detectors.series import explosion
from stability.formatting import nan_place
from stability.record import verdicts as vd


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
    """Every finding of a finished run, its primary verdict (the rules: the module docstring) and
    the warnings a researcher should see even in a stable run (`run_warnings`).

    epochs: the epoch records (`grad_norm_mean`, `grad_norm_max`, `val_loss`, `collapsed`,
    `scores`, `target_scores`, `clip_rate`, `stage_clamp_rate`, `health_summary`), in order.
    init: the evaluation before the first step ({"val_loss", "baseline_loss", "baseline",
    "collapsed"}: the validation loss at initialisation, the workload's no-learning baseline, e.g.
    the unigram entropy of the text, whether the untrained output was collapsed).
    first_train_loss: the first step's training loss, before any update: divergence's reference
    without validation data. scream: the `detect.scream` thresholds, for the collapse's hysteresis
    `band` (without them the epochs' `collapsed` is used as is); `band` is also the relative
    width of `borderline`.

    Returns {"verdict", "evidence", "flags": [{"flag", "epoch"|"step", "evidence"}], "warnings":
    [{"warning", "message", ...}], "borderline": [{"what", "value", "threshold", "message"}],
    "scream_epoch", "val_loss_init", "baseline_loss", "loss_ratio"}."""
    init = init or {}
    found = Findings(band)
    norms = [e["grad_norm_mean"] for e in epochs]
    series = ", ".join(f"{v:.3g}" for v in norms)
    if first_nan:
        found.flags.append(_nan_flag(first_nan))
    window, growth = _explosion(found, norms, series, explode_factor, explode_window, peak)
    loss = loss_reference(epochs, init, first_train_loss)
    judge_divergence(found, loss, epochs, first_nan)
    warn_above_baseline(found, loss, init)
    collapse = collapse_per_epoch(epochs, scream, band)
    onset = judge_scream(found, collapse, loss, bool(init.get("collapsed")), scream_min_epochs, learning_rate)
    found.warnings += run_warnings(
        epochs, clip, stage_clamp, logit_growth, first_nan, attn_logit_level, attn_entropy_level
    )
    found.warnings += unjudged(loss)  # said after the findings: what could not be judged
    _too_short(found, epochs, collapse.n_eval, scream_min_epochs)
    verdict, evidence = _primary(found.flags, series, growth, window, loss)
    return {
        "verdict": verdict,
        "evidence": evidence,
        **found.lists(),
        "scream_epoch": onset,
        **loss.fields(),
    }


def _nan_flag(first_nan: dict[str, Any]) -> dict[str, Any]:
    """The `nan` finding of a first_nan event: where the first non-finite value was."""
    return {
        "flag": "nan",
        "epoch": first_nan["epoch"],
        "step": first_nan["step"],
        "evidence": f"first non-finite {first_nan['kind']} at epoch {first_nan['epoch']}, batch "
        f"{first_nan['batch']} (step {first_nan['step']}), {nan_place(first_nan)}",
    }


def _explosion(
    found: Findings,
    norms: list[float],
    series: str,
    explode_factor: float,
    explode_window: int,
    peak: dict[str, Any] | None,
) -> tuple[int, float]:
    """The `exploding` finding: the epochs' grad norm growing past `explode_factor` per epoch, or
    one huge step (`peak`, added to the growth's evidence where both are found); a growth near the
    threshold is borderline. Returns (the window the growth is measured over: `explode_window`
    epochs, fewer where fewer are finite, at least 2; the largest windowed growth per epoch, NaN:
    none)."""
    window = min(explode_window, max(2, sum(math.isfinite(v) for v in norms)))
    start, growth = explosion(norms, explode_factor, explode_window)
    if start is not None:
        found.flags.append(
            {
                "flag": "exploding",
                "epoch": start,
                "growth": growth,
                "evidence": f"grad norm grew {growth:.2f}x per epoch from epoch {start} "
                f"(> {explode_factor} over {window} epochs): {series}",
            }
        )
    if math.isfinite(growth) and found.lo * explode_factor <= growth <= found.hi * explode_factor:
        found.borderline.append(
            {
                "what": "grad norm growth",
                "value": growth,
                "threshold": explode_factor,
                "message": f"grad norm growth {growth:.2f}x per epoch is within {found.band:.0%} of the "
                f"exploding threshold {explode_factor:g} (detect.explode_factor)",
            }
        )
    if peak:
        huge = (
            f"grad norm reached {peak['value']:.3g} at epoch {peak['epoch']}, batch {peak['batch']} (step "
            f"{peak['step']}), {peak['ratio']:.3g}x the run's median step, with every gradient finite"
        )
        if start is None:
            found.flags.append({"flag": "exploding", "epoch": peak["epoch"], "step": peak["step"], "evidence": huge})
        else:
            found.flags[-1]["evidence"] += f"; {huge}"
    return window, growth


def _too_short(found: Findings, epochs: Sequence[dict[str, Any]], n_eval: int, scream_min_epochs: int) -> None:
    """The `inconclusive` finding of a run with nothing unstable found in fewer evaluated epochs
    than the detectors need (a scream `scream_min_epochs`, an explosion 2)."""
    unstable = [f for f in found.flags if f["flag"] != "inconclusive"]
    need = max(2, scream_min_epochs)
    if not unstable and n_eval < need and len(epochs) < need:
        found.flags.append(
            {
                "flag": "inconclusive",
                "epoch": epochs[-1]["epoch"] if epochs else 0,
                "evidence": f"{len(epochs)} epoch(s) evaluated: too short to judge (a scream needs "
                f"{scream_min_epochs} (detect.scream.min_epochs), an explosion the grad norms of at "
                f"least 2 epochs; this run has no sign of either): train at least {need} epochs",
            }
        )


def _primary(flags: list[dict[str, Any]], series: str, growth: float, window: int, loss: Loss) -> tuple[str, str]:
    """(verdict, evidence): the most severe finding (the first of them, where several are as
    severe), or `stable` with the grad norms and where the loss ended."""
    worst = min(flags, key=lambda f: vd.SEVERITY.index(f["flag"]), default=None)
    if worst is not None:
        return worst["flag"], worst["evidence"]
    evidence = f"grad norm per epoch {series}"
    if math.isfinite(growth):
        evidence += f" (at most {growth:.2f}x per epoch over {window} epochs)"
    if math.isfinite(loss.ratio):
        evidence += f"; validation loss {loss.last:.4g}, {loss.ratio:.3g}x {loss.ref_name}"
    return "stable", evidence
