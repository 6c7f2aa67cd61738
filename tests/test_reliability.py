"""Faults, kills and bad input: a crash, a signal or a typo costs one job, never the results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stability.record.format import read_grad_table
from stability.storage import append_jsonl, read_jsonl
from tests.conftest import SMOKE, read_json

STAB = [sys.executable, "-m", "cli.main"]


CEILING_S = 600.0  # waits are for events; the ceiling only stops a test that would hang


def wait_for(predicate, timeout: float = CEILING_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout:.0f} s")


def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [*STAB, "run", "--runs", str(tmp_path), *SMOKE, "train.epochs=2000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: list(tmp_path.rglob("epochs.jsonl")), what="the first epoch")
    except BaseException:
        proc.kill()
        raise
    return proc, next(tmp_path.rglob("epochs.jsonl")).parent


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_flushes_metrics_and_marks_the_run_interrupted(tmp_path, sig):
    proc, run = start_long_run(tmp_path)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=CEILING_S)
    assert proc.returncode == 130, err
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted" and sig.name in status["error"]
    steps, bad = read_jsonl(run / "metrics.jsonl")
    epochs, _ = read_jsonl(run / "epochs.jsonl")
    assert bad == 0 and len(steps) >= 4 * len(epochs) >= 4  # smoke: 4 steps per epoch
    assert [s["step"] for s in steps] == list(range(len(steps)))  # every step up to the signal, in order
    table = read_grad_table(run / "grad_norms.csv")  # the unfinished epoch's rows too
    assert set(table["epoch"]) == {s["epoch"] for s in steps}
    assert table.groupby("epoch").size().nunique() == 1  # every epoch has every group


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    proc, _ = start_long_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=CEILING_S)
    assert proc.returncode == 130


def test_an_unwritable_runs_folder_is_refused_with_one_line(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for cmd in ("run", "sweep"):
        result = cli(cmd, "--runs", blocker / "runs", *SMOKE, ok=False)
        assert result.exit_code == 2
        assert "is not a writable folder" in result.output and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def test_debug_shows_the_traceback_of_a_user_error(cli, tmp_path):
    plain = cli("run", "--runs", tmp_path, "norm=sideways", ok=False)
    debug = cli("--debug", "run", "--runs", tmp_path, "norm=sideways", ok=False)
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" not in plain.output and "Traceback" in debug.output


def test_jsonl_reader_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"step": 0, "loss": float("nan")}, {"step": 1, "loss": 1.0}])
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    records, bad = read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1] and bad == 1
    assert records[0]["loss"] != records[0]["loss"]  # NaN survives the round trip


@pytest.mark.slow
def test_basic_and_joblib_launchers_give_bitwise_identical_grad_tables(cli, tmp_path):
    # CPU matmuls split work by thread count; pinning it makes the launchers comparable
    # (at 1 vs 2 threads the tables differ in the 6th significant digit).
    args = [*SMOKE, "train.threads=1", "residual=0.1,0.3"]
    cli("sweep", "--runs", tmp_path, "--name", "basic", *args)
    cli("sweep", "--runs", tmp_path, "--name", "joblib", "--launcher", "joblib", "--jobs", "2", *args)
    for job in ("preset=smoke,residual=0.1", "preset=smoke,residual=0.3"):
        a = (tmp_path / "basic" / job / "grad_norms.csv").read_bytes()
        b = (tmp_path / "joblib" / job / "grad_norms.csv").read_bytes()
        assert a == b


@pytest.mark.slow
def test_soak_crashes_and_a_sigkill_then_resume_leave_no_job_unaccounted(tmp_path):
    """8 jobs: 4 crash on purpose, the sweep is SIGKILLed mid-job, then resumed."""
    grid = ["seed=0,1,2,3", "fault.crash_at_step=null,3"]
    args = [*STAB, "sweep", "--runs", str(tmp_path), "--name", "soak", *SMOKE, "train.epochs=12", *grid]
    sweep = tmp_path / "soak"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def states() -> list[str]:
        return [read_json(p)["state"] for p in sweep.glob("*/status.json")] if sweep.exists() else []

    try:
        wait_for(
            lambda: states().count("completed") >= 2 and "running" in states(),
            what="two completed jobs and one running",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "running" in states()

    result = subprocess.run(args, capture_output=True, text=True, timeout=CEILING_S)
    assert result.returncode == 1, result.stdout + result.stderr  # the injected crashes fail the sweep
    jobs = sorted(sweep.glob("*/status.json"))
    assert len(jobs) == 8
    for status_path in jobs:
        run = status_path.parent
        status = read_json(status_path)
        summary = read_json(run / "summary.json")  # parses: nothing half-written
        json.loads((run / "overrides.json").read_text())
        steps, bad = read_jsonl(run / "metrics.jsonl")
        if "crash_at_step=3" in run.name:
            assert status["state"] == "failed" and "InjectedCrash" in status["error"]
            assert summary["verdict"] == "failed" and len(steps) == 3
        else:
            assert status["state"] == "completed" and summary["verdict"] != "failed"
            assert bad == 0 and len(steps) == 12 * 4
    index = read_json(sweep / "sweep.json")
    assert sorted(j["state"] for j in index["jobs"]) == ["completed"] * 4 + ["failed"] * 4
