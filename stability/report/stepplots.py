"""Per-step plots: one run's loss and gradient norm per step with everything that happened marked;
runs grouped by what was varied (a colour per value of one factor, a panel per value of another,
seeds as a median line with a min-max band); and which module group departed first in the
unstable runs against the stable ones. PNGs written atomically (`plots._save`).

    plot_steps(run, load_steps(run), "norm=post", out / "plots" / "steps_x.png")
    plot_grouped(runs, series, keys, out / "plots" / "grouped.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stability.record import verdicts as vd
from stability.report.loading import Run
from stability.report.plots import _plain_log_ticks, _save
from stability.report.steps import (
    StepSeries,
    departures,
    detect_settings,
    minmax_downsample,
    spikes,
)

MAX_POINTS = 1000  # points per drawn line: ~ the pixels of a panel's width
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
]  # tab10 without red (red marks NaN), then darker ones
STYLES = ["-", "--", ":", "-."]


@dataclass
class Drawn:
    """A written plot and what a reader sees in it: its legend entries and panel titles."""

    path: Path
    legend: list[str] = field(default_factory=list)
    panels: list[str] = field(default_factory=list)
    note: str = ""  # what the figure pools or leaves out, in words


def _clip_of(run: Run) -> float | None:
    clip = ((run.config or {}).get("train") or {}).get("clip")
    try:
        clip = float(clip)  # type: ignore[arg-type]  # None or "none": no line
    except (TypeError, ValueError):
        return None
    return clip if math.isfinite(clip) and clip > 0 else None


def _nonfinite_marks(ax: Any, x: np.ndarray, y: np.ndarray) -> None:
    bad = ~np.isfinite(y)
    if bad.any():  # at the top edge of the panel: a NaN has no height
        ax.plot(
            x[bad],
            np.ones(bad.sum()),
            "x",
            color="red",
            ms=6,
            mew=1.5,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=6,
        )


# --- one run -------------------------------------------------------------------------------------


def plot_steps(run: Run, s: StepSeries, name: str, path: Path, max_points: int = MAX_POINTS) -> Drawn:
    """Loss and total gradient norm per step (log y, shared step axis), thinned to `max_points`
    with each bucket's min and max kept. Marked: the clip threshold (dashed) and clipped steps,
    spikes by the run's own detector (triangles), skipped steps (grey ticks), non-finite values
    (red x at the top), the first NaN (red vertical line), epoch boundaries (dotted)."""
    fig = Figure(figsize=(10, 5.6))
    ax_loss, ax_grad = fig.subplots(2, 1, sharex=True)
    settings = detect_settings(run)
    for ax, y, label, colour in (
        (ax_loss, s.loss, "loss", "tab:blue"),
        (ax_grad, s.grad, "gradient norm", "tab:green"),
    ):
        _draw_step_series(ax, s.step, y, label, colour, spikes(y, settings), max_points)
    _mark_clip(ax_grad, _clip_of(run), s)
    legend = _mark_skipped((ax_loss, ax_grad), s)
    if (~np.isfinite(s.loss) | ~np.isfinite(s.grad)).any():
        legend.append(Line2D([], [], marker="x", color="red", ls="", label="non-finite"))
    nan = run.first_nan
    if nan and isinstance(nan.get("step"), int):
        for ax in (ax_loss, ax_grad):
            ax.axvline(nan["step"], color="red", lw=1.5, alpha=0.8)
        legend.append(
            Line2D([], [], color="red", lw=1.5, label=f"first NaN: step {nan['step']} in {nan.get('module', '?')}")
        )
    starts = _mark_epochs(ax_loss, ax_grad, s)
    if not len(s):
        ax_loss.text(0.5, 0.5, "no step recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_grad.set_xlabel("step" + (" (dotted: epoch boundaries)" if starts else ""))
    handles = [h for ax in (ax_loss, ax_grad) for h in ax.get_legend_handles_labels()[0]] + legend
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, len(handles)),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(f"{name}: {run.verdict}", fontsize=10)
    _save(fig, path)
    return Drawn(path, [h.get_label() for h in handles])


def _draw_step_series(
    ax: Any, step: np.ndarray, y: np.ndarray, label: str, colour: str, sp: np.ndarray, max_points: int
) -> None:
    """One per-step series on a log axis: thinned to `max_points` (min and max per bucket), its
    spikes `sp` (indices) as triangles, non-finite values as red x at the top."""
    xs, ys = minmax_downsample(step, y, max_points)
    ys_pos = np.where(ys > 0, ys, np.nan)
    ax.plot(
        xs,
        ys_pos,
        "-",
        color=colour,
        lw=1.0,
        label=f"{label} (min/max per {max(1, len(y) * 2 // max_points)} steps)" if len(y) > max_points else label,
    )
    if len(sp):
        ax.plot(
            step[sp],
            y[sp],
            "^",
            color="darkorange",
            ms=6,
            mec="black",
            mew=0.5,
            zorder=5,
            label=f"spike ({len(sp)})",
        )
    _nonfinite_marks(ax, step, y)
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.25)
    if np.isfinite(ys_pos).any():
        _plain_log_ticks(ax)


def _mark_clip(ax_grad: Any, clip: float | None, s: StepSeries) -> None:
    """The clip threshold as a dashed line and the clipped steps as ticks at the bottom (no clip: nothing)."""
    if clip is None:
        return
    ax_grad.axhline(clip, ls="--", color="black", lw=1, label=f"clip threshold {clip:g}")
    if s.clipped.any():
        ax_grad.plot(
            s.step[s.clipped],
            np.full(s.clipped.sum(), 0.02),
            "|",
            color="black",
            ms=6,
            transform=ax_grad.get_xaxis_transform(),
            label=f"clipped ({int(s.clipped.sum())} steps)",
        )


def _mark_skipped(axes: Sequence[Any], s: StepSeries) -> list[Any]:
    """Skipped steps as grey ticks on every panel; the legend entry for them (none if no step was skipped)."""
    if not s.skipped.any():
        return []
    for ax in axes:
        ax.plot(
            s.step[s.skipped],
            np.full(s.skipped.sum(), 0.06),
            "|",
            color="grey",
            ms=10,
            mew=2,
            transform=ax.get_xaxis_transform(),
        )
    return [
        Line2D([], [], marker="|", color="grey", ls="", ms=10, mew=2, label=f"skipped ({int(s.skipped.sum())} steps)")
    ]


def _mark_epochs(ax_loss: Any, ax_grad: Any, s: StepSeries) -> list[int]:
    """Epoch boundaries as dotted lines (labelled `e3` on the loss panel up to 30 epochs); the
    first step of each epoch after the first."""
    starts = [int(s.step[i]) for i in range(1, len(s)) if s.epoch[i] != s.epoch[i - 1]]
    for x in starts:
        for ax in (ax_loss, ax_grad):
            ax.axvline(x - 0.5, color="grey", ls=":", lw=0.8)
    if starts and len(starts) <= 30:
        for x, e in zip(starts, [int(s.epoch[s.step == x][0]) for x in starts]):
            ax_loss.text(
                x, 1.0, f" e{e}", transform=ax_loss.get_xaxis_transform(), fontsize=7, color="grey", va="bottom"
            )
    return starts


# --- which group went first ---------------------------------------------------------------------------


def departure_table(runs: Sequence[Run], series: dict[str, StepSeries]) -> list[dict[str, Any]]:
    """One row per run with per-step group norms: its verdict, the first step any group left its
    running band (`departures`), the groups that left then (`first`), and every group's step."""
    rows = []
    for r in runs:
        s = series.get(r.rel)
        if s is None or not s.groups:
            continue
        dep = {g: v for g, v in departures(s, detect_settings(r)).items() if g != "total"}
        found = [v for v in dep.values() if v is not None]
        first_step = min(found) if found else None
        rows.append(
            {
                "run": r.rel,
                "verdict": r.verdict,
                "unstable": vd.is_unstable(r.verdict),
                "first step": first_step,
                "first": [g for g, v in dep.items() if v is not None and v == first_step],
                "by group": dep,
            }
        )
    return rows


def departure_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per module group (in model order): in how many unstable and how many stable runs it was
    among the first to leave its band, and the median step it left at in each, as strings."""
    groups = [g for g in dict.fromkeys(g for r in rows for g in r["by group"]) if g != "total"]
    out = []
    for g in groups:
        row: dict[str, str] = {"group": g}
        for unstable, name in ((True, "unstable"), (False, "stable")):
            mine = [r for r in rows if r["unstable"] == unstable]
            left = [r["by group"][g] for r in mine if r["by group"].get(g) is not None]
            row[f"first in {name}"] = f"{sum(g in r['first'] for r in mine)}/{len(mine)}"
            row[f"median step left, {name}"] = f"{float(np.median(left)):g}" if left else "-"
        out.append(row)
    return pd.DataFrame(
        out,
        columns=[
            "group",
            "first in unstable",
            "median step left, unstable",
            "first in stable",
            "median step left, stable",
        ],
    )


def plot_departure(rows: Sequence[dict[str, Any]], path: Path) -> Drawn:
    """Left: per module group, the step each run's norm first left its band (red: unstable runs,
    blue: stable), one row per group. Right: in what share of the unstable and of the stable runs
    the group was among the first to leave. A group that leads in the unstable runs and not in
    the stable ones is where the instability starts."""
    groups = list(dict.fromkeys(g for r in rows for g in r["by group"]))
    groups = [g for g in groups if g != "total"]
    fig = Figure(figsize=(12, 1.6 + 0.24 * max(len(groups), 4)), layout="constrained")
    ax, ax_share = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1.4])
    y_of = {g: i for i, g in enumerate(groups)}
    rng = np.random.default_rng(0)  # jitter only; fixed so the picture is the same each time
    kinds = ((True, "tab:red", "unstable"), (False, "tab:blue", "stable"))
    for unstable, colour, _ in kinds:
        mine = [r for r in rows if r["unstable"] == unstable]
        xs, ys = [], []
        for r in mine:
            for g, step in r["by group"].items():
                if step is not None and g in y_of:
                    xs.append(step)
                    ys.append(y_of[g] + (-0.18 if unstable else 0.18) + rng.uniform(-0.08, 0.08))
        ax.plot(xs, ys, "o", color=colour, ms=3.5, alpha=0.6, ls="")
        n = max(len(mine), 1)
        share = [sum(g in r["first"] for r in mine) / n for g in groups]
        ax_share.barh(
            [y_of[g] + (-0.2 if unstable else 0.2) for g in groups], share, height=0.38, color=colour, alpha=0.8
        )
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step the group's gradient norm first left its running band")
    ax.grid(True, axis="x", alpha=0.3)
    ax_share.set_xlim(0, 1)
    ax_share.set_xlabel("share of runs where the group left first")
    ax_share.grid(True, axis="x", alpha=0.3)
    n_u, n_s = sum(r["unstable"] for r in rows), sum(not r["unstable"] for r in rows)
    never = [sum(r["first step"] is None for r in rows if r["unstable"] == u) for u, _, _ in kinds]
    handles = [
        Line2D([], [], marker="o", color=c, ls="", label=f"{name} runs ({n}; {k} never left it)")
        for (u, c, name), n, k in zip(kinds, (n_u, n_s), never)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Which module group left its running band first (band: the run's spike detector)", fontsize=10)
    if not groups:
        ax.text(0.5, 0.5, "no per-group norms recorded", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    return Drawn(path, [str(h.get_label()) for h in handles], groups)
