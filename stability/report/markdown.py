"""The report's files: report.md (Markdown), runs.csv and factors.csv (every number, NaN and inf
spelled out, an empty cell where a value does not apply).

    atomic_write_text(out / "report.md", _markdown(report, names))
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stability.formatting import format_number
from stability.record import verdicts as vd
from stability.report.answer import answer_display
from stability.report.loading import Run
from stability.report.plots import _slug
from stability.report.tables import factor_display, lr_display
from stability.storage import atomic_write_text

if TYPE_CHECKING:
    from stability.report.result import Report

PLOTS = "plots"
# the answer table's title, for the terminal and report.html: every unstable verdict, named from
# `verdicts.UNSTABLE` (a hand-written list here once left `diverged` out), and what is counted
ANSWER_TITLE = (
    f"unstable ({', '.join(vd.UNSTABLE)}) per factor value, out of the runs judged (inconclusive and "
    "borderline runs not counted); medians over the runs counted"
)


def csv_cell(x: Any) -> str:
    """A CSV cell: floats at full precision, NaN as 'NaN', inf as 'inf', not applicable as ''."""
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)) and math.isfinite(x):
        return repr(float(x))
    return format_number(x)  # NaN, inf, -inf, and non-numbers as text


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as CSV, each cell as `csv_cell` writes it (NaN and inf as text), atomically."""
    cells = frame.astype(object).map(csv_cell)
    buf = io.StringIO()
    cells.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of display strings (`|` escaped)."""
    if frame.empty:
        return "_(none)_\n"

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _markdown(report: Report, names: dict[str, str]) -> str:
    """report.md for a `Report` (see `write_report`): the answer, the tables, the plots, the
    recovery section and every warning, one section after another; `names` are the runs' labels."""
    runs = report.runs
    warned = report.warnings
    parts = _opening(report, warned)
    parts += _table_sections(report)
    parts += _plot_sections(report, names)
    parts += _recovery(runs, names)
    if warned:
        parts += ["## Warnings\n", "\n".join(f"- `{rel}`: {w}" for rel, w in warned) + "\n"]
    found = diagnostic_warnings(runs)
    if found:
        parts += [
            "## What the detectors saw\n",
            "Warnings the runs raised about themselves (`warnings` in each `summary.json`), whatever their verdict.\n",
            "\n".join(f"- `{names.get(rel, rel)}`: {w}" for rel, w in found) + "\n",
        ]
    return "\n".join(parts)


def _opening(report: Report, warned: Sequence[tuple[str, str]]) -> list[str]:
    """The title, the one-sentence answer, the answer table, what was run and where the numbers
    are, and how many warnings there are."""
    runs, keys, ans, sentence = report.runs, report.keys, report.answer, report.sentence
    seen = sorted({r.verdict for r in runs}, key=lambda v: (vd.ORDER.index(v) if v in vd.ORDER else len(vd.ORDER), v))
    counts = {v: sum(r.verdict == v for r in runs) for v in seen}
    parts = [
        f"# Stability report: `{report.root}`\n",
        f"{len(runs)} run(s), {time.strftime('%Y-%m-%d %H:%M')}: "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
        + ". "
        + (f"Factors that differ: {', '.join(f'`{k}`' for k in keys)}." if keys else "No factor differs between runs.")
        + " Every number of every run is in [runs.csv](runs.csv) (NaN and inf written as such, an empty cell"
        " where a value does not apply; in pandas: `pd.read_csv('runs.csv', keep_default_na=False,"
        " na_values=['', 'NaN'])`, so that the verdict `nan` stays a word).\n",
    ]
    if sentence:
        parts.insert(1, f"**{sentence}**\n")
    if ans is not None and not ans.empty:
        parts.insert(
            2,
            "Unstable = `nan`, `exploding`, `diverged` or `scream`, out of the runs judged: runs "
            "`inconclusive` (too short to judge) or flagged borderline (a value within `detect.band` of its "
            "threshold) are not counted. `seed` is replication, not a factor. 95% interval: Wilson score "
            "interval of the unstable share. Medians over the runs at each value (across all other "
            "factors), with the order-statistic interval of the median (its coverage in brackets where "
            "too few runs reach 95%). A factor is decisive only when Fisher's exact test on its unstable "
            "counts gives p < 0.05.\n\n" + markdown_table(answer_display(ans)),
        )
    if warned:
        parts.append(f"**{len(warned)} warning(s)**, see [Warnings](#warnings).\n")
    return parts


def _table_sections(report: Report) -> list[str]:
    """The runs table, then by factor, by configuration and learning-rate sensitivity where they apply."""
    configs, lr_table = report.configs, report.lr_table
    parts = [
        "## Runs\n",
        "First NaN: epoch (1-based), batch within the epoch (0-based), and the module "
        "group that went first. Gradient norm: total norm, mean over each epoch.\n",
        markdown_table(report.overview),
    ]
    if report.keys:
        parts += [
            "## By factor\n",
            "Share of runs per verdict for each value of each factor (across all other "
            "factors), and the median over those runs of the last finite epoch-mean gradient norm.\n",
            markdown_table(factor_display(report.summary)),
        ]
    if configs is not None and len(configs) and (configs["runs"] > 1).any():
        parts += [
            "## By configuration\n",
            "Each configuration's replicates (seeds) pooled: unstable share with its "
            "95% Wilson interval, and medians with their order-statistic intervals.\n",
            markdown_table(answer_display(configs)),
        ]
    if lr_table is not None:
        parts += [
            "## Learning-rate sensitivity\n",
            "Per configuration of the other factors: the mean over the LR "
            "grid of min(final validation loss, initial loss) minus the best final validation loss "
            "(Wortsman et al. 2023, arXiv 2309.14322; the initial loss is the validation loss at initialisation, measured before the first step; a configuration with no stable learning rate in the grid is warned about, its small number means it fails everywhere). "
            "0: every LR reached the best loss; smaller is flatter.\n",
            markdown_table(lr_display(lr_table)),
        ]
    return parts


def _plot_sections(report: Report, names: dict[str, str]) -> list[str]:
    """The plots: per epoch, per step grouped by factor, which group left its band first, each
    run per step, and a heatmap per unstable run; links relative to the report's folder."""
    out = report.out
    rel_plots = os.path.relpath(out / PLOTS, out)
    parts = [
        "## Loss, gradient norm and attention logits per epoch\n",
        f"![curves]({rel_plots}/curves.png)\n",
        "## Gradient norm per epoch\n",
        f"![gradient norm per epoch]({rel_plots}/grad_norm.png)\n",
    ]
    if report.grouped is not None:
        parts += [
            "## Per step, grouped by what was varied\n",
            "Gradient norm and loss per step; one colour per value of the most decisive factor, one panel "
            "per value of the next; runs alike in those (seeds) as a median line with a min-max band. "
            + (f"Pooled in each band: {report.grouped.note.split(': ', 1)[-1]}. " if report.grouped.note else "")
            + "All of it, with tables you can sort, in [report.html](report.html).\n",
            f"![grouped]({rel_plots}/{os.path.relpath(report.grouped.path, out / PLOTS)})\n",
        ]
    if report.departure is not None:
        parts += [
            "## Which module group left its band first\n",
            "The first step each group's gradient norm left its running band (the run's own spike detector: "
            "above the median of the last `detect.spike_window` steps by `detect.spike_z` robust deviations "
            "and `detect.spike_ratio` times it, or non-finite), unstable runs against stable ones.\n",
            f"![departure]({rel_plots}/{os.path.relpath(report.departure.path, out / PLOTS)})\n",
        ]
        if report.departures is not None:
            parts.append(markdown_table(report.departures))
    if report.step_plots:
        parts += [
            "## Each run per step\n",
            "Loss and gradient norm per step, with the clip threshold, spikes, "
            "skipped steps, the first NaN and epoch boundaries marked:\n",
            "\n".join(
                f"- [{names.get(r.rel, r.rel)}]({rel_plots}/{os.path.relpath(report.step_plots[r.rel], out / PLOTS)})"
                f" ({r.verdict})"
                for r in report.runs
                if r.rel in report.step_plots
            )
            + "\n",
        ]
    if report.heatmaps:
        parts.append("## Unstable runs: gradient norm by module group\n")
        for r in report.runs:
            if r.rel in report.heatmaps:
                parts += [
                    f"### {names[r.rel]}: {r.verdict}\n",
                    f"`{r.rel}`" + (f": {r.summary['evidence']}" if r.summary.get("evidence") else "") + "\n",
                    f"![{_slug(r.rel)}]({rel_plots}/{report.heatmaps[r.rel].name})\n",
                ]
    return parts


def _recovery(runs: Sequence[Run], names: dict[str, str]) -> list[str]:
    """The recovery section (`stability.report.recovery.report_rows`): nothing without a spiked run."""
    from stability.report.recovery import RECOVER_WINDOW, report_rows

    rows = report_rows(list(runs))
    if not rows:
        return []

    def num(x: Any, fmt: str) -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    frame = pd.DataFrame(
        [
            {
                "run": names.get(r["run"], r["run"]),
                "on_spike": r["on_spike"],
                "update_clip": "none" if r["update_clip"] is None else r["update_clip"],
                "spike at step": r["spike_step"],
                "steps skipped": r["skipped"],
                "steps lost (to pre-spike loss)": num(r["recover_steps"], "d")
                if r["recover_steps"] is not None
                else "not recovered",
                "time to recover, s": num(r["recover_s"], ".2f"),
                "final loss": num(r["final_loss"], ".4g"),
                "gap to the run without the spike": num(r["final_gap"], "+.4g"),
            }
            for r in rows
        ]
    )
    return [
        "## Recovery\n",
        f"Each run with a spike (planted by `fault.spike_at_step`, else the first step `train.on_spike`'s detector "
        f"fired): updates not applied from it on, the steps until the mean loss over {RECOVER_WINDOW} steps is back at "
        f"the mean of the {RECOVER_WINDOW} steps before it and their wall time, the mean loss of the last "
        f"{RECOVER_WINDOW} steps, and its gap to the run of this report that differs only in the spike and the "
        "recovery policy (– where there is none).\n",
        markdown_table(frame),
    ]


def diagnostic_warnings(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(run, message) for every warning in the runs' summaries (saturated clamps, attention-logit
    growth, a clip that never or always fires, validation loss not improving, undertraining)."""
    return [
        (r.rel, w.get("message", str(w)))
        for r in runs
        for w in (r.summary.get("warnings") or [])
        if isinstance(w, dict)
    ]
