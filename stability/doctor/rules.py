"""The doctor's rules: `RULES` maps a finding to the override that answers it, a weight that
ranks it and the paper or measured case it comes from; `examine` applies them to a run's
findings and ranks the fixes.

    dx = examine(read_run(run_dir))   # dx.findings, dx.fixes (best first), dx.refused
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stability.doctor.findings import Finding, find
from stability.doctor.record import RunRecord, _float
from stability.record import verdicts as vd

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
        """What went wrong first: a non-finite batch, else where the gradients left their baseline, else the earliest
        finding with a step (a clamp bound from step 0 is a condition, not the event)."""
        data = [f for f in self.findings if f.kind == "data_nonfinite"]
        if data:  # a non-finite batch explains the first NaN, whatever the gradients did before it
            return data[0]
        located = [f for f in self.findings if f.kind == "grad_departure"] or [
            f for f in self.findings if f.step is not None
        ]
        return located[0] if located else (self.findings[0] if self.findings else None)


# Findings no configuration change removes: an injected fault, non-finite data.
NO_FIX = ("injected_fault", "data_nonfinite")


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
    if any(f.kind in NO_FIX for f in findings):
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
