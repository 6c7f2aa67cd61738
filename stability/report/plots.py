"""The report's plots: grad norm per epoch, loss/grad/attention-logit curves, and per-module
heatmaps of unstable runs. PNGs are rendered in memory and written atomically.

    plot_grad_norms(runs, names, out / "plots" / "grad_norm.png")
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stability.formatting import format_number
from stability.record import format as runformat
from stability.report.loading import Run, _float
from stability.report.tables import first_nan_text
from stability.storage import atomic_write_bytes


def _save(fig: Figure, path: Path) -> None:
    """Render to memory, then write atomically (a reader never sees half a PNG), with the
    permissions of any other result file (the umask's)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def plot_grad_norms(runs: Sequence[Run], names: dict[str, str], path: Path) -> Path:
    """Mean gradient norm per epoch, one line per run (log y); the epoch where a run's norm went
    NaN or inf is marked with a red X on its last finite value, the per-epoch max is dotted."""
    plotted = [r for r in runs if r.series("grad_norm_by_epoch")]
    fig = Figure(figsize=(9, 4.8 + 0.22 * max(0, len(plotted) - 12)))
    ax = fig.add_subplot()
    palette = [f"C{i}" for i in range(10) if i != 3]  # C3 is red: red is kept for the NaN marks
    colours = [palette[i % len(palette)] for i in range(len(plotted))]
    styles = ["-", "--", "-.", ":"]
    marked = False
    for i, (r, c) in enumerate(zip(plotted, colours)):
        means = np.array(r.series("grad_norm_by_epoch"), dtype=float)
        maxes = np.array(r.series("grad_norm_max_by_epoch"), dtype=float)
        epochs = np.arange(1, len(means) + 1)
        ls = styles[(i // len(palette)) % len(styles)]
        ok = np.isfinite(means) & (means > 0)
        ax.plot(
            epochs[ok],
            means[ok],
            ls,
            color=c,
            marker="o",
            ms=4,
            lw=1.6,
            label=f"{names.get(r.rel, r.rel)}  [{r.verdict}]",
        )
        if len(maxes) == len(means):
            okm = np.isfinite(maxes) & (maxes > 0)
            ax.plot(epochs[okm], maxes[okm], ":", color=c, lw=1, alpha=0.7)
        marked = _mark_first_nonfinite(ax, epochs, means) or marked
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient norm (total, mean over the epoch)")
    n_ep = max((len(r.series("grad_norm_by_epoch")) for r in plotted), default=1)
    ax.set_xticks(range(1, n_ep + 1) if n_ep <= 20 else ax.get_xticks())
    ax.set_xlim(0.7, n_ep + 0.3 + (0.4 if marked else 0))
    ax.grid(True, which="both", alpha=0.25)
    title = "Gradient norm per epoch (dotted: max within the epoch"
    ax.set_title(title + ("; red X: went NaN/inf" if marked else "") + ")", fontsize=10)
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        _plain_log_ticks(ax)
    else:
        ax.text(0.5, 0.5, "no run has a finished epoch yet", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    return path


def _mark_first_nonfinite(ax: Any, epochs: np.ndarray, means: np.ndarray) -> bool:
    """A red X labelled NaN or inf at a run's first non-finite epoch, at its last finite positive
    value (else its largest finite one, else 1); whether there was one to mark."""
    last = None
    for e, g in zip(epochs, means):
        if math.isfinite(g):
            last = g if g > 0 else last
            continue
        y = (
            last
            if last is not None
            else np.nanmax(np.where(np.isfinite(means), means, np.nan))
            if np.isfinite(means).any()
            else 1.0
        )
        ax.plot([e], [y], "x", color="red", ms=12, mew=2.5, zorder=5)
        ax.annotate(
            "NaN" if math.isnan(g) else "inf",
            (e, y),
            textcoords="offset points",
            xytext=(6, 6),
            color="red",
            fontsize=9,
            fontweight="bold",
        )
        return True  # training stops at the first non-finite epoch; later ones repeat it
    return False


def _attn_logit_series(run: Run) -> list[float]:
    return [_float((e.get("health_summary") or {}).get("attn_logit_max")) for e in run.epochs]


def plot_curves(runs: Sequence[Run], names: dict[str, str], path: Path) -> Path:
    """Three panels per epoch, one colour per run: training loss (solid) and validation loss
    (dashed); total gradient norm (mean over the epoch); max attention logit on the validation
    batch (Wortsman et al. 2023, arXiv 2309.14322: its growth precedes attention-entropy
    collapse). Log y; non-finite values are left out (the grad-norm plot marks them)."""
    plotted = [r for r in runs if r.epochs or r.series("grad_norm_by_epoch")]
    fig = Figure(figsize=(15, 4.6 + 0.22 * max(0, len(plotted) - 12)))
    axes = fig.subplots(1, 3)
    palette = [f"C{i}" for i in range(10) if i != 3]  # as in plot_grad_norms: one colour per run in both
    for i, r in enumerate(plotted):
        c, label = palette[i % len(palette)], f"{names.get(r.rel, r.rel)}  [{r.verdict}]"
        for ax, ys, ls, lab in (
            (axes[0], r.series("loss_by_epoch"), "-", label),
            (axes[0], r.series("val_loss_by_epoch"), "--", None),
            (axes[1], r.series("grad_norm_by_epoch"), "-", None),
            (axes[2], _attn_logit_series(r), "-", None),
        ):
            y = np.array(ys, dtype=float)
            x = np.arange(1, len(y) + 1)
            ok = np.isfinite(y) & (y > 0)
            if ok.any():
                ax.plot(x[ok], y[ok], ls, color=c, marker="o", ms=3, lw=1.4, label=lab)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(
        axes,
        (
            "loss (solid: train, dashed: validation)",
            "gradient norm (total, epoch mean)",
            "max attention logit (validation batch)",
        ),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(True, which="both", alpha=0.25)
        if ax.lines:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    if plotted:
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(plotted)), fontsize=8, frameon=False)
    _save(fig, path)
    return path


def _plain_log_ticks(ax: Any) -> None:
    """Log-axis labels as plain numbers (`4`, `0.01`, `1e+04`), minor ones too when under ~1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and math.log10(hi / lo) < 1.5 else NullFormatter())


def plot_heatmap(run: Run, name: str, path: Path) -> Path:
    """Per-module-group gradient norm (epoch mean) by epoch, log colour scale; NaN/inf cells are
    hatched red and labelled, the cell of the first NaN is boxed."""
    assert run.grad_table is not None
    groups, epochs, values = runformat.grad_means(run.grad_table)
    n_g, n_e = values.shape
    fig = Figure(figsize=(3.2 + 0.75 * max(n_e, 2), 1.6 + 0.26 * n_g))
    ax = fig.add_subplot()
    good = np.isfinite(values) & (values > 0)
    lo, hi = (values[good].min(), values[good].max()) if good.any() else (1e-3, 1.0)
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    masked = np.ma.masked_where(~good, values)
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    _label_cells(ax, values, norm)
    nan = run.first_nan
    if nan and nan.get("module") in groups and nan.get("epoch") in epochs:
        ax.add_patch(
            _rect(epochs.index(nan["epoch"]), groups.index(nan["module"]), fill=False, edgecolor="red", lw=2.5)
        )
    if "total" in groups:
        ax.axhline(groups.index("total") + 0.5, color="white", lw=2)
    ax.set_xticks(range(n_e), [f"e{e}" for e in epochs])
    ax.set_yticks(range(n_g), groups, fontsize=7)
    ax.set_xlabel("epoch")
    head = name
    sub = f"verdict {run.verdict}"
    if nan:
        sub += f", first NaN {first_nan_text(nan)} (boxed)"
    if run.scream_epoch is not None:
        sub += f", scream from e{run.scream_epoch}"
    ax.set_title(f"{head}\n{sub}", fontsize=9)
    fig.colorbar(im, ax=ax, label="gradient norm (epoch mean, log)", fraction=0.05, pad=0.02)
    _save(fig, path)
    return path


def _label_cells(ax: Any, values: np.ndarray, norm: Any) -> None:
    """Each heatmap cell's value (black or white on its colour); a non-finite cell hatched red and
    labelled NaN or inf in red, a zero labelled 0. `values`: (groups, epochs)."""
    n_g, n_e = values.shape
    for gi in range(n_g):
        for ei in range(n_e):
            v = values[gi, ei]
            if math.isfinite(v) and v > 0:
                shade = norm(v)
                ax.text(
                    ei,
                    gi,
                    format_number(v, 2),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="black" if shade > 0.55 else "white",
                )
                continue
            if not math.isfinite(v):
                ax.add_patch(_rect(ei, gi, fill=False, hatch="//", edgecolor="#f4a0a0", lw=0))
            ax.text(
                ei,
                gi,
                format_number(v) if not math.isfinite(v) else "0",
                ha="center",
                va="center",
                fontsize=7,
                fontweight="bold",
                color="red" if not math.isfinite(v) else "black",
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"),
            )


def _rect(x: int, y: int, **kw: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, **kw)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:100] or "run"
