"""The doctor: what went wrong in a finished run, where first, and which fixes to try.

Reads only a run folder's files (config.yaml, summary.json, epochs.jsonl, metrics.jsonl,
events.jsonl), so it serves stab's own runs, sweep jobs and runs written by the monitor API alike.
Findings are computed from the records; each names its step or epoch and its numbers. The
candidate fixes come from one table, `RULES`: a finding, the override that answers it, a weight
that ranks it, and the paper or measured case it comes from.

    rec = read_run(Path("runs/run/20261129-111902_defaults"))
    dx = examine(rec)          # dx.findings, dx.fixes (ranked)
    stab doctor runs/run/20261129-111902_defaults --try
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stability.detectors.series import detect_spikes
from stability.record import format as rf
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
from stability.record.records import EpochRecord, Event, Summary

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


class DoctorError(ValueError):
    """The folder is not a run folder the doctor can read (what is missing is in the message)."""


# --- reading the run folder ----------------------------------------------------------------


@dataclass
class RunRecord:
    """One run folder's records: `config` (the resolved config.yaml mapping), `summary`,
    `epochs` (epochs.jsonl), `steps` (metrics.jsonl: `step`, `loss`, `grad/norm`, `grad/<group>`,
    `grad/clipped`, `lr`, `stage{i}/...`), `events`, and the overrides it was run with (if known)."""

    path: Path
    config: dict[str, Any]
    summary: Summary
    epochs: list[EpochRecord]
    steps: list[dict[str, Any]]
    events: list[Event]
    overrides: list[str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (`train.lr`), or `default` where the config lacks it."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def groups(self) -> list[str]:
        """The module groups with a per-step grad norm, in recorded (forward) order."""
        if not self.steps:
            return []
        return [k[5:] for k in self.steps[0] if k.startswith("grad/") and k not in ("grad/norm", "grad/clipped")]

    def series(self, key: str) -> np.ndarray:
        """One step-record key over the run as floats (missing or non-numeric: NaN). Shape (steps,)."""
        return np.array([_float(r.get(key)) for r in self.steps], dtype=float)


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_run(run_dir: Path) -> RunRecord:
    """Read a finished run folder. Raises DoctorError naming what is missing."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        what = "is a file, not a folder" if folder.path.exists() else "no such folder"
        raise DoctorError(f"{run_dir}: {what}; pass a run folder (with {rf.METRICS})")
    steps = folder.steps()
    if not steps:
        raise DoctorError(
            f"{run_dir} holds no step records ({rf.METRICS} missing or empty): "
            "expected a run folder written by stab run, stab sweep or the monitor API"
        )
    return RunRecord(
        folder.path,
        folder.config() or {},
        folder.summary(),
        folder.epochs(),
        steps,
        folder.events(),
        folder.overrides(),
    )


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
    out += _attention(rec)
    out += _clamp(rec)
    out += _clip_always(rec)
    out += _warmup_spike(rec)
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
    return sorted(out, key=lambda f: f.step if f.step is not None else math.inf)


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


# --- the rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A finding, the fix it suggests (config -> overrides; None where the config already has it),
    a weight that ranks the fixes of one run (higher first), and why, in words."""

    finding: str
    fix: Callable[[RunRecord, Finding], dict[str, str] | None]
    weight: float
    why: str
    source: str


def _sig(x: float) -> str:
    return f"{float(f'{x:.3g}'):g}"


def _unless(key: str, value: Any, override: dict[str, str]) -> Callable[[RunRecord, Finding], dict[str, str] | None]:
    return lambda r, f: None if r.get(key) == value else override


def _post_norm(r: RunRecord, f: Finding) -> dict[str, str] | None:
    return {"norm": "pre"} if r.get("model.norm") == "post" else None


def _larger_residual(r: RunRecord, f: Finding) -> dict[str, str] | None:
    res = r.get("model.residual")
    if not (f.detail.get("last") and f.detail.get("side") == "upper" and isinstance(res, list) and res):
        return None  # the `residual` knob is the last stage's; its own output is too small for the clamp
    return {"residual": _sig(min(10.0, 3 * float(res[-1])))}


def planned_steps(rec: RunRecord) -> int:
    """The optimizer steps the run was configured for: train.epochs x the steps of its first
    epoch (epochs.jsonl), since a run stopped early or interrupted planned more than it recorded;
    the steps it recorded where either is missing (a monitor run's config has no train.epochs)."""
    epochs = _float(rec.get("train.epochs"))
    per_epoch = _float(rec.epochs[0].get("steps")) if rec.epochs else math.nan
    recorded = len(rec.steps)
    if math.isfinite(epochs) and math.isfinite(per_epoch) and epochs * per_epoch > 0:
        return max(int(epochs * per_epoch), recorded)
    return recorded


def _longer_warmup(r: RunRecord, f: Finding) -> dict[str, str] | None:
    """4x the run's warmup, at least 20 steps, but at most half the steps the run was planned for
    (`planned_steps`): a warmup as long as the run never reaches the learning rate the run failed
    at, so a fix trained with it would pass only by never testing that rate (the newcomer's
    30-step run was offered warmup=40). None where that cap is no longer than the warmup it had."""
    had = int(r.get("train.warmup", 0) or 0)
    want = min(max(4 * had, 20), planned_steps(r) // 2)
    return {"warmup": str(want)} if want > had else None


def _add_clip(r: RunRecord, f: Finding) -> dict[str, str] | None:
    return {"clip": "1"} if r.get("train.clip") is None else None


def _lower_lr(r: RunRecord, f: Finding) -> dict[str, str] | None:
    lr = _float(r.get("train.lr"))
    return {"train.lr": _sig(lr / 3)} if math.isfinite(lr) else None


# The doctor's knowledge, one rule a line: finding -> fix, weight, why. Source on each line.
RULES: tuple[Rule, ...] = (
    # Measured: default preset, lr 1e-2, 5 seeds: post-norm exploding 9/10, pre-norm stable 10/10 (issue 13's sweep;
    # README "The story"). Xiong et al. 2020, arXiv 2002.04745: post-LN gradients near the output are large at init.
    Rule(
        "grad_departure",
        _post_norm,
        0.9,
        "growth starts in a post-norm stack: pre-norm keeps the residual path an identity",
        "arXiv 2002.04745; measured: default preset lr 1e-2, pre-norm stable 10/10 vs post-norm 1/10",
    ),
    # Dehghani et al. 2023, arXiv 2302.05442 and Wortsman et al. 2023, arXiv 2309.14322 §3.1: QK-layernorm caps the
    # attention logits and removes this instability; measured here: max logit 5.1e4 -> 22 (char LM, lr 0.1, issue 13).
    Rule(
        "attn_logit",
        _unless("model.qk_norm", True, {"qk_norm": "true"}),
        0.85,
        "near one-hot attention (logits past detect.attn_logit_max, or entropy collapse)",
        "arXiv 2302.05442, arXiv 2309.14322 §3.1, arXiv 2303.06296",
    ),
    # Measured (the seed's fix, issue 13): stage 2 at residual 0.1 has RMS 0.82 and needs scale > 1.5, pinned at the
    # clamp; residual 0.3 gives RMS 1.85, experiment=seed_fix is stable 3/3.
    Rule(
        "clamp_saturated",
        _larger_residual,
        0.7,
        "the last stage's output is too small for its RMS-match clamp",
        "measured: the seed's fix, stage-2 RMS 0.82 at residual 0.1 vs 1.85 at 0.3",
    ),
    # Miyato et al. 2018, arXiv 1802.05957 (spectral norm bounds a layer's Lipschitz constant); the seed's fix:
    # spectral_norm on output_proj, measured stable 2/2 (issue 13).
    Rule(
        "output_proj_gradient",
        _unless("model.spectral_norm", True, {"spectral_norm": "true"}),
        0.6,
        "the output projection's gradient dominates the peak",
        "arXiv 1802.05957; the seed's fix",
    ),
    # Wortsman et al. 2023, arXiv 2309.14322 §3.4: longer warmup lowers LR sensitivity; Gilmer et al. 2021,
    # arXiv 2110.04369: warmup lets curvature settle before the full learning rate.
    Rule(
        "warmup_spike",
        _longer_warmup,
        0.5,
        "the loss spikes as the warmup ends",
        "arXiv 2309.14322 §3.4, arXiv 2110.04369",
    ),
    Rule("warmup_spike", _lower_lr, 0.4, "the loss spikes at the full learning rate", "arXiv 2309.14322"),
    # With every step clipped the update is lr x clip / |g|: the learning rate is too high for the clip (measured:
    # issue 13, clip 1 on the char LM at lr 3e-2 fired on almost every step).
    Rule("clip_always", _lower_lr, 0.45, "clipping fires on every step", "measured: char LM clip 1 at lr 3e-2"),
    # Wortsman et al. 2023, arXiv 2309.14322 Fig. 1: every instability they study appears above some learning rate;
    # `stab margin` measures where. The fallback for any unstable run.
    # A run whose loss ended above where it started took steps too large for the loss surface: Wortsman et al. 2023,
    # arXiv 2309.14322, count it a complete failure, and every instability of their Fig. 1 sets in above some
    # learning rate (lower it: measured here, char LM smoke preset pre-norm: lr 10 diverged, val 762 against 4.45 at
    # init; lr 1e-2 stable). Longer warmup lowers the LR sensitivity (§3.4); gradient clipping bounds each step's size
    # (Pascanu et al. 2013, arXiv 1211.5063) where the run had none.
    Rule(
        vd.DIVERGED,
        _lower_lr,
        0.8,
        "the loss ended above where it started: steps too large for this learning rate",
        "arXiv 2309.14322 Fig. 1; measured: char LM smoke, lr 10 diverged, lr 1e-2 stable",
    ),
    Rule(vd.DIVERGED, _longer_warmup, 0.5, "a longer warmup lowers LR sensitivity", "arXiv 2309.14322 §3.4"),
    Rule(
        vd.DIVERGED,
        _add_clip,
        0.4,
        "no gradient clipping bounds the step",
        "arXiv 1211.5063",
    ),
    Rule("unstable", _lower_lr, 0.3, "the run is unstable at this learning rate", "arXiv 2309.14322 Fig. 1"),
)


@dataclass
class Fix:
    """A candidate fix: its overrides, the rule and finding behind it, its rank score."""

    overrides: dict[str, str]
    finding: Finding
    rule: Rule
    score: float

    @property
    def label(self) -> str:
        """The fix's overrides as one line: "train.clip=1 norm=pre"."""
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


@dataclass
class Diagnosis:
    """`verdict` (summary.json's, or None), every `finding` (earliest first), `fixes` ranked best
    first, and the fixes a rule proposed that the run's model cannot take, each with why (`refused`)."""

    record: RunRecord
    verdict: str | None
    findings: list[Finding]
    fixes: list[Fix]
    refused: list[tuple[Fix, str]] = field(default_factory=list)

    @property
    def first(self) -> Finding | None:
        """What went wrong first: where the gradients left their baseline, else the earliest
        finding with a step (a clamp bound from step 0 is a condition, not the event)."""
        located = [f for f in self.findings if f.kind == "grad_departure"] or [
            f for f in self.findings if f.step is not None
        ]
        return located[0] if located else (self.findings[0] if self.findings else None)


def examine(
    rec: RunRecord,
    rules: Sequence[Rule] = RULES,
    refuse: Callable[[dict[str, str]], str | None] | None = None,
) -> Diagnosis:
    """Findings of a run and the fixes `rules` propose for them, ranked by rule weight; one entry
    per distinct override set (the best-weighted). `refuse(overrides)` says why the run's model
    cannot take a fix (the one line `stab run` would refuse it with: `qk_norm=true` for a factory
    that does not read qk_norm), or None; a refused fix is not ranked but kept in `refused`."""
    findings = find(rec)
    if any(f.kind == "injected_fault" for f in findings):
        return Diagnosis(rec, rec.summary.get("verdict"), findings, [])
    best: dict[tuple[tuple[str, str], ...], Fix] = {}
    for f in findings:
        for rule in rules:
            if rule.finding != f.kind:
                continue
            over = rule.fix(rec, f)
            if not over:
                continue
            score = rule.weight
            key = tuple(sorted(over.items()))
            if key not in best or score > best[key].score:
                best[key] = Fix(dict(over), f, rule, score)
    fixes = sorted(best.values(), key=lambda x: -x.score)
    why = {id(x): refuse(x.overrides) for x in fixes} if refuse else {}
    refused = [(x, w) for x in fixes if (w := why.get(id(x)))]
    fixes = [x for x in fixes if not why.get(id(x))]
    return Diagnosis(rec, rec.summary.get("verdict"), findings, fixes, refused)


# --- stab doctor --try: the fixes to train, and what they did ---------------------------------


def candidates(dx: Diagnosis, n: int) -> list[dict[str, str]]:
    """The first `n` fixes alone, then the best two together (when they set different keys)."""
    alone = [x.overrides for x in dx.fixes[:n]]
    out = list(alone)
    if len(alone) >= 2 and not set(alone[0]) & set(alone[1]):
        out.append({**alone[0], **alone[1]})
    return out


def outcome(dx: Diagnosis, base: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which fixes made the run stable, each with its final validation loss and its cost against
    the best stable fix (a difference of validation losses)."""
    fixed = [
        r
        for r in rows
        if not vd.is_unstable(r["verdict"]) and r["verdict"] != "?" and math.isfinite(r["final_val_loss"])
    ]
    best = min(fixed, key=lambda r: r["final_val_loss"]) if fixed else None
    for r in rows:
        r["vs_best"] = (r["final_val_loss"] - best["final_val_loss"]) if best and r in fixed else None
    failed_val = float(dx.record.summary.get("final_val_loss", math.nan))
    if best:
        others = [f"{r['fix']} (val {r['final_val_loss']:.3g}, +{r['vs_best']:.3g})" for r in fixed if r is not best]
        sentence = (
            f"fixed by {len(fixed)} of {len(rows)}: best {best['fix']} (final val loss {best['final_val_loss']:.3g} "
            f"against {failed_val:.3g} in the failed run)" + (f"; also {', '.join(others)}" if others else "")
        )
    else:
        sentence = f"none of the {len(rows)} fixes made the run stable: " + ", ".join(
            f"{r['fix']} {r['verdict']}" for r in rows
        )
    return {
        "run": str(dx.record.path),
        "verdict": dx.verdict,
        "base_overrides": base,
        "failed_val_loss": failed_val,
        "tries": rows,
        "fixed": [r["fix"] for r in fixed],
        "best": best["fix"] if best else None,
        "sentence": sentence,
    }


def try_markdown(res: dict[str, Any]) -> str:
    """doctor.md: the fixes tried, their verdicts and validation losses, the sentence."""
    lines = [
        f"# stab doctor --try: {res['run']}",
        "",
        f"Failed run: verdict {res['verdict']}, final validation loss "
        f"{res['failed_val_loss']:.4g}; fixes trained from its exact config: `{' '.join(res['base_overrides']) or '(defaults)'}`.",
        "",
        "| fix | verdict | final val loss | vs best fix | folder |",
        "|---|---|---|---|---|",
    ]
    for r in res["tries"]:
        vs = f"+{r['vs_best']:.3g}" if r["vs_best"] is not None else "-"
        lines.append(f"| {r['fix']} | {r['verdict']} | {r['final_val_loss']:.4g} | {vs} | {r['folder']} |")
    return "\n".join(lines + ["", res["sentence"], ""])
