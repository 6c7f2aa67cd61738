"""Stability margin: the largest learning rate at which each configuration still trains stably.

A configuration's margin is found by bracketing then bisection on a log scale. The learning
rates tried lie on one grid, lo * r^k with r = (hi/lo)^(1/K) and K = ceil(log(hi/lo) / log(tolerance)),
so r <= tolerance. Bisection runs over the grid index, and the answer is two neighbouring
grid points: the largest stable lr and the smallest unstable one, within a factor r of each
other. An exhaustive LR grid at the same resolution (as Wortsman et al. 2023, arXiv 2309.14322,
sweep to measure LR sensitivity) trains K + 1 runs per configuration. The search trains
at most 2 + ceil(log2 K) when the boundary lies in [lo, hi] (`promised_probes`), plus one probe per
widening when it does not (hi stable: the bracket moves up by its own width, at most to lr 10;
lo unstable: it moves down).

Every configuration advances one probe per round, so a round's probes can run together as one
sweep. `find_margins` takes the probe as a callable (a real sweep in `stab margin`, a function
of lr in the tests).

    margins = find_margins(["pre", "post"], probe, lo=1e-3, hi=1e-1, tolerance=1.5, steps=10)
    margins["pre"].stable_lr      # largest lr that trained stably
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from stability.lr_sensitivity import lr_sensitivity
from stability.record import verdicts as vd

LR_MAX = 10.0  # the largest train.lr the config accepts: widening upwards stops here


@dataclass
class Probe:
    """One probe run: its lr, whether it was stable (`verdicts.is_unstable` is false), and what the run
    folder recorded (verdict, folder, validation loss at the end, loss at init, wall seconds,
    whether it stopped early once the verdict was certain)."""

    lr: float
    stable: bool
    verdict: str = ""
    folder: str | None = None
    final_val_loss: float = math.nan
    initial_loss: float = math.nan
    wall_s: float = math.nan
    stopped_early: bool = False
    round: int = 0
    n: int = 1  # replicates (seeds) behind this probe
    n_unstable: int = 0  # ... of which unstable
    verdicts: list[str] = field(default_factory=list)  # each replicate's verdict
    borderline: list[str] = field(default_factory=list)  # what was within detect.band of its threshold


def replicate(lr: float, probes: Sequence[Probe]) -> Probe:
    """One probe from several seeds' runs at the same lr: unstable when any seed is (the margin is
    where failures start, so one failing seed in three fails the learning rate), with the
    unstable count, the median final validation loss and initial loss, the summed wall time."""
    import statistics

    bad = sum(not p.stable for p in probes)
    finite = [p.final_val_loss for p in probes if math.isfinite(p.final_val_loss)]
    inits = [p.initial_loss for p in probes if math.isfinite(p.initial_loss)]
    verdicts = [p.verdict for p in probes]
    summary = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    return Probe(
        lr,
        stable=bad == 0,
        verdict=summary,
        folder=probes[0].folder if probes else None,
        final_val_loss=statistics.median(finite) if finite else math.nan,
        initial_loss=statistics.median(inits) if inits else math.nan,
        wall_s=sum(p.wall_s for p in probes if math.isfinite(p.wall_s)),
        stopped_early=all(p.stopped_early for p in probes),
        n=len(probes),
        n_unstable=bad,
        verdicts=verdicts,
        borderline=sorted({b for p in probes for b in p.borderline}),
    )


@dataclass
class Margin:
    """One configuration's result. `stable_lr`: largest lr probed stable (None: none was);
    `unstable_lr`: smallest lr probed unstable (None: none was); `status`: found (neighbouring
    grid points), above (stable at the largest lr tried), below (unstable at the smallest),
    budget (margin.steps ran out first) or non_monotone (a probe above the lowest unstable one was
    stable: stability is not monotone in the learning rate, so bisection's premise fails; the
    margin is then the largest stable lr below the LOWEST failing one, and `stable_above` lists
    the stable lrs above it)."""

    config: str
    stable_lr: float | None
    unstable_lr: float | None
    status: str
    probes: list[Probe] = field(default_factory=list)
    stable_above: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The margin in words: "0.003", "< 0.0001" (unstable at the lowest lr), ">= 0.1" (stable at the highest), with any non-monotone note."""
        if self.status == "below" or (self.stable_lr is None and self.unstable_lr is not None):
            core = f"< {self.unstable_lr:.3g}"
        elif self.status == "above":
            core = f">= {self.stable_lr:.3g}"
        else:
            core = f"{self.stable_lr:.3g}" if self.stable_lr is not None else "?"
        if self.stable_above:
            core += (
                f" (non-monotone: unstable at {self.unstable_lr:.3g}, stable again at "
                f"{', '.join(f'{x:.3g}' for x in self.stable_above)})"
            )
        return core


def grid_size(lo: float, hi: float, tolerance: float) -> int:
    """K: the number of grid steps between lo and hi, each at most a factor `tolerance`."""
    return max(1, math.ceil(math.log(hi / lo) / math.log(tolerance) - 1e-9))


def promised_probes(lo: float, hi: float, tolerance: float) -> int:
    """The most probes a configuration takes when its boundary lies in [lo, hi]: both ends, then
    bisection of the K grid steps between them (ceil(log2 K); floor(log2 K) on some sides)."""
    return 2 + math.ceil(math.log2(grid_size(lo, hi, tolerance)))


class Search:
    """One configuration's bracketing + bisection over grid indices k (lr = lo * r^k)."""

    def __init__(self, lo: float, hi: float, tolerance: float, steps: int) -> None:
        self.lo, self.K, self.steps = lo, grid_size(lo, hi, tolerance), steps
        self.r = (hi / lo) ** (1.0 / self.K)
        self.results: dict[int, bool] = {}

    def lr(self, k: int) -> float:
        """The learning rate at grid index k: lo x r^k, to 3 significant digits."""
        return float(f"{self.lo * self.r**k:.3g}")  # 3 significant digits: readable folder names

    def _bounds(self) -> tuple[int | None, int | None]:
        """(the largest stable index below the lowest unstable one, the lowest unstable index): the
        margin is the lowest failing learning rate even where a higher one trained stably."""
        unstable = [k for k, ok in self.results.items() if not ok]
        u = min(unstable) if unstable else None
        stable = [k for k, ok in self.results.items() if ok and (u is None or k < u)]
        return (max(stable) if stable else None), u

    def stable_above(self) -> list[int]:
        """Indices probed stable above the lowest unstable one: stability is not monotone in lr there."""
        _, u = self._bounds()
        return sorted(k for k, ok in self.results.items() if ok and u is not None and k > u)

    def next(self) -> list[int]:
        """The grid indices to probe in the next round ([] when done)."""
        if not self.results:
            return [0, self.K]
        if len(self.results) >= self.steps:
            return []
        s, u = self._bounds()
        if s is None:  # unstable everywhere tried: widen downwards
            assert u is not None  # some result exists, so one bound does
            return [u - self.K]
        if u is None:  # stable everywhere tried: widen upwards, not past LR_MAX
            k = s + self.K
            while k > s and self.lr(k) > LR_MAX:
                k -= 1
            return [k] if k > s and k not in self.results else []
        if u - s <= 1:
            return []
        return [(s + u) // 2]

    def tell(self, k: int, stable: bool) -> None:
        """Record the probe at grid index k: stable or not."""
        self.results[k] = stable

    def status(self) -> str:
        """found, below (unstable at lo), above (stable at hi), budget (probes spent) or non_monotone."""
        s, u = self._bounds()
        if self.stable_above():
            return "non_monotone"
        if s is not None and u is not None and u - s <= 1:
            return "found"
        return "below" if s is None else "above" if u is None else "budget"


def find_margins(
    configs: Sequence[str],
    probe: Callable[[list[tuple[str, float]]], list[Probe]],
    lo: float,
    hi: float,
    tolerance: float,
    steps: int,
) -> dict[str, Margin]:
    """The margin of every configuration. Each round asks `probe` for one batch of
    (configuration, lr) pairs (every configuration still searching, one or two lrs each) and
    expects one Probe per pair, in order. Raises ValueError on a bad bracket or tolerance."""
    if not (0 < lo < hi):
        raise ValueError(f"margin.lo={lo!r}, margin.hi={hi!r}: expected 0 < lo < hi")
    if tolerance <= 1:
        raise ValueError(f"margin.tolerance={tolerance!r}: expected a factor > 1")
    searches = {c: Search(lo, hi, tolerance, steps) for c in configs}
    done: dict[str, list[Probe]] = {c: [] for c in configs}
    rnd = 0
    while True:
        asks = [(c, k) for c, s in searches.items() for k in s.next()]
        if not asks:
            break
        rnd += 1
        results = probe([(c, searches[c].lr(k)) for c, k in asks])
        if len(results) != len(asks):
            raise RuntimeError(f"probe returned {len(results)} results for {len(asks)} probes")
        for (c, k), p in zip(asks, results):
            p.round = rnd
            searches[c].tell(k, p.stable)
            done[c].append(p)
    out = {}
    for c, s in searches.items():
        st, un = s._bounds()
        out[c] = Margin(
            c,
            s.lr(st) if st is not None else None,
            s.lr(un) if un is not None else None,
            s.status(),
            sorted(done[c], key=lambda p: p.lr),
            [s.lr(k) for k in s.stable_above()],
        )
    return out


# --- the result table -----------------------------------------------------------------------


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
