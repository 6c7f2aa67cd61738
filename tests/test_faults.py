"""Faults as users and operators produce them (issue 29): a reader that closes stdout, a folder
that is not a run, a full disk under a promise, trackers that cannot work, audio folders as
people keep them, and messages with holes. Each test fails on the behaviour the issue found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOKE, only_run, read_json

ROOT = Path(__file__).resolve().parents[1]
STAB = [sys.executable, "-m", "cli.main"]
CEILING_S = 600  # a generous ceiling for a subprocess on a busy 2-core machine, not a timing


def closed_pipe_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run stab with stdout a real pipe whose reader has already gone (`stab ... | head -0`):
    every write to stdout meets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*STAB, *args], check=False, stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, **(env or {})}, timeout=CEILING_S)
    finally:
        os.close(write)
    return proc


# --- a closed stdout: stop printing, finish the work, record the truth, end as Unix tools do ------


def test_a_closed_stdout_stops_printing_but_not_the_work(tmp_path):
    run = closed_pipe_run("run", "--runs", str(tmp_path), *SMOKE, "train.epochs=1")
    assert run.returncode == -signal.SIGPIPE, run.stderr  # as `seq 1 100000 | head -1` ends
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    folder = only_run(tmp_path)
    assert read_json(folder / "status.json")["state"] == "completed"
    assert read_json(folder / "summary.json")["verdict"] in ("stable", "exploding", "scream", "nan")
    for args in (["show", str(folder)], ["--help"], ["report", str(tmp_path)]):
        cut = closed_pipe_run(*args)
        assert cut.returncode == -signal.SIGPIPE, (args, cut.stderr)
        assert cut.stderr == "", (args, cut.stderr)
    assert (tmp_path / "report.md").is_file()  # the report's work was done although nothing was printed


@pytest.mark.slow
def test_a_sweep_whose_stdout_closes_finishes_every_job_and_says_so_in_sweep_json(tmp_path):
    cut = closed_pipe_run("sweep", "--runs", str(tmp_path), "--name", "grid", *SMOKE, "train.epochs=1",
                          "residual=0.1,0.3")
    assert cut.returncode == -signal.SIGPIPE, cut.stderr
    assert "Traceback" not in cut.stderr, cut.stderr
    index = read_json(tmp_path / "grid" / "sweep.json")
    assert index["state"] == "completed"
    assert [j["state"] for j in index["jobs"]] == ["completed", "completed"]
    for j in index["jobs"]:
        assert read_json(tmp_path / "grid" / j["folder"] / "status.json")["state"] == "completed"
    assert (tmp_path / "grid" / "report.md").is_file()


@pytest.mark.slow
def test_a_sweep_with_a_crashed_job_and_a_closed_stdout_still_exits_1_naming_it(tmp_path):
    cut = closed_pipe_run("sweep", "--runs", str(tmp_path), "--name", "grid", *SMOKE, "train.epochs=1",
                          "fault.crash_at_step=1,null")
    assert cut.returncode == 1, cut.stderr  # the work's own failure wins over the cut pipe
    assert "job failed:" in cut.stderr
    index = read_json(tmp_path / "grid" / "sweep.json")
    assert sorted(j["state"] for j in index["jobs"]) == ["completed", "failed"]
