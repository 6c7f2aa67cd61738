"""scripts/readme_figures.py: a README block made by a command goes stale when the code behind it
changes, the check says so without re-running anything, and a block marked not re-made says so
visibly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
rf = importlib.util.module_from_spec(spec)
sys.modules["readme_figures"] = rf  # dataclasses look their module up there
spec.loader.exec_module(rf)


def _setup(tmp_path: Path):
    (tmp_path / "code.py").write_text("THRESHOLD = 0.6\n")
    fig = rf.Figure("demo", (("run", "preset=smoke"),), ("code.py",), lambda runs, s: "x\n")
    figures = {"demo": fig}
    digest = rf.inputs_hash(fig, tmp_path)
    text = f"# R\n\n<!-- figure demo: made inputs={digest} -->\nverdict: stable\n<!-- /figure demo -->\n"
    return fig, figures, text


def test_a_made_block_is_fresh_until_its_code_changes_and_then_the_check_fails(tmp_path):
    fig, figures, text = _setup(tmp_path)
    assert rf.check(text, tmp_path, figures) == []
    (tmp_path / "code.py").write_text("THRESHOLD = 0.5\n")  # the code behind the figure changed
    problems = rf.check(text, tmp_path, figures)
    assert len(problems) == 1 and problems[0].startswith("demo: its commands or code changed")
    # marking it not re-made keeps the old text under a visible note, and the check passes
    marked = rf.mark_stale(text, tmp_path, figures)
    assert rf.check(marked, tmp_path, figures) == []
    assert "not-remade" in marked and rf.STALE_NOTE in marked and "verdict: stable" in marked
    # a not-remade block without the note, or a block of a figure the script does not know, fails
    bare = text.replace(": made ", ": not-remade ")
    assert "without the visible note" in rf.check(bare, tmp_path, figures)[0]
    assert "no such figure" in rf.check(text.replace("demo", "other"), tmp_path, figures)[0]


def test_replace_block_rewrites_only_its_block(tmp_path):
    fig, figures, text = _setup(tmp_path)
    new = rf.replace_block(text + "\ntail\n", "demo", "made", "0" * 12, "verdict: diverged\n")
    assert "verdict: diverged" in new and "verdict: stable" not in new and new.endswith("tail\n")
    assert rf.blocks(new)[0]["hash"] == "0" * 12


def test_the_readme_blocks_name_known_figures():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [m["name"] for m in rf.blocks(text)]
    assert names and set(names) <= set(rf.FIGURE_BY_NAME)


def test_a_docstring_comment_type_or_format_edit_keeps_the_hash_and_a_code_edit_changes_it(tmp_path):
    code = '"""Module doc."""\n\n\ndef level(x):\n    """How far past."""\n    return x / 0.6  # the threshold\n'
    (tmp_path / "code.py").write_text(code)
    fig = rf.Figure("demo", (("run", "preset=smoke"),), ("code.py",), lambda runs, s: "x\n")
    before = rf.inputs_hash(fig, tmp_path)
    documented = (
        '"""Module doc, longer now,\nover two lines."""\n\n\ndef level(x: float) -> float:\n'
        '    """How far past the threshold; arXiv 1908.04319."""\n    # divided by the threshold\n'
        "    return (x / 0.6)\n"
    )
    (tmp_path / "code.py").write_text(documented)
    assert rf.inputs_hash(fig, tmp_path) == before  # docstrings, comments, parentheses, types: no change
    (tmp_path / "code.py").write_text(documented.replace("return (x / 0.6)", "t: float = 0.6\n    return x / t"))
    assert rf.inputs_hash(fig, tmp_path) != before  # a new statement is code
    cls = "class C:\n    a: int = 1\n"
    (tmp_path / "code.py").write_text(code + cls)
    with_field = rf.inputs_hash(fig, tmp_path)
    (tmp_path / "code.py").write_text(code + cls.replace("int", "float"))
    assert rf.inputs_hash(fig, tmp_path) != with_field  # a class attribute's annotation is a dataclass field's type
    (tmp_path / "code.py").write_text(code.replace("0.6", "0.58"))
    assert rf.inputs_hash(fig, tmp_path) != before  # a changed threshold stales the figure
    (tmp_path / "code.py").write_text(code.replace('    """How far past."""\n', ""))
    assert rf.inputs_hash(fig, tmp_path) == before  # a function losing its docstring is the same code


def test_a_yaml_comment_keeps_the_hash_and_a_changed_value_changes_it(tmp_path):
    (tmp_path / "c.yaml").write_text("detect:\n  band: 0.1  # relative band\n")
    fig = rf.Figure("demo", (("run",),), ("c.yaml",), lambda runs, s: "x\n")
    before = rf.inputs_hash(fig, tmp_path)
    (tmp_path / "c.yaml").write_text("# the detectors\ndetect:\n  band: 0.1    # a longer comment now\n")
    assert rf.inputs_hash(fig, tmp_path) == before
    (tmp_path / "c.yaml").write_text("detect:\n  band: 0.2\n")
    assert rf.inputs_hash(fig, tmp_path) != before


def test_an_edit_to_the_readme_made_while_a_figure_runs_is_kept(tmp_path, monkeypatch):
    """--make writes its block into the README as it is when the figure ends: prose edited while
    the commands ran (the story takes half an hour) is not overwritten by the text read at start."""
    fig, figures, text = _setup(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(text + "\nold prose\n")

    def make(figure):  # the figure's commands run; meanwhile someone edits the prose
        readme.write_text(readme.read_text().replace("old prose", "new prose"))
        return "verdict: diverged\n"

    monkeypatch.setattr(rf, "README", readme)
    monkeypatch.setattr(rf, "ROOT", tmp_path)
    monkeypatch.setattr(rf, "FIGURE_BY_NAME", figures)
    monkeypatch.setattr(rf, "make", make)
    assert rf.main(["--make", "demo"]) == 0
    after = readme.read_text()
    assert "new prose" in after and "old prose" not in after
    assert "verdict: diverged" in after and "verdict: stable" not in after
