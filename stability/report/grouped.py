"""Runs grouped by what was varied, per step: a colour per value of the most decisive factor, a
panel per value of the next, a line style per value of a third, seeds as a median line with a
min-max band (`plot_grouped`).

    plot_grouped(runs, series, keys, out / "plots" / "grouped.png", spread)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from stability.record import verdicts as vd
from stability.report.factors import _value_order, factor_value
from stability.report.loading import Run
from stability.report.plots import _plain_log_ticks, _save
from stability.report.stepplots import PALETTE, STYLES, Drawn
from stability.report.steps import (
    StepSeries,
)


def is_seed(key: str) -> bool:
    """A factor that replicates rather than varies (`seed`, `train.seed`, `data.seed`)."""
    return key.split(".")[-1] in ("seed", "seeds")


def choose_factors(runs: Sequence[Run], keys: Sequence[str], spread: dict[str, float] | None = None) -> list[str]:
    """The factors to draw, most decisive first: by the spread of the unstable share between
    their values (`spread`, from the report's answer), then by fewer values. Seeds are left out
    (they are the band)."""
    spread = spread or {}
    varied = [k for k in keys if not is_seed(k)]
    return sorted(varied, key=lambda k: (-spread.get(k, 0.0), len({factor_value(r, k) for r in runs}), keys.index(k)))


def _band(
    series: Sequence[np.ndarray], steps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs aligned on the step: (steps, median, min, max) over the runs that have a finite
    value at each step."""
    n = max((int(s.max()) + 1 for s in steps if len(s)), default=0)
    grid = np.full((len(series), n), np.nan)
    for i, (y, s) in enumerate(zip(series, steps)):
        ok = np.isfinite(y) & (y > 0)
        grid[i, s[ok]] = y[ok]
    has = np.isfinite(grid).any(axis=0)
    x = np.arange(n)[has]
    g = grid[:, has]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return x, np.nanmedian(g, axis=0), np.nanmin(g, axis=0), np.nanmax(g, axis=0)


def _thin_band(
    x: np.ndarray, med: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A band for drawing: per bucket the lowest low, the highest high (spikes kept) and the
    median of the medians."""
    if len(x) <= max_points:
        return x, med, lo, hi
    edges = np.linspace(0, len(x), max_points + 1).astype(int)
    pick = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    return (
        np.array([x[a] for a, _ in pick]),
        np.array([np.median(med[a:b]) for a, b in pick]),
        np.array([lo[a:b].min() for a, b in pick]),
        np.array([hi[a:b].max() for a, b in pick]),
    )


@dataclass
class _Layout:
    """How `plot_grouped` splits runs: the factor for colours, for panel columns and for line
    styles (None where there is none), and each one's values in order."""

    colour_key: str | None
    panel_key: str | None
    style_key: str | None
    colours: list[str]
    panels: list[str]
    styles: list[str]

    def runs_of(self, runs: Sequence[Run], cv: str, sv: str) -> list[Run]:
        """The runs with colour value `cv` and style value `sv`."""
        return [
            r
            for r in runs
            if (not self.colour_key or factor_value(r, self.colour_key) == cv)
            and (not self.style_key or factor_value(r, self.style_key) == sv)
        ]


def _layout(runs: Sequence[Run], keys: Sequence[str], spread: dict[str, float] | None) -> _Layout:
    """The most decisive factor for colours, the next for panels, a third for line styles when it
    has at most len(STYLES) values (`choose_factors`)."""
    order = choose_factors(runs, keys, spread)
    colour_key = order[0] if order else None
    panel_key = order[1] if len(order) > 1 else None
    style_key = order[2] if len(order) > 2 and len({factor_value(r, order[2]) for r in runs}) <= len(STYLES) else None

    def values(key: str | None) -> list[str]:
        return sorted({factor_value(r, key) for r in runs}, key=_value_order) if key else [""]

    return _Layout(colour_key, panel_key, style_key, values(colour_key), values(panel_key), values(style_key))


def plot_grouped(
    runs: Sequence[Run],
    series: dict[str, StepSeries],
    keys: Sequence[str],
    path: Path,
    spread: dict[str, float] | None = None,
    max_points: int = 600,
) -> Drawn:
    """Gradient norm and loss per step across runs: one colour per value of the most decisive
    factor, one panel column per value of the next, a line style per value of a third (up to
    4 values); runs that share all drawn factors (seeds, and any further factor, named in the
    title) are one median line with a min-max band. One legend entry per colour and per style,
    never one per run. Red x: a run's first non-finite step, at the top of its panel."""
    lay = _layout(runs, keys, spread)
    pooled = [k for k in keys if k not in (lay.colour_key, lay.panel_key, lay.style_key) and not is_seed(k)]
    n_col = min(len(lay.panels), 5)
    n_wrap = math.ceil(len(lay.panels) / n_col)
    fig = Figure(figsize=(min(3.6 * n_col + 2.4, 22), 2.6 * 2 * n_wrap + 1.2), layout="constrained")
    axes = np.array(fig.subplots(2 * n_wrap, n_col, sharex=True, squeeze=False))
    colour_of = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(lay.colours)}
    style_of = {v: STYLES[i] for i, v in enumerate(lay.styles)}
    titles = []
    for p, pv in enumerate(lay.panels):
        row, col = 2 * (p // n_col), p % n_col
        mine_p = [r for r in runs if not lay.panel_key or factor_value(r, lay.panel_key) == pv]
        titles.append(
            _draw_panel(axes[row, col], axes[row + 1, col], lay, pv, mine_p, series, colour_of, style_of, max_points)
        )
        for ax, label in ((axes[row, col], "grad norm"), (axes[row + 1, col], "loss")):
            if col == 0:
                ax.set_ylabel(label)
    for p in range(len(lay.panels), n_wrap * n_col):  # empty cells of the last row
        axes[2 * (p // n_col), p % n_col].set_visible(False)
        axes[2 * (p // n_col) + 1, p % n_col].set_visible(False)
    handles = _grouped_legend(runs, series, keys, lay, pooled, colour_of, style_of)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    note = f"pooled in each band: {', '.join(pooled)}" if pooled else ""
    fig.suptitle(f"{len(runs)} runs: gradient norm and loss per step" + (f" ({note})" if note else ""), fontsize=10)
    _save(fig, path)
    return Drawn(path, [h.get_label() for h in handles], titles, note)


def _draw_panel(
    ax_g: Any,
    ax_l: Any,
    lay: _Layout,
    pv: str,
    mine_p: Sequence[Run],
    series: dict[str, StepSeries],
    colour_of: dict[str, str],
    style_of: dict[str, str],
    max_points: int,
) -> str:
    """One panel column (panel value `pv`, its runs `mine_p`): gradient norm above, loss below, a
    band and median line per colour and style; its title (without the unstable count)."""
    title = f"{lay.panel_key}={pv}" if lay.panel_key else "all runs"
    bad = sum(vd.is_unstable(r.verdict) for r in mine_p)
    ax_g.set_title(f"{title}  ({bad}/{len(mine_p)} unstable)", fontsize=9)
    for cv in lay.colours:
        for sv in lay.styles:
            mine = [r for r in lay.runs_of(mine_p, cv, sv) if r.rel in series]
            if not mine:
                continue
            line = STYLES[0] if not lay.style_key else style_of[sv]
            for ax, attr in ((ax_g, "grad"), (ax_l, "loss")):
                ys = [getattr(series[r.rel], attr) for r in mine]
                xs = [series[r.rel].step for r in mine]
                _draw_band(ax, ys, xs, colour_of[cv], line, max_points)
    for ax in (ax_g, ax_l):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        if ax.lines:
            _plain_log_ticks(ax)
        if not ax.lines:
            ax.text(0.5, 0.5, "no steps", ha="center", va="center", transform=ax.transAxes)
    ax_l.set_xlabel("step")
    return title


def _draw_band(ax: Any, ys: Sequence[np.ndarray], xs: Sequence[np.ndarray], c: str, line: str, max_points: int) -> None:
    """Runs' series `ys` at steps `xs` as a median line (style `line`, colour `c`) with a min-max
    band when there are 2+ runs; a red x at the top for each run's first non-finite step."""
    x, med, lo, hi = _thin_band(*_band(ys, xs), max_points)
    if not len(x):
        return
    if len(ys) > 1:
        ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0, step="mid")
    ax.plot(x, med, line, color=c, lw=1.3)
    for y, s in zip(ys, xs):
        bad_steps = s[~np.isfinite(y)]
        if len(bad_steps):
            ax.plot(
                [bad_steps[0]],
                [1.0],
                "x",
                color="red",
                ms=6,
                mew=1.5,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                zorder=6,
            )


def _grouped_legend(
    runs: Sequence[Run],
    series: dict[str, StepSeries],
    keys: Sequence[str],
    lay: _Layout,
    pooled: Sequence[str],
    colour_of: dict[str, str],
    style_of: dict[str, str],
) -> list[Any]:
    """One legend entry per colour (with its unstable count) and per line style, what a band
    pools, and the red x where a run went non-finite."""
    seeds = [k for k in keys if is_seed(k)]
    handles: list[Any] = []
    for cv in lay.colours:
        mine = [r for r in runs if not lay.colour_key or factor_value(r, lay.colour_key) == cv]
        bad = sum(vd.is_unstable(r.verdict) for r in mine)
        label = (
            f"{lay.colour_key}={cv}  ({bad}/{len(mine)} unstable)"
            if lay.colour_key
            else f"all runs ({bad}/{len(mine)} unstable)"
        )
        handles.append(Line2D([], [], color=colour_of[cv], lw=2, label=label))
    if lay.style_key:
        handles += [
            Line2D([], [], color="black", ls=style_of[sv], lw=1.3, label=f"{lay.style_key}={sv}") for sv in lay.styles
        ]
    group_sizes: dict[tuple[str, ...], int] = {}
    for r in runs:
        k = tuple(factor_value(r, key) for key in (lay.colour_key, lay.panel_key, lay.style_key) if key)
        group_sizes[k] = group_sizes.get(k, 0) + 1
    most = max(group_sizes.values(), default=1)
    if most > 1:
        over = f"{most} runs" + (f" ({', '.join([*seeds, *pooled])})" if seeds or pooled else "")
        handles.append(Patch(color="grey", alpha=0.3, label=f"line: median, band: min-max over up to {over}"))
    if any((~np.isfinite(series[r.rel].grad)).any() for r in runs if r.rel in series):
        handles.append(Line2D([], [], marker="x", color="red", ls="", label="a run's first non-finite step"))
    return handles
