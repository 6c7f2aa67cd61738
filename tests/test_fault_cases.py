"""Issue 29, the cases left open in round 4: a folder argument that does not exist or is a file is
named as such, in one line, by every command that reads one. Each test fails on 68a92a6."""

from __future__ import annotations

import pytest

from tests.conftest import Cli

RUN = "a run folder, e.g. runs/run/<folder> or runs/<sweep>/<job>"
RUNS_DIR = "a folder holding run folders or sweeps"
EXPORTED = "a run folder or a folder of them"

# --- a folder argument that is missing or a file ------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (["replay"], RUN),
        (["show"], RUN),
        (["doctor"], RUN),
        (["doctor", "--try"], RUN),
        (["report"], RUNS_DIR),
        (["export", "--to", "tensorboard"], EXPORTED),
    ],
    ids=["replay", "show", "doctor", "doctor-try", "report", "export"],
)
@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_folder_argument_that_is_missing_or_a_file_is_named_as_such(tmp_path, command, expected, make):
    target = tmp_path / "runs" / "x"
    if make == "file":
        target.parent.mkdir()
        target.write_text("not a folder")
    result = Cli()(*command, target, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    what = "no such folder" if make == "missing" else "is a file, not a folder"
    assert line == f"error: {target}: {what}; pass {expected}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["runs", "x"] if make == "file" else [])
