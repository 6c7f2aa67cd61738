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
from dataclasses import dataclass, field

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
