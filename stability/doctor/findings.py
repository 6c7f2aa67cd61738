"""What the doctor finds in a run's records: where the gradients and the loss left their
baseline (`departure`, `find`), attention, clamp, clip and warmup findings; each `Finding` names
its step or epoch and its numbers.

    findings = find(read_run(run_dir))   # earliest first
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stability.detectors.series import detect_spikes
from stability.doctor.record import RunRecord, _float
from stability.record import verdicts as vd

# Where a run left its baseline. The total grad norm: above DEPART_FACTOR x its median over the
# warmup steps (at least BASELINE_STEPS), or non-finite. A module group: above DEPART_FACTOR x
# its running median over the previous BASELINE_STEPS steps, from the end of warmup on (a group's
# own norm grows 10-200x during warmup in stable runs too, so warmup is no baseline for it). The
# loss: above LOSS_FACTOR x its lowest value so far. Measured on the default preset (README,
# "stab doctor"): the seed's old settings (post-norm, residual 0.1, lr 1e-2) reach 12x their
# warmup grad norm at step 18 and the loss rises 1.8x at step 22; pre-norm at the same lr peaks at
# 2.9x (step 22) and its loss never rises 1.5x.
BASELINE_STEPS = 8
DEPART_FACTOR = 10.0
LOSS_FACTOR = 1.5


# --- findings -------------------------------------------------------------------------------


@dataclass
class Finding:
    """One thing the records show: `kind` (a key of RULES' findings), where (step or epoch), a
    one-line `evidence` with its numbers, and the values a fix needs (`detail`)."""

    kind: str
    evidence: str
    step: int | None = None
    epoch: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def departure(
    values: Sequence[float] | np.ndarray, baseline: int, factor: float = DEPART_FACTOR
) -> tuple[int, float] | None:
    """(index, ratio) of the first value after the first `baseline` ones that exceeds `factor` x
    their median, or is non-finite (ratio inf); None if the series never leaves its baseline."""
    x = np.asarray(values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(x[:baseline]))
    if len(bad):  # non-finite before a baseline could form: that is where it left
        return int(bad[0]), math.inf
    base = x[:baseline]
    med = float(np.median(base)) if len(base) else math.nan
    for i in range(baseline, len(x)):
        if not math.isfinite(x[i]):
            return i, math.inf
        if med > 0 and x[i] > factor * med:
            return i, float(x[i] / med)
    return None


def running_departure(
    values: Sequence[float] | np.ndarray,
    start: int,
    window: int = BASELINE_STEPS,
    factor: float = DEPART_FACTOR,
    stop: int | None = None,
) -> tuple[int, float] | None:
    """(index, ratio) of the first value from `start` (up to `stop`, inclusive) above `factor` x
    the median of the `window` finite values before it, or non-finite; None if none is."""
    x = np.asarray(values, dtype=float)
    end = len(x) if stop is None else min(len(x), stop + 1)
    for i in range(max(start, 1), end):
        if not math.isfinite(x[i]):
            return i, math.inf
        prev = x[max(0, i - window) : i]
        prev = prev[np.isfinite(prev)]
        if len(prev) and np.median(prev) > 0 and x[i] > factor * np.median(prev):
            return i, float(x[i] / np.median(prev))
    return None


def group_departure(values: Sequence[float] | np.ndarray, warmup: int, stop: int) -> tuple[int, float] | None:
    """Where one module group's grad norm left its baseline, up to step index `stop`: the earlier
    of a jump (`running_departure`, from the end of warmup) and a climb (above DEPART_FACTOR x its
    median over the BASELINE_STEPS steps after warmup; smooth growth never jumps)."""
    x = np.asarray(values, dtype=float)
    start = max(warmup, 1)
    climb = departure(x[start : stop + 1], BASELINE_STEPS)
    hits = [
        h
        for h in (running_departure(x, start, stop=stop), (climb[0] + start, climb[1]) if climb else None)
        if h is not None
    ]
    return min(hits) if hits else None


def loss_departure(losses: Sequence[float] | np.ndarray, start: int, factor: float = LOSS_FACTOR) -> int | None:
    """Index of the first loss from `start` above `factor` x its lowest value so far (or non-finite)."""
    best = math.inf
    for i, v in enumerate(np.asarray(losses, dtype=float)):
        if not math.isfinite(v) or (i >= start and v > factor * best):
            return i
        if math.isfinite(v):
            best = min(best, v)
    return None


def is_output_projection(group: str) -> bool:
    """The cascade's `stage{i}.output_proj` and the char LM's `lm_head`."""
    return group.endswith("output_proj") or group == "lm_head"


def find(rec: RunRecord) -> list[Finding]:
    """Every finding of a run's records, in order of where it happened (earliest first)."""
    out: list[Finding] = []
    step_no = rec.series("step")
    at = lambda i: int(step_no[i]) if math.isfinite(step_no[i]) else i  # noqa: E731
    warmup = int(_float(rec.get("train.warmup", 0)) or 0)
    total = rec.series("grad/norm")
    gate = departure(total, max(warmup, BASELINE_STEPS))
    if gate is not None:
        out += _where_first(rec, gate, warmup, at)
        out += _output_projection(rec, total, at)
    out += _attention(rec)
    out += _clamp(rec)
    out += _clip_always(rec)
    out += _warmup_spike(rec)
    out += _nonfinite_data(rec)
    out += _from_the_summary(rec)
    return sorted(out, key=lambda f: f.step if f.step is not None else math.inf)


def _output_projection(rec: RunRecord, total: np.ndarray, at: Callable[[int], int]) -> list[Finding]:
    """An output projection holding half or more of the squared total grad norm at the run's peak
    step (`output_proj_gradient`); none otherwise."""
    out: list[Finding] = []
    peak = int(np.nanargmax(np.where(np.isfinite(total), total, -np.inf)))
    shares = {
        g: float(rec.series(f"grad/{g}")[peak] ** 2 / total[peak] ** 2)
        for g in rec.groups
        if is_output_projection(g) and math.isfinite(total[peak]) and total[peak] > 0
    }
    top = max(shares, key=lambda k: shares[k]) if shares else None
    if top is not None and shares[top] >= 0.5:
        out.append(
            Finding(
                "output_proj_gradient",
                step=at(peak),
                detail={"group": top, "share": shares[top]},
                evidence=f"{top} holds {shares[top]:.0%} of the squared grad norm at the run's peak "
                f"(step {at(peak)}, grad norm {total[peak]:.3g})",
            )
        )
    return out


def _from_the_summary(rec: RunRecord) -> list[Finding]:
    """Findings read from the config and summary: an injected fault (`fault.*`), the divergence
    flag, and the verdict itself when it is unstable (`unstable`)."""
    out: list[Finding] = []
    injected = {k: rec.get(f"fault.{k}") for k in ("nan_at_step", "spike_at_step", "crash_at_step")}
    injected = {k: v for k, v in injected.items() if v is not None}
    if injected:
        out.append(
            Finding(
                "injected_fault",
                step=min(injected.values()),
                detail=injected,
                evidence="the failure was injected ("
                + ", ".join(f"fault.{k}={v}" for k, v in injected.items())
                + "): no change of configuration removes it",
            )
        )
    verdict = rec.summary.get("verdict")
    diverged = next((f for f in rec.summary.get("flags") or [] if f.get("flag") == vd.DIVERGED), None)
    if diverged is not None:
        out.append(
            Finding(
                vd.DIVERGED,
                epoch=diverged.get("epoch"),
                detail={"ratio": diverged.get("ratio")},
                evidence=diverged.get("evidence", ""),
            )
        )
    if vd.is_unstable(verdict):
        out.append(
            Finding(
                "unstable",
                evidence=f"verdict {verdict}: {rec.summary.get('evidence', '')}",
                detail={"verdict": verdict},
            )
        )
    return out


def _where_first(rec: RunRecord, gate: tuple[int, float], warmup: int, at: Callable[[int], int]) -> list[Finding]:
    """The total grad norm left its baseline at `gate`: which module group left its own first
    (running median, from the end of warmup up to the gate), and how many steps before the loss."""
    i_total, r_total = gate
    loss_i = loss_departure(rec.series("loss"), max(warmup, 1))
    found = {g: d for g in rec.groups if (d := group_departure(rec.series(f"grad/{g}"), warmup, i_total)) is not None}
    nan = rec.summary.get("first_nan") or next((e for e in rec.events if e.get("event") == "first_nan"), None)
    if (
        nan and nan.get("module") and math.isinf(r_total)
    ):  # the step was re-run to name the module (stab replay's probe)
        i = next((j for j, r in enumerate(rec.steps) if r.get("step") == nan.get("step")), i_total)
        found, first, g, ratio = {}, [str(nan["module"])], str(nan["module"]), math.inf
    elif found:
        i = min(d[0] for d in found.values())
        first = sorted((g for g, d in found.items() if d[0] == i), key=lambda g: -found[g][1])
        g, ratio = first[0], found[first[0]][1]
    else:  # no group left its own baseline before the total did: the largest group at that step
        i, first = i_total, [max(rec.groups, key=lambda g: np.nan_to_num(rec.series(f"grad/{g}")[i_total], nan=np.inf))]
        g, ratio = first[0], math.nan
    lead = (loss_i - i) if loss_i is not None else 0
    when = (
        "the loss never rose"
        if loss_i is None
        else f"{lead} steps before the loss rose (step {at(loss_i)})"
        if lead > 0
        else f"{-lead} steps after the loss rose (step {at(loss_i)})"
        if lead < 0
        else "at the step the loss rose"
    )
    others = (
        f" (with {len(first) - 1} other group(s) at that step: {', '.join(first[1:4])}{', ...' if len(first) > 4 else ''})"
        if len(first) > 1
        else ""
    )
    norm = rec.get("model.norm")
    total_txt = "went non-finite" if math.isinf(r_total) else f"reached {r_total:.0f}x its warmup median"
    head = (
        f"no group left its own baseline first; the largest at step {at(i)} was {g}"
        if math.isnan(ratio)
        else f"{g} left its baseline first: grad norm "
        f"{'non-finite' if math.isinf(ratio) else f'{ratio:.0f}x its baseline'} at step {at(i)}"
    )
    return [
        Finding(
            "grad_departure",
            step=at(i),
            detail={
                "group": g,
                "ratio": ratio,
                "groups": first,
                "loss_step": at(loss_i) if loss_i is not None else None,
                "lead": lead,
                "total_step": at(i_total),
                "norm": norm,
            },
            evidence=head
            + f"{others}, {when}; the total grad norm {total_txt} at step {at(i_total)}"
            + (f"; the stack is {norm}-norm" if norm else ""),
        )
    ]


def _attention(rec: RunRecord) -> list[Finding]:
    """The attention state the papers describe, on the absolute levels the run's own warnings use:
    the max attention logit at or past detect.attn_logit_max (near one-hot attention: Dehghani et
    al. 2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322), or a layer's mean
    attention entropy at or below detect.attn_entropy_min nats (entropy collapse: Zhai et al.
    2023, arXiv 2303.06296). Growth from epoch 1 (>= detect.logit_growth) is supporting evidence
    only: a healthy run's max logit goes 0.23 -> 2.45 (10x) and means nothing, and a run already
    at 5e8 in epoch 1 has not "grown". One finding, at the first epoch past either level."""
    level = _float(rec.get("detect.attn_logit_max", 50.0))
    ent_level = _float(rec.get("detect.attn_entropy_min", 0.1))
    growth_limit = _float(rec.get("detect.logit_growth", 10.0))
    # an epoch record without its number (damaged) cannot place a finding
    health = [(e["epoch"], e.get("health_summary") or {}) for e in rec.epochs if isinstance(e.get("epoch"), int)]
    logits = [(ep, _float(h.get("attn_logit_max"))) for ep, h in health]
    logits = [(ep, v) for ep, v in logits if math.isfinite(v) and v > 0]
    ents = [(ep, _float(h.get("attn_entropy_min"))) for ep, h in health]
    ents = [(ep, v) for ep, v in ents if math.isfinite(v)]
    hot = next(((ep, v) for ep, v in logits if v >= level), None)
    flat_ = next(((ep, v) for ep, v in ents if v <= ent_level), None)
    if hot is None and flat_ is None:
        return []
    parts = []
    if hot is not None:
        top = max(logits, key=lambda p: p[1])
        parts.append(
            f"max attention logit {hot[1]:.3g} at epoch {hot[0]} (>= {level:g}, detect.attn_logit_max; "
            f"largest {top[1]:.3g} at epoch {top[0]})"
        )
        growth = top[1] / logits[0][1]
        if len(logits) >= 2 and growth >= growth_limit:
            parts[-1] += f", grown {growth:.0f}x from {logits[0][1]:.3g} at epoch {logits[0][0]}"
        per_layer = [
            (k, _float(v.get("attn_logit_max")))
            for k, v in (next(e for e in rec.epochs if e.get("epoch") == top[0]).get("health") or {}).items()
        ]
        per_layer = [(k, v) for k, v in per_layer if math.isfinite(v)]
        if per_layer:
            parts[-1] += f", largest in {max(per_layer, key=lambda p: p[1])[0]}"
    if flat_ is not None:
        parts.append(
            f"attention entropy {flat_[1]:.3g} nats at epoch {flat_[0]} (<= {ent_level:g}, detect.attn_entropy_min)"
        )
    first = min(x[0] for x in (hot, flat_) if x is not None)
    return [
        Finding(
            "attn_logit",
            epoch=first,
            detail={"logit": hot[1] if hot else None, "entropy": flat_[1] if flat_ else None},
            evidence="; ".join(parts),
        )
    ]


def _clamp(rec: RunRecord) -> list[Finding]:
    """A stage's RMS-match clamp bound on more than detect.clamp_warn of the steps."""
    limit = float(rec.get("detect.clamp_warn", 0.5))
    bounds = rec.get("model.rms_clamp") or [math.nan, math.nan]
    out = []
    i = 0
    while f"stage{i}/clamped" in rec.steps[0]:
        clamped = rec.series(f"stage{i}/clamped")
        ratio = rec.series(f"stage{i}/ratio")
        ok = np.isfinite(clamped)
        share = float(np.mean(clamped[ok])) if ok.any() else 0.0
        if share > limit:
            need = float(np.nanmedian(ratio[ok])) if ok.any() else math.nan
            side = "upper" if need > _float(bounds[1]) else "lower" if need < _float(bounds[0]) else "either"
            first = int(np.argmax(clamped > 0))
            out.append(
                Finding(
                    "clamp_saturated",
                    step=int(rec.steps[first].get("step", first)),
                    detail={
                        "stage": i,
                        "share": share,
                        "side": side,
                        "need": need,
                        "last": f"stage{i + 1}/clamped" not in rec.steps[0],
                    },
                    evidence=f"stage {i}'s RMS-match clamp {bounds} bound on {share:.0%} of steps, "
                    + (
                        f"at its {side} bound: it needed a scale of {need:.3g} (median)"
                        if side != "either"
                        else f"at either bound: the median scale it needed, {need:.3g}, lies inside, "
                        f"so it binds in bursts"
                    ),
                )
            )
        i += 1
    return out


def _clip_always(rec: RunRecord) -> list[Finding]:
    """Gradient clipping fired on at least 95% of the finite steps: the update is clip-limited."""
    clip = rec.get("train.clip")
    clipped = rec.series("grad/clipped")
    ok = np.isfinite(clipped)
    if clip in (None, "none") or not ok.any():
        return []
    share = float(np.mean(clipped[ok]))
    if share < 0.95:
        return []
    return [
        Finding(
            "clip_always",
            step=0,
            detail={"share": share, "clip": clip},
            evidence=f"clip={clip} fired on {share:.0%} of steps (median grad norm "
            f"{float(np.nanmedian(rec.series('grad/norm'))):.3g}): every update is clipped",
        )
    ]


def _warmup_spike(rec: RunRecord) -> list[Finding]:
    """A loss or grad-norm spike (the run's own spike rule, `detect_spikes`) between the end of
    the learning-rate warmup and twice its length (Wortsman et al. 2023, arXiv 2309.14322, §3.4:
    longer warmup lowers LR sensitivity; Gilmer et al. 2021, arXiv 2110.04369)."""
    warmup = int(_float(rec.get("train.warmup", 0)) or 0)
    if warmup <= 0:
        return []
    d = lambda k, v: rec.get(f"detect.{k}", v)  # noqa: E731
    hits = []
    for key in ("loss", "grad/norm"):
        spikes = detect_spikes(
            rec.series(key),
            int(d("spike_window", 20)),
            float(d("spike_z", 6.0)),
            int(d("spike_warmup", 10)),
            float(d("spike_ratio", 3.0)),
        )
        hits += [(i, key) for i in spikes if warmup - 1 <= i <= 2 * warmup]
    if not hits:
        return []
    i, key = min(hits)
    step = int(rec.steps[i].get("step", i))
    return [
        Finding(
            "warmup_spike",
            step=step,
            detail={"warmup": warmup, "key": key},
            evidence=f"{'loss' if key == 'loss' else 'grad norm'} spike at step {step} "
            f"({_float(rec.steps[i].get(key)):.3g}), {step - warmup + 1} step(s) after the "
            f"{warmup}-step warmup ended",
        )
    ]


def _nonfinite_data(rec: RunRecord) -> list[Finding]:
    """`data_nonfinite`: the first non-finite value came with a batch whose own tensors hold NaN or
    inf (the first_nan event's `batch_finite`), so no learning rate, norm or clip removes it: the
    data needs cleaning or filtering. `stab replay RUN` re-runs that step on the saved batch."""
    nan = rec.summary.get("first_nan") or next((e for e in rec.events if e.get("event") == "first_nan"), None)
    if not nan or nan.get("batch_finite") is not False:
        return []
    return [
        Finding(
            "data_nonfinite",
            step=nan.get("step"),
            epoch=nan.get("epoch"),
            detail={"batch": nan.get("batch")},
            evidence=f"the training batch at epoch {nan.get('epoch')}, batch {nan.get('batch')} (step "
            f"{nan.get('step')}) holds NaN or inf in its own tensors: the data went non-finite, not the "
            "training; no change of configuration removes it: clean or filter the data",
        )
    ]
