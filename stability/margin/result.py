"""A margin search's result: the sentence comparing configurations, the factor ratios, LR
sensitivity over the probes (and the floor the margin alone puts under it), the notes on
non-monotone and borderline margins, margin.json's dict and margin.md.

    res = result(margins, lo, hi, tolerance, wall_s, concurrency)   # margin.json
    text = markdown(res)                                            # margin.md
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pandas as pd

from stability.lr_sensitivity import lr_sensitivity
from stability.margin.search import Margin, grid_size, promised_probes
from stability.record import verdicts as vd


def sensitivity(margins: dict[str, Margin]) -> dict[str, float]:
    """Wortsman et al.'s LR sensitivity (arXiv 2309.14322) over each configuration's probes:
    mean over its lrs of min(final validation loss, initial loss) - the best of them; an unstable
    probe counts as its initial loss, as a diverged run does in the paper. NaN below 2 probes."""
    rows = [
        {
            "config": m.config,
            "train.lr": p.lr,
            "initial_loss": p.initial_loss,
            "final_loss": p.final_val_loss if p.stable else math.nan,
        }
        for m in margins.values()
        for p in m.probes
    ]
    if not rows:
        return {}
    table = lr_sensitivity(pd.DataFrame(rows), ["config"])
    return dict(zip(table["config"], table["lr_sensitivity"]))


def comparison(margins: dict[str, Margin]) -> str:
    """One sentence: the most stable configuration against the least, as a ratio of margins,
    qualified by its evidence (`_evidence`): how many seeds stand behind each probe, and whether
    a margin rests on a borderline probe."""
    text = _comparison(margins)
    return text + _evidence(margins) if text else text


def _evidence(margins: dict[str, Margin]) -> str:
    """`; one seed per probe: ...` (or `; 3 seeds per probe, ...`) and a pointer to the borderline
    notes, so the sentence does not read as a tested fact where it is not one."""
    ns = [p.n for m in margins.values() for p in m.probes]
    n = min(ns, default=1)
    out = (
        "; one seed per probe: untested (seed=0,1,2 replicates every probe; a learning rate then fails "
        "when any seed is unstable)"
        if n <= 1
        else f"; {n} seeds per probe, a learning rate failing when any seed is unstable"
    )
    if any(borderline_text(m) for m in margins.values()):
        out += "; a margin rests on a borderline probe (see below)"
    return out


def _comparison(margins: dict[str, Margin]) -> str:
    """The comparison itself (`comparison`), without its evidence."""
    lr = {c: m.stable_lr for c, m in margins.items() if m.stable_lr is not None}  # the configs with a stable lr
    if len(margins) < 2:
        return ""

    def down_to(configs: list[str]) -> float:  # the smallest lr tried, all unstable
        return min(u for c in configs if (u := margins[c].unstable_lr) is not None)

    if len(lr) < len(margins):
        never = [c for c in margins if c not in lr]
        if not lr:
            return f"no configuration trained stably at any learning rate tried (down to {down_to(never):.3g})"
        best_c = max(lr, key=lambda c: lr[c])
        return (
            f"{margins[best_c].config} is stable up to lr {lr[best_c]:.3g}; {', '.join(margins[c].config for c in never)} "
            f"was unstable at every learning rate tried (down to {down_to(never):.3g})"
        )
    best_c, worst_c = max(lr, key=lambda c: lr[c]), min(lr, key=lambda c: lr[c])
    best, worst, ratio = margins[best_c], margins[worst_c], lr[best_c] / lr[worst_c]
    at_least = " at least" if best.status == "above" else ""
    if ratio < 1.0001:
        return f"every configuration is stable up to the same learning rate ({lr[best_c]:.3g}) at this resolution"
    return (
        f"{best.config} is stable up to{at_least} {ratio:.3g}x the learning rate of {worst.config} "
        f"({best.text} vs {worst.text})"
    )


def sensitivity_floor(m: Margin, lo: float, hi: float, tolerance: float) -> tuple[float, float]:
    """(share of the exhaustive grid's K + 1 points above the margin, that share x (initial loss -
    best stable validation loss)): what the margin alone says about Wortsman et al.'s LR
    sensitivity on that grid. Each point above the margin diverges (if stability is monotone in
    lr) and counts as initial - best, so the grid's sensitivity is at least this floor; the stable
    points add their mean excess loss on top. NaN without a stable probe."""
    K = grid_size(lo, hi, tolerance)
    r = (hi / lo) ** (1.0 / K)
    if m.stable_lr is None:
        share = 1.0
    else:
        k = round(math.log(m.stable_lr / lo) / math.log(r))
        share = min(1.0, max(0.0, (K - k) / (K + 1)))
    stable = [p.final_val_loss for p in m.probes if p.stable and math.isfinite(p.final_val_loss)]
    init = [p.initial_loss for p in m.probes if math.isfinite(p.initial_loss)]
    if not stable or not init:
        return share, math.nan
    return share, share * max(0.0, float(pd.Series(init).median()) - min(stable))  # a cap is never below the best


def factor_ratios(margins: dict[str, Margin]) -> list[str]:
    """Per factor, the ratio of margins between its values with every other factor held, for
    configurations named `key=value key=value`: "norm: pre/post 3.16x at residual=0.1, ..."."""
    parsed: dict[str, tuple[dict[str, str], float]] = {}  # config -> (its key=value pairs, its stable lr)
    for m in margins.values():
        pairs = [t.split("=", 1) for t in m.config.split()]
        if not pairs or any(len(p) != 2 for p in pairs) or m.stable_lr is None:
            return []
        parsed[m.config] = (dict(pairs), m.stable_lr)
    keys = sorted({k for d, _ in parsed.values() for k in d})
    out = []
    for key in keys:
        values = list(dict.fromkeys(d[key] for d, _ in parsed.values() if key in d))
        if len(values) != 2:
            continue
        parts = []
        for d, lr in parsed.values():
            if d.get(key) != values[0]:
                continue
            other = next(
                (
                    m2
                    for d2, m2 in parsed.values()
                    if d2.get(key) == values[1]
                    and {k: v for k, v in d2.items() if k != key} == {k: v for k, v in d.items() if k != key}
                ),
                None,
            )
            if other is not None:
                held = " ".join(f"{k}={v}" for k, v in d.items() if k != key)
                parts.append(f"{lr / other:.3g}x" + (f" at {held}" if held else ""))
        if parts:
            out.append(f"{key}: margin at {values[0]} / at {values[1]} = {', '.join(parts)}")
    return out


def result(
    margins: dict[str, Margin], lo: float, hi: float, tolerance: float, wall_s: float, concurrency: int
) -> dict[str, Any]:
    """Everything `stab margin` reports, as plain data (margin.json): per configuration its margin,
    bracket, status, ratio to the least stable, LR sensitivity and probes; the cost of the search
    against an exhaustive grid of the same resolution."""
    K = grid_size(lo, hi, tolerance)
    sens = sensitivity(margins)
    known = [m.stable_lr for m in margins.values() if m.stable_lr is not None]
    floor = min(known) if known else None
    probes = [p for m in margins.values() for p in m.probes]
    full = [p.wall_s for p in probes if not p.stopped_early and math.isfinite(p.wall_s)]
    per_run = float(pd.Series(full).median()) if full else math.nan
    widened = sum(max(0, len(m.probes) - promised_probes(lo, hi, tolerance)) for m in margins.values())
    exhaustive = (K + 1) * len(margins)
    return {
        "lo": lo,
        "hi": hi,
        "tolerance": tolerance,
        "grid_steps": K,
        "grid_ratio": (hi / lo) ** (1 / K),
        "configs": [
            {
                "config": m.config,
                "margin": m.stable_lr,
                "unstable_lr": m.unstable_lr,
                "status": m.status,
                "text": m.text,
                "stable_above": m.stable_above,
                "ratio": (m.stable_lr / floor) if m.stable_lr and floor else None,
                "lr_sensitivity": sens.get(m.config, math.nan),
                "grid_share_unstable": sensitivity_floor(m, lo, hi, tolerance)[0],
                "lr_sensitivity_floor": sensitivity_floor(m, lo, hi, tolerance)[1],
                "probes": [asdict(p) for p in m.probes],
            }
            for m in margins.values()
        ],
        "sentence": comparison(margins),
        "by_factor": factor_ratios(margins),
        "non_monotone": [non_monotone_text(m) for m in margins.values() if m.stable_above],
        "borderline": [t for m in margins.values() if (t := borderline_text(m))],
        "cost": {
            "probes": len(probes),
            "stopped_early": sum(p.stopped_early for p in probes),
            "promised_per_config": promised_probes(lo, hi, tolerance),
            "widening_probes": widened,
            "rounds": max((p.round for p in probes), default=0),
            "wall_s": wall_s,
            "concurrency": concurrency,
            "train_s": float(sum(p.wall_s for p in probes if math.isfinite(p.wall_s))),
            "exhaustive_runs": exhaustive,
            "median_full_run_s": per_run,
            "exhaustive_train_s_estimate": exhaustive * per_run,
        },
    }


def non_monotone_text(m: Margin) -> str:
    """The sentence for a configuration whose stability is not monotone in the learning rate."""
    above = ", ".join(f"{x:.3g}" for x in m.stable_above)
    below = (
        f"the largest stable lr below it is {m.stable_lr:.3g}"
        if m.stable_lr is not None
        else "no lr below it was found stable"
    )
    return (
        f"{m.config}: stability is not monotone in the learning rate: unstable at {m.unstable_lr:.3g} but stable "
        f"again at {above}. The margin reported is the lowest failing lr ({m.unstable_lr:.3g}; {below}), not a "
        "bisection between a stable and an unstable probe; a fixed grid over the range shows the whole curve"
    )


def borderline_text(m: Margin) -> str:
    """The sentence for a configuration whose margin rests on a borderline probe (a finding
    within detect.band of its threshold at the largest stable or the smallest unstable lr: that
    probe's verdict could go either way, so the margin could move one grid step), or on an
    inconclusive one (not found unstable, not judged stable either), or ''."""
    near = {p.lr: [b for b in p.borderline if b != "undertrained"] for p in m.probes}
    edge = [p for p in m.probes if near[p.lr] and p.lr in (m.stable_lr, m.unstable_lr)]
    unsure = [
        p for p in m.probes if p.lr == m.stable_lr and ("inconclusive" in p.verdict or "undertrained" in p.borderline)
    ]
    out = []
    if edge:
        parts = [f"{p.lr:.3g} ({'stable' if p.stable else 'unstable'}; {', '.join(near[p.lr])})" for p in edge]
        out.append(
            f"{m.config}: the margin rests on a borderline probe at lr {'; '.join(parts)}: a finding within "
            "detect.band of its threshold, so that verdict could go either way and the margin could move a grid "
            "step; more seeds (seed=0,1,2) settle it"
        )
    if unsure:
        out.append(
            f"{m.config}: the largest lr not found unstable, {unsure[0].lr:.3g}, is "
            f"{'inconclusive' if 'inconclusive' in unsure[0].verdict else 'undertrained'}, not judged stable (too "
            "short to judge, or its output stayed collapsed while its loss still fell: a scream is not ruled out); "
            "the margin counts it as not unstable: more epochs (train.epochs) would judge it"
        )
    return "; ".join(out)


def probe_text(p: dict[str, Any]) -> str:
    """`3.16e-02 stable` / `1e-01 exploding (stopped early)`, for a probe of margin.json; a probe
    over several seeds: `0.1 unstable 2/3 (21%..94%): 2 diverged, 1 stable`, the unstable count with
    its 95% Wilson interval."""
    if p.get("n", 1) > 1:
        from stability.report.factors import share_interval

        lo, hi = share_interval(p["n_unstable"], p["n"])
        return (
            f"{p['lr']:.3g} {'stable' if p['stable'] else 'unstable'} {p['n_unstable']}/{p['n']} "
            f"({lo:.0%}..{hi:.0%}): {p['verdict']}"
        ) + (f" (borderline: {', '.join(p['borderline'])})" if p.get("borderline") else "")
    return (
        f"{p['lr']:.3g} {p['verdict'] or ('stable' if p['stable'] else 'unstable')}"
        + (" (stopped early)" if p.get("stopped_early") else "")
        + (f" (borderline: {', '.join(p['borderline'])})" if p.get("borderline") else "")
    )


def markdown(res: dict[str, Any]) -> str:
    """margin.md: the table, the sentence, the cost."""
    lines = [
        "# Stability margin",
        "",
        f"Largest learning rate that trains without {'/'.join(vd.UNSTABLE)} (inconclusive counts as not unstable), "
        f"bracketing then bisection on a log "
        f"grid from {res['lo']:g} to {res['hi']:g} in {res['grid_steps']} steps of x{res['grid_ratio']:.3g} "
        f"(margin.tolerance {res['tolerance']:g}).",
        "",
        "| configuration | margin (largest stable lr) | smallest unstable lr | status | x least stable | "
        "grid share above margin | LR sensitivity floor | LR sensitivity over probes | probes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        un = f"{c['unstable_lr']:.3g}" if c["unstable_lr"] else "-"
        ratio = f"{c['ratio']:.3g}" if c["ratio"] else "-"
        sens = (
            f"{c['lr_sensitivity']:.3g}"
            if c["lr_sensitivity"] is not None and math.isfinite(c["lr_sensitivity"])
            else "-"
        )
        floor = f"{c['lr_sensitivity_floor']:.3g}" if math.isfinite(c["lr_sensitivity_floor"]) else "-"
        lines.append(
            f"| {c['config']} | {c['text']} | {un} | {c['status']} | {ratio} | "
            f"{c['grid_share_unstable']:.0%} | {floor} | {sens} | "
            f"{'; '.join(probe_text(p) for p in c['probes'])} |"
        )
    cost = res["cost"]
    lines += (
        ["", res["sentence"], ""]
        + [f"- {f}" for f in res.get("non_monotone", [])]
        + [f"- {f}" for f in res.get("borderline", [])]
        + [f"- {f}" for f in res.get("by_factor", [])]
        + [
            "",
            "LR sensitivity (Wortsman et al. 2023, arXiv 2309.14322) is the mean over an LR grid of min(final loss, "
            "initial loss) - the best loss. On the exhaustive grid of this resolution every point above the margin "
            "diverges and counts as initial - best, so the margin alone gives its floor (grid share above the "
            "margin x (initial - best)); the stable points add their excess loss. 'Over probes' is the same formula "
            "over this search's own probes: they cluster at each configuration's boundary, so compare it only "
            "within one row.",
            "",
            f"Cost: {cost['probes']} probe runs in {cost['rounds']} rounds ({cost['stopped_early']} stopped early once "
            f"unstable), {cost['wall_s']:.0f} s wall ({cost['concurrency']} at a time), {cost['train_s']:.0f} s of "
            f"training summed. An exhaustive grid at the same resolution: {cost['exhaustive_runs']} runs, about "
            f"{cost['exhaustive_train_s_estimate']:.0f} s of training at the median full run "
            f"({cost['median_full_run_s']:.1f} s).",
            "",
        ]
    )
    return "\n".join(lines)
