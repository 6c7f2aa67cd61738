"""Commands that help instead of refusing (issue 15, kind 5): an inspect inspects a folder too
short for the default split and says by how much; typos get `did you mean`; a space-separated
list gets the comma syntax, for `stab run`, `stab sweep` and `stab data inspect` alike."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE
from tests.test_audio import write_pair


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_inspect_of_a_folder_too_short_for_the_default_split_inspects_and_says_by_how_much(cli, tmp_path):
    for n in ("a", "b", "c"):
        write_pair(tmp_path, n, 16_000, 1, seconds=2.5)  # 1 segment of 2 s each: 3 < n_val 8 + 1
    out = " ".join(cli("data", "inspect", "data=folder", f"data.path={tmp_path}").output.split())
    assert "warning:" in out and "fewer than data.n_val=8" in out
    assert "6 segment(s) short, at least 12 s more audio" in out
    assert "Inspecting with data.n_val=2" in out
    assert "segments: 1 train + 2 validation of 2 s" in out and "RVQ code usage" in out
    run = cli("run", "data=folder", f"data.path={tmp_path}", ok=False)  # a run still refuses, saying the same
    assert "6 segment(s) short, at least 12 s more audio" in one_line(run)


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(
    "args, expected",
    [
        (["residul=0.1,0.3"], "unknown key 'residul'"),
        (["residul=0.1"], "did you mean residual?"),
        (["train.lrr=1e-3"], "did you mean train.lr?"),
        (["trian.lr=1e-3"], "did you mean train.lr?"),
        (["model=charlm", "model.nlayers=3"], "did you mean model.n_layers?"),
        (["model=charlmm"], "did you mean charlm?"),
        (["preset=smok"], "did you mean smoke?"),
        (["experiment=seed_fixx"], "did you mean seed_fix?"),
        (["norm=prre"], "did you mean pre?"),
    ],
)
def test_typos_get_did_you_mean(cli, command, args, expected):
    line = one_line(cli(command, *args, ok=False))
    assert expected in line
    if args == ["residul=0.1,0.3"]:
        assert "did you mean residual?" in line and "stab sweep residul" not in line


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("args", [["residual=0.1", "0.3"], ["residual=0.1,", "0.3"], [*SMOKE, "residual=0.1", "0.3"]])
def test_a_space_separated_list_gets_the_comma_syntax(cli, command, args):
    line = one_line(cli(command, *args, ok=False))
    assert "residual=0.1,0.3" in line and "EQUAL" not in line


def test_a_bare_key_and_a_misspelt_launcher_get_suggestions(cli):
    assert "did you mean residual=...?" in one_line(cli("run", *SMOKE, "resid", ok=False))
    assert "did you mean joblib?" in one_line(cli("sweep", "--launcher", "joblb", "residual=0.1", ok=False))


@pytest.mark.parametrize("arg", ["clip=-5", "clip=0", "clip=abc", "update_clip=-1", "update_clip=inf"])
def test_a_bad_threshold_says_none_is_allowed_too(cli, arg):
    """`clip` and `update_clip` take `none` or a positive number; every refusal names both."""
    key, value = arg.split("=")
    bad = cli("run", "preset=smoke", arg, ok=False)
    assert bad.exit_code == 2
    line = bad.output.strip()
    assert "\n" not in line and line.startswith(f"error: {key}=")
    assert "expected none or a positive number" in line, line
