"""`stab report RUNS_DIR [--out DIR]`: one table for every run under a folder, plus files.

    stab report runs/                      # prints the tables; writes runs/report.md, report.html, runs.csv, plots/
    stab report runs/grid --out /tmp/rep   # the files elsewhere

Runs still going, interrupted, failed or with damaged files are listed with their state and a
warning, never skipped. Exit status 2 when RUNS_DIR is missing or holds no valid run, or when a file the
report would overwrite was not written by `stab report`; 1 when a file cannot be written (full disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cli.common import console, user_errors, verdict_text, warn, write_errors
from cli.config import UserError
from stability.errors import StorageError
from stability.record import verdicts as vd

if TYPE_CHECKING:
    import pandas as pd

    from stability.report import Report


def report(
    runs_dir: Annotated[
        Path, typer.Argument(metavar="RUNS_DIR", help="Folder holding run folders or sweeps (any depth).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where report.md, runs.csv and plots/ go (default: RUNS_DIR).")
    ] = None,
) -> None:
    """Tabulate, summarise and plot every run under RUNS_DIR."""
    with user_errors():
        result = _write(runs_dir, out)
    _print_tables(result, runs_dir)
    for rel, w in result.warnings:
        warn(f"{rel}: {w}")
    named = [p for p in result.files if p.suffix != ".png"]
    console.print(
        f"wrote {', '.join(str(p.relative_to(result.out)) for p in named)} and "
        f"{len(result.files) - len(named)} plot(s) to {result.out}",
        highlight=False,
    )


def _write(runs_dir: Path, out: Path | None) -> Report:
    """`stability.report.write_report`, with progress on the console; UserError for a bad --out or
    a folder without runs, StorageError naming the file that could not be written."""
    from cli.progress import reporter
    from stability import report as rep
    from stability.progress import reporting

    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        with reporting(reporter(console)), write_errors():
            try:
                return rep.write_report(runs_dir, out)
            except StorageError:
                raise
            except OSError as e:  # a full disk, a read-only folder: exit 1 naming the file
                raise StorageError(e.filename or str(out or runs_dir), e) from e
    except rep.ReportError as e:
        raise UserError(str(e)) from None


def _print_tables(result: Report, runs_dir: Path) -> None:
    """The one-sentence answer, the answer table, the runs, the share of verdicts by factor and the
    learning-rate sensitivity, each fitted to the terminal (`frame_table`)."""
    from stability import report as rep

    if result.sentence:
        console.print(result.sentence, style="bold", markup=False, highlight=False)
    if result.answer is not None and not result.answer.empty:
        console.print(
            frame_table(
                rep.answer_display(result.answer),
                title=rep.ANSWER_TITLE,
            )
        )
    console.print(
        frame_table(
            result.overview,
            title=f"{len(result.runs)} runs under {runs_dir}",
            markup={"verdict": verdict_text, "state": verdict_text},
            drop=[*OVERVIEW_DROP[:-2], *reversed(result.keys), *OVERVIEW_DROP[-2:]],
        )
    )
    if result.keys:
        shares = rep.factor_display(result.summary)
        console.print(
            frame_table(
                shares,
                title="by factor: share of runs per verdict, median last finite grad norm",
                markup={v: _share(v) for v in shares.columns if v in vd.ORDER},
            )
        )
    if result.lr_table is not None:
        console.print(
            frame_table(
                rep.lr_display(result.lr_table),
                title="learning-rate sensitivity (Wortsman et al. 2023): "
                "mean over the LR grid of loss above the best; smaller is flatter",
            )
        )


def _share(verdict: str) -> Callable[[str], Text]:
    style = vd.style(verdict)
    return lambda s: Text(s, style="dim" if s == "0%" else style)


# Shorter headers for a narrow terminal (a header still wraps at its spaces, never inside a word).
SHORT_HEADERS = {
    "grad norm per epoch": "grad/epoch",
    "max, last epoch": "max last",
    "max attn logit": "attn logit",
    "median final val loss": "med val loss",
    "median max grad norm": "med max grad",
    "median last grad norm": "med last grad",
    "spike lead": "lead",
}
# The overview's columns least needed first: what goes when the terminal is too narrow for all.
OVERVIEW_DROP = (
    "wall",
    "max attn logit",
    "scream",
    "spike lead",
    "max, last epoch",
    "grad norm per epoch",
    "state",
    "first NaN",
    "final loss",
    "sweep",
    "run",
)
_LONG = 20  # a cell's word longer than this may break after / , = or : when the terminal is narrow


def soft_split(word: str, limit: int = _LONG) -> list[str]:
    """A long word (a path, `a=1,b=2`) as pieces ending after `/`, `,`, `=`, `:` (or `_`), each at
    most ~`limit` long where the word allows: the places a line may break without cutting a name."""
    if len(word) <= limit:
        return [word]
    import re

    parts = [p for p in re.split(r"(?<=[/,=:_])", word) if p]
    out = [""]
    for part in parts:
        if out[-1] and len(out[-1]) + len(part) > limit:
            out.append(part)
        else:
            out[-1] += part
    return out


def frame_table(
    frame: pd.DataFrame,
    title: str | None = None,
    markup: dict[str, Callable[[str], Text]] | None = None,
    row_styles: Iterable[str | None] | None = None,
    drop: Sequence[str] | None = None,
    keep: Sequence[str] = ("verdict",),
) -> Table:
    """A Rich table from a frame of display strings that fits the console's width; `markup` maps
    a column to a cell formatter (a `Text`: styled, never parsed; the console parses no markup,
    so `[live]` stays in a cell). No word is ever cut: each column is at least as wide as its
    longest word, short columns get their whole width first, long cells wrap at spaces. Where
    even that is too wide: headers are shortened (SHORT_HEADERS), long words break only after
    `/ , = : _` (`soft_split`), and columns go, `drop`'s order first (default: from the right;
    never the first column nor those in `keep`), named in the caption."""
    import pandas as pd

    markup = markup or {}
    styles: list[str | None] = list(row_styles) if row_styles is not None else [None] * len(frame)
    width = console.width
    widths = _widths({c: [str(v) for v in frame[c]] + [str(c)] for c in frame.columns}, width)
    if widths is not None:
        return _build(frame, title, markup, styles, widths)
    # narrow: short headers, long words in pieces, and columns dropped until every word fits
    cells = {
        c: [" ".join("\n".join(soft_split(w)) for w in str(v).split(" ")) for v in frame[c]] for c in frame.columns
    }
    heads = {c: SHORT_HEADERS.get(str(c), str(c)) for c in frame.columns}
    shown = list(frame.columns)
    order = [c for c in (drop if drop is not None else reversed(list(frame.columns))) if c in shown]
    order = [c for c in order if (c != frame.columns[0] or drop is not None) and c not in keep]
    dropped: list[str] = []
    while (widths := _widths({c: [*cells[c], heads[c]] for c in shown}, width)) is None and order:
        gone = order.pop(0)
        shown.remove(gone)
        dropped.append(str(gone))
    narrow = pd.DataFrame({heads[c]: cells[c] for c in shown}, columns=[heads[c] for c in shown])
    caption = f"not shown at {width} columns: {', '.join(dropped)}" if dropped else None
    return _build(
        narrow,
        title,
        {heads[c]: markup[c] for c in shown if c in markup},
        styles,
        {heads[c]: w for c, w in (widths or {}).items()},
        caption,
    )


def _widths(texts: dict[Any, list[str]], width: int) -> dict[Any, int] | None:
    """Column widths (without padding) for a table of `width` characters in which no word is cut:
    each column gets its longest word, then the spare room goes to the columns that need least
    to show their longest line whole, then to the rest; None if the longest words alone do not
    fit. Rich's box: 2 padding + 1 border per column, 1 border more."""
    frame_w = 3 * len(texts) + 1
    mins = {
        c: max((len(w) for t in ts for line in t.split("\n") for w in line.split()), default=1)
        for c, ts in texts.items()
    }
    full = {c: max((len(line) for t in ts for line in t.split("\n")), default=1) for c, ts in texts.items()}
    spare = width - frame_w - sum(mins.values())
    if spare < 0:
        return None
    out = dict(mins)
    for c in sorted(texts, key=lambda c: full[c] - mins[c]):
        give = min(full[c] - out[c], spare)
        out[c] += give
        spare -= give
    return out


def _build(
    frame: pd.DataFrame,
    title: str | None,
    markup: dict[str, Callable[[str], Text]],
    styles: list[str | None],
    widths: dict[Any, int],
    caption: str | None = None,
) -> Table:
    t = Table(title=title, caption=caption)
    for col in frame.columns:
        t.add_column(str(col), overflow="fold", width=widths.get(col))
    for row, style in zip(frame.itertuples(index=False), styles):
        t.add_row(*(markup[c](str(v)) if c in markup else str(v) for c, v in zip(frame.columns, row)), style=style)
    return t
