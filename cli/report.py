"""`stab report RUNS_DIR [--out DIR]`: one table for every run under a folder, plus files.

    stab report runs/                      # prints the tables; writes runs/report.md, runs.csv, plots/
    stab report runs/grid --out /tmp/rep   # the files elsewhere

Runs still going, interrupted, failed or with damaged files are listed with their state and a
warning, never skipped. Exit status 2 when RUNS_DIR is missing or holds no run folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.common import console, user_errors, verdict_text, warn
from cli.config import UserError

if TYPE_CHECKING:
    import pandas as pd

SHARE_STYLE = {"stable": "green", "exploding": "yellow", "nan": "red", "scream": "magenta", "failed": "red"}


def report(
    runs_dir: Annotated[Path, typer.Argument(metavar="RUNS_DIR", help="Folder holding run folders or sweeps (any depth).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where report.md, runs.csv and plots/ go (default: RUNS_DIR).")] = None,
) -> None:
    """Tabulate, summarise and plot every run under RUNS_DIR."""
    from stability import report as rep

    with user_errors():
        from cli.progress import reporter
        from stability.progress import reporting

        try:
            with reporting(reporter(console)):
                result = rep.write_report(runs_dir, out)
        except rep.ReportError as e:
            raise UserError(str(e)) from None
        except OSError as e:  # e.g. --out not writable
            raise UserError(f"cannot write the report: {e}") from None
    if result.sentence:
        console.print(result.sentence, style="bold", markup=False, highlight=False)
    if result.answer is not None and not result.answer.empty:
        console.print(frame_table(rep.answer_display(result.answer),
                                  title="unstable (exploding, scream or nan) per factor value; medians over those runs"))
    console.print(frame_table(result.overview, title=f"{len(result.runs)} runs under {runs_dir}",
                              markup={"verdict": verdict_text, "state": verdict_text}))
    if result.keys:
        shares = rep.factor_display(result.summary)
        console.print(frame_table(shares, title="by factor: share of runs per verdict, median last finite grad norm",
                                  markup={v: _share(v) for v in shares.columns if v in rep.VERDICTS}))
    if result.lr_table is not None:
        console.print(frame_table(rep.lr_display(result.lr_table), title="learning-rate sensitivity (Wortsman et al. 2023): "
                                                         "mean over the LR grid of loss above the best; smaller is flatter"))
    for rel, w in result.warnings:
        warn(f"{rel}: {w}")
    console.print(f"wrote {', '.join(str(p.relative_to(result.out)) for p in result.files[:3])} and "
                  f"{len(result.files) - 3} plot(s) to {result.out}", highlight=False)


def _share(verdict: str) -> Callable[[str], Text]:
    style = SHARE_STYLE.get(verdict, "white")
    return lambda s: Text(s, style="dim" if s == "0%" else style)


def frame_table(frame: pd.DataFrame, title: str | None = None, markup: dict[str, Callable[[str], Text]] | None = None,
                row_styles: Iterable[str | None] | None = None) -> Table:
    """A Rich table from a frame of display strings; `markup` maps a column to a cell formatter
    (a `Text`: styled, never parsed; the console parses no markup, so `[live]` stays in a cell)."""
    markup = markup or {}
    styles = list(row_styles) if row_styles is not None else [None] * len(frame)
    # short columns (verdict, a factor's value) stay whole and long ones wrap, as long as that
    # fits the terminal; else Rich squeezes every column (never crops one away)
    mins = [max([len(str(v)) for v in frame[col]] + [len(w) for w in str(col).split()], default=1)
            for col in frame.columns]
    for keep in (True, False):
        t = Table(title=title)
        for col, w in zip(frame.columns, mins):
            t.add_column(str(col), overflow="fold", min_width=w if keep and w <= 9 else None)
        for row, style in zip(frame.itertuples(index=False), styles):
            t.add_row(*(markup[c](str(v)) if c in markup else str(v) for c, v in zip(frame.columns, row)),
                      style=style)
        if keep and _fits(t):
            break
    return t


def _fits(t: Table) -> bool:
    probe = Console(width=console.width, file=io.StringIO(), color_system=None)
    probe.print(t, crop=False)
    return max(map(len, probe.file.getvalue().splitlines()), default=0) <= console.width
