"""report.html: the whole report as one self-contained file that opens in any browser, offline,
with no server: the answer sentence, sortable tables, the plots embedded as PNG data URIs, and a
section per run (its per-step curves, evidence and events) that the runs table links to.

Why matplotlib PNGs and not an interactive library: the plots are the same figures as report.md's
(one renderer, one set of tests), a PNG shows every point of a 100-run figure at a fixed size
whatever the browser, and nothing has to be inlined (Plotly's script alone is ~3.5 MB per file).
The only script is ~30 lines: click a column header to sort by it (numbers as numbers).

    html = render_html(report, step_plots, grouped, departure)   # str
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from stability.report.loading import Run

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1500px;padding:0 20px 60px;color:#222}
h1{font-size:22px;margin:18px 0 6px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd} h3{font-size:15px;margin:20px 0 6px}
.answer{font-size:16px;font-weight:600;background:#f4f7fb;border-left:4px solid #36c;padding:10px 14px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:12.5px} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2;cursor:pointer;user-select:none;white-space:nowrap} th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
td.stable{color:#1a7f37} td.nan,td.failed{color:#c00;font-weight:600} td.exploding{color:#b35900;font-weight:600} td.scream{color:#8e24aa;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee} nav a{margin-right:12px} .muted{color:#777} .warn{color:#a60}
section.run{border-top:1px solid #ddd;margin-top:18px}
"""

# An error hook first in <head>: any uncaught error is counted in the page itself (data-errors).
_HOOK = (
    "window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message));"
    "document.documentElement.setAttribute('data-errors',String(window.__errors.length));});"
)

_SORT = """
(function(){
  function key(td){var t=td.getAttribute('data-v')||td.textContent.trim();var x=parseFloat(t);
    return {n:(/^[-+]?(\\d|\\.\\d)/.test(t)&&isFinite(x))?x:null,t:t};}
  function sortBy(th){
    var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
    var asc=!th.classList.contains('asc');
    Array.prototype.forEach.call(th.parentNode.children,function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);var c;
      if(x.n!==null&&y.n!==null)c=x.n-y.n;else if(x.n!==null)c=-1;else if(y.n!==null)c=1;
      else c=x.t.localeCompare(y.t,undefined,{numeric:true});return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.title='click to sort';th.addEventListener('click',function(){sortBy(th);});});
  document.documentElement.setAttribute('data-ready','1');
})();
"""


def _verdict_classes() -> tuple[str, ...]:
    from stability.record import verdicts as vd

    return tuple(vd.ORDER)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def image(path: Path | None, alt: str) -> str:
    """An <img> holding the PNG itself (a data URI): the file needs nothing beside it."""
    if path is None or not Path(path).exists():
        return f'<p class="muted">({_e(alt)}: not drawn)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def table(
    frame: pd.DataFrame, table_id: str = "", links: dict[int, str] | None = None, link_column: str | None = None
) -> str:
    """A sortable <table> of a display frame (strings). `links` maps a row position to an
    anchor; the `link_column` cell of that row becomes a link to it. Verdict cells get a class."""
    links = links or {}
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for col, v in zip(frame.columns, row):
            text = _e(v)
            if col == link_column and i in links:
                text = f'<a href="#{_e(links[i])}">{text}</a>'
            cls = f' class="{_e(v)}"' if col in ("verdict", "state") and str(v) in _verdict_classes() else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f'<table class="sortable"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def run_anchor(i: int) -> str:
    """The HTML id of run `i` (0-based) in report.html: "run-1", ..."""
    return f"run-{i + 1}"


def render_html(
    title: str,
    sentence: str,
    sections: Sequence[tuple[str, str]],
    runs: Sequence[Run],
    names: dict[str, str],
    run_sections: dict[str, str],
) -> str:
    """The page: the answer sentence, then `sections` ((heading, HTML body), in order), then one
    section per run (`run_sections[run.rel]`, its own anchor `run-<n>`)."""
    nav = "".join(f'<a href="#s{i}">{_e(h)}</a>' for i, (h, _) in enumerate(sections))
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="answer" id="answer">{_e(sentence)}</p>',
        (f'<nav>{nav}<a href="#runs">each run</a></nav>'),
    ]
    for i, (heading, content) in enumerate(sections):
        body.append(f'<h2 id="s{i}">{_e(heading)}</h2>{content}')
    body.append('<h2 id="runs">Each run</h2>')
    for i, r in enumerate(runs):
        body.append(
            f'<section class="run" id="{run_anchor(i)}"><h3>{_e(names.get(r.rel, r.rel))}: '
            f'<span class="{_e(r.verdict)}">{_e(r.verdict)}</span></h3>{run_sections.get(r.rel, "")}'
            f'<p><a href="#answer">back to the top</a></p></section>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
        f"<script>{_HOOK}</script><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + f"\n<script>{_SORT}</script></body></html>\n"
    )


def rel_link(path: Path, out: Path) -> str:
    """`path` relative to the report folder `out`, for a link."""
    return os.path.relpath(path, out)


def html_report(report: Any, names: dict[str, str]) -> str:
    """report.html for a `Report` (see `write_report`): every table and plot of report.md, and a
    section per run that the runs table links to."""
    runs = report.runs
    sections = _table_sections(report, names)
    sections += _plot_sections(report)
    warned = report.warnings
    if warned:
        index = {r.rel: i for i, r in enumerate(runs)}
        sections.append(
            (
                f"Warnings ({len(warned)})",
                "<ul>"
                + "".join(
                    f'<li class="warn"><a href="#{run_anchor(index[rel])}">{_e(names.get(rel, rel))}</a>: {_e(w)}</li>'
                    for rel, w in warned
                )
                + "</ul>",
            )
        )
    run_sections = {r.rel: _run_section(report, r, names) for r in runs}
    return render_html(
        f"Stability report: {report.root}", report.sentence or f"{len(runs)} runs.", sections, runs, names, run_sections
    )


def _table_sections(report: Any, names: dict[str, str]) -> list[tuple[str, str]]:
    """(title, HTML) of the answer, the runs (each row linking to its section), by factor and the
    learning-rate sensitivity, where the report has them."""
    from stability.report.answer import answer_display
    from stability.report.markdown import ANSWER_TITLE
    from stability.report.tables import factor_display, lr_display

    runs = report.runs
    sections: list[tuple[str, str]] = []
    if report.answer is not None and not report.answer.empty:
        sections.append(
            (
                "Unstable share per factor value",
                f"<p>{_e(ANSWER_TITLE[0].upper() + ANSWER_TITLE[1:])}.</p>"
                + table(answer_display(report.answer), "answer-table"),
            )
        )
    over = report.overview.copy()
    if "run" not in over.columns:  # the overview names a run by its folder only where factors do not tell them apart
        over.insert(0, "run", [names.get(r.rel, r.rel) for r in runs])
    sections.append(
        (
            f"Runs ({len(runs)})",
            "<p>Click a run for its per-step curves and events; click a column "
            "header to sort.</p>" + table(over, "runs-table", {i: run_anchor(i) for i in range(len(runs))}, "run"),
        )
    )
    if report.keys:
        sections.append(("By factor", table(factor_display(report.summary), "factor-table")))
    if report.lr_table is not None:
        sections.append(("Learning-rate sensitivity", table(lr_display(report.lr_table), "lr-table")))
    return sections


def _plot_sections(report: Any) -> list[tuple[str, str]]:
    """(title, HTML) of the grouped per-step plot, the departure plot and table, and the per-epoch plots."""
    sections: list[tuple[str, str]] = []
    if report.grouped is not None:
        note = f"<p>{_e(report.grouped.note)}.</p>" if report.grouped.note else ""
        sections.append(("Per step, grouped by what was varied", note + image(report.grouped.path, "grouped")))
    if report.departure is not None:
        sections.append(
            (
                "Which module group left its band first",
                image(report.departure.path, "departure")
                + (table(report.departures, "departure-table") if report.departures is not None else ""),
            )
        )
    out = report.out
    sections.append(
        (
            "Per epoch",
            image(out / "plots" / "curves.png", "curves")
            + image(out / "plots" / "grad_norm.png", "grad norm per epoch"),
        )
    )
    return sections


def _run_section(report: Any, r: Run, names: dict[str, str]) -> str:
    """One run's section: folder, state, final loss, evidence, warnings, its plots and events."""
    from stability.formatting import format_number
    from stability.report.runtables import events_frame

    parts = [
        (
            f'<p class="muted">{_e(r.rel)} &middot; state {_e(r.state)} &middot; final loss '
            f"{_e(format_number(r.final_loss))}</p>"
        )
    ]
    if r.summary.get("evidence"):
        parts.append(f"<p>{_e(r.summary['evidence'])}</p>")
    parts += [f'<p class="warn">{_e(w)}</p>' for w in r.warnings]
    if r.rel in report.step_plots:
        parts.append(image(report.step_plots[r.rel], f"{names.get(r.rel, r.rel)} per step"))
    if r.rel in report.heatmaps:
        parts.append(image(report.heatmaps[r.rel], f"{names.get(r.rel, r.rel)} heatmap"))
    events = events_frame(r)
    if not events.empty:
        parts.append(table(events.astype(object).map(lambda x: "-" if x is None else format_number(x))))
    return "".join(parts)
