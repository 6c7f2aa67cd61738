"""No user-supplied text is read as Rich markup, on any message path (issue 15, kind 3).

A file named `Song [live].wav` used to print as `Song .wav`: Rich took `[live]` for a tag. The
consoles now parse no markup and stab styles its own words through `Text`, so the tests push
bracketed names through errors, warnings, tables, progress and the run/show/report lines.
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

from rich.console import Console

from cli import common
from cli.progress import RichProgress
from tests.conftest import SMOKE, only_run
from tests.test_audio import FOLDER, write_pair

NAME = "Song [live] [bold]x"  # a real tag too: it must print, not style


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_bracketed_file_name_prints_whole_in_the_error_and_in_the_skip_warning(cli, tmp_path):
    for n in ("a", "b"):
        write_pair(tmp_path, n, 16_000, 1, seconds=1.0)
    write_pair(tmp_path, NAME, 16_000, 1, seconds=1.0)
    (tmp_path / "target" / f"{NAME}.wav").unlink()
    bad = cli("data", "inspect", *FOLDER, f"data.path={tmp_path}", ok=False)
    assert bad.exit_code == 2
    assert f"input/{NAME}.wav has no partner target/{NAME}.* to pair with" in flat(bad.output)
    ok = cli("data", "inspect", *FOLDER, f"data.path={tmp_path}", "data.on_bad_file=skip")
    out = flat(ok.output)
    assert f"warning: skipping input/{NAME}.wav: has no partner target/{NAME}.*" in out  # the library's warning
    assert f"skipped 1 bad file(s): input/{NAME}.wav has no partner" in out  # inspect's own line


def test_bracketed_folders_print_whole_in_run_show_report_and_tables(cli, tmp_path):
    runs = tmp_path / "[red]runs [live]"
    out = flat(cli("run", "--runs", runs, *SMOKE, "train.epochs=1").output)
    run = only_run(runs)
    assert str(runs) in out and "[red]runs [live]" in out
    shown = flat(cli("show", run).output)
    assert str(run) in shown
    (runs / "run" / "[dim]broken").mkdir()
    (runs / "run" / "[dim]broken" / "status.json").write_text("{not json")
    report = flat(cli("report", runs).output)
    assert f"runs under {runs}" in report  # a table title
    assert "[dim]broken" in report  # a table cell and a warning
    assert re.search(r"warning: .*\[dim\]broken", report)


def test_progress_and_tables_keep_brackets():
    buf = io.StringIO()
    con = Console(file=buf, width=200, markup=False, color_system=None)
    p = RichProgress(con)
    p.start(1, 2)
    p.progress.update(p.batches, description=NAME, info=NAME)
    con.print(p.progress.make_tasks_table(p.progress.tasks))  # what the live display draws
    p.close("completed")
    import pandas as pd

    from cli.report import frame_table

    con.print(frame_table(pd.DataFrame({"run": [NAME], "verdict": ["stable"]}), title=NAME))
    text = buf.getvalue()
    assert text.count(NAME) >= 3, text


def test_the_consoles_parse_no_markup_and_cli_code_writes_none():
    for con in (common.console, common.err_console):
        buf = io.StringIO()
        probe = Console(file=buf, markup=con._markup, width=100, color_system=None)
        probe.print(f"target/{NAME}.wav")
        assert buf.getvalue().strip() == f"target/{NAME}.wav"
    tag = re.compile(r"\[/?(bold|dim|italic|underline|red|green|yellow|blue|magenta|cyan|white)\b[^\]]*\]|\[/\]")
    for path in sorted(Path(common.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and tag.search(node.value):
                doc = node.value.strip().startswith(('"""', "The consoles")) or "\n" in node.value
                assert doc, (
                    f"{path.name}:{node.lineno}: Rich markup in a string ({node.value!r}); use cli.common.styled"
                )
