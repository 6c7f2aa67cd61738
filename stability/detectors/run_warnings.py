"""The warnings a researcher should see even in a stable run: a stage's RMS clamp pinned at its
bound, near one-hot attention, attention entropy collapse, a clip that never or always fires, a
validation loss that never improved. They never set the verdict (`verdict.diagnose` does).

    run_warnings(epochs, clip=10.0, stage_clamp=0.5, logit_growth=10.0)
    # [{"warning": "clip_never", "clip": 10.0, "grad_norm_max": 2.79, "message": "clip=10 never fired ..."}]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stability.detectors.series import as_float


def run_warnings(
    epochs: Sequence[dict[str, Any]],
    clip: float | None,
    stage_clamp: float,
    logit_growth: float,
    first_nan: dict[str, Any] | None = None,
    attn_logit_level: float = 50.0,
    attn_entropy_level: float = 0.1,
) -> list[dict[str, Any]]:
    """Every warning of a run's epoch records, in this order: `clamp_saturated` (per stage),
    `attn_logit`, `attn_entropy_collapse`, `clip_never` or `clip_always`, `val_not_improving`;
    [] without epochs. Each is {"warning", "message", ...its numbers}.

    epochs: the epoch records (`stage_clamp_rate`, `health_summary`, `clip_rate`,
    `grad_norm_max`, `val_loss`), in order. clip: train.clip (None: no clip, no clip warning).
    stage_clamp: share of steps a stage's clamp may bind (detect.clamp_warn). first_nan: the
    run's first_nan event, if any (a NaN run's norms say nothing of the clip). The attention
    thresholds: see `attention_warnings`."""
    if not epochs:
        return []
    return [
        *clamp_warnings(epochs, stage_clamp),
        *attention_warnings(epochs, logit_growth, attn_logit_level, attn_entropy_level),
        *clip_warnings(epochs, clip, first_nan),
        *val_warnings(epochs),
    ]


def clamp_warnings(epochs: Sequence[dict[str, Any]], stage_clamp: float) -> list[dict[str, Any]]:
    """`clamp_saturated` for each stage whose RMS-match clamp bound on more than `stage_clamp` of
    the steps (the mean of its epochs' `stage_clamp_rate`)."""
    out: list[dict[str, Any]] = []
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
    return out


def attention_warnings(
    epochs: Sequence[dict[str, Any]], logit_growth: float, attn_logit_level: float, attn_entropy_level: float
) -> list[dict[str, Any]]:
    """`attn_logit` and `attn_entropy_collapse`, on absolute levels of the epochs' `health_summary`.

    On levels, the state the papers describe, not on growth from a tiny start (a healthy run's
    max logit goes 0.23 -> 2.45, 10x, and means nothing): `attn_logit` when the largest
    pre-softmax logit reaches `attn_logit_level` (a logit 50 above its neighbours takes 1 - 2e-22
    of the softmax: one-hot attention; Dehghani et al. 2023, arXiv 2302.05442, and Wortsman et al.
    2023, arXiv 2309.14322, describe this logit growth), and `attn_entropy_collapse` when the
    lowest layer's mean attention entropy falls to `attn_entropy_level` nats (Zhai et al. 2023,
    arXiv 2303.06296: entropy collapse; 0.1 nats is a row with ~98% of its weight on one key).
    Growth over the run (>= `logit_growth`x) is quoted as supporting evidence."""
    logits = _health_series(epochs, "attn_logit_max")
    entropies = _health_series(epochs, "attn_entropy_min")
    out: list[dict[str, Any]] = []
    top = max(logits, key=lambda t: t[1], default=None)
    if top is not None and top[1] >= attn_logit_level:
        out.append(
            {
                "warning": "attn_logit",
                "epoch": top[0],
                "value": top[1],
                "level": attn_logit_level,
                "message": f"max attention logit {top[1]:.3g} at epoch {top[0]}, past {attn_logit_level:g} "
                f"(detect.attn_logit_max): near one-hot attention{_growth_note(logits, logit_growth)} "
                "(Wortsman et al. 2023, arXiv 2309.14322); qk_norm caps it",
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
    return out


def _health_series(epochs: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of one `health_summary` key, over the epochs where it is a finite number."""
    pairs = [(e["epoch"], as_float((e.get("health_summary") or {}).get(key))) for e in epochs]
    return [(ep, v) for ep, v in pairs if math.isfinite(v)]


def _growth_note(logits: Sequence[tuple[int, float]], logit_growth: float) -> str:
    """ "; it grew 40x from 0.23 at epoch 1" where the max logit grew at least `logit_growth`x
    from its first epoch, else ""."""
    if len(logits) >= 2 and logits[0][1] > 0:
        g = max(v for _, v in logits) / logits[0][1]
        if g >= logit_growth:
            return f"; it grew {g:.0f}x from {logits[0][1]:.3g} at epoch {logits[0][0]}"
    return ""


def clip_warnings(
    epochs: Sequence[dict[str, Any]], clip: float | None, first_nan: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """`clip_never` (the clip never fired in a run whose norms are all finite: at this setting the
    clip axis changes nothing) or `clip_always` (it fired on at least 95% of the steps of every
    epoch: the learning rate is effectively lr x clip / grad norm); [] without a clip."""
    nonfinite = bool(first_nan) or any(not math.isfinite(e.get("grad_norm_max", math.nan)) for e in epochs)
    if clip is None:
        return []
    clip_rates = [e["clip_rate"] for e in epochs if math.isfinite(e.get("clip_rate", math.nan))]
    grad_peak = max((e["grad_norm_max"] for e in epochs if math.isfinite(e["grad_norm_max"])), default=math.nan)
    if clip_rates and max(clip_rates) == 0 and not nonfinite:  # a NaN run's norms say nothing of the clip
        return [
            {
                "warning": "clip_never",
                "clip": clip,
                "grad_norm_max": grad_peak,
                "message": f"clip={clip:g} never fired (largest grad norm {grad_peak:.3g}): "
                "at this setting the clip axis changes nothing",
            }
        ]
    if clip_rates and min(clip_rates) >= 0.95:
        return [
            {
                "warning": "clip_always",
                "clip": clip,
                "rate": float(np.mean(clip_rates)),
                "message": f"clip={clip:g} fired on {np.mean(clip_rates):.0%} of steps: every update is "
                "clipped, so the learning rate is effectively lr x clip / grad norm",
            }
        ]
    return []


def val_warnings(epochs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`val_not_improving`: the validation loss of no later epoch went below the first evaluated
    epoch's (at least two evaluated epochs)."""
    vals = [(e["epoch"], e["val_loss"]) for e in epochs if math.isfinite(e.get("val_loss", math.nan))]
    if len(vals) >= 2 and min(v for _, v in vals[1:]) >= vals[0][1]:
        return [
            {
                "warning": "val_not_improving",
                "first": vals[0][1],
                "last": vals[-1][1],
                "message": f"validation loss never went below its epoch-{vals[0][0]} value "
                f"{vals[0][1]:.4g} (last {vals[-1][1]:.4g})",
            }
        ]
    return []
