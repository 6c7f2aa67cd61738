"""`stab sweep` end to end: real multiruns of the smoke preset on each local launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stability.sweeps import SweepLock
from tests.conftest import SMOKE, read_json

GRID = ["residual=0.1,0.3", "norm=pre,post"]
CEILING_S = 600.0  # waits are for events (a state, an exit); this only stops a hang


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/status.json"))


def test_basic_sweep_runs_the_grid_into_readable_folders(cli, tmp_path):
    result = cli("sweep", "--runs", tmp_path, "--name", "grid", *SMOKE, *GRID)
    sweep = tmp_path / "grid"
    names = [p.name for p in job_dirs(sweep)]
    assert names == [
        "norm=post,preset=smoke,residual=0.1",
        "norm=post,preset=smoke,residual=0.3",
        "norm=pre,preset=smoke,residual=0.1",
        "norm=pre,preset=smoke,residual=0.3",
    ]
    index = read_json(sweep / "sweep.json")
    assert index["state"] == "completed" and len(index["jobs"]) == 4
    assert {tuple(sorted(j["overrides"])) for j in index["jobs"]} == {
        tuple(sorted(["preset=smoke", f"residual={r}", f"norm={n}"])) for r in ("0.1", "0.3") for n in ("pre", "post")
    }
    for d in job_dirs(sweep):
        status = read_json(d / "status.json")
        assert status["state"] == "completed"
        assert status["threads"] == len(os.sched_getaffinity(0))  # one job at a time gets every core
        assert read_json(d / "summary.json")["verdict"] in ("stable", "inconclusive", "exploding", "scream", "nan")
    assert "verdict" in result.output and "residual" in result.output
    # the sweep's wall time, measured and printed: one job after another, so at least the jobs' own wall times
    m = re.search(r"wall time (?:(\d+) min )?(\d+) s for 4 jobs, launcher basic", " ".join(result.output.split()))
    assert m, result.output
    wall = 60 * int(m[1] or 0) + int(m[2])
    assert wall + 1 >= sum(read_json(d / "summary.json")["wall_s"] for d in job_dirs(sweep))

    # same sweep again: everything is skipped, nothing is retrained
    finished = {d.name: read_json(d / "status.json")["finished"] for d in job_dirs(sweep)}
    again = cli("sweep", "--runs", tmp_path, "--name", "grid", *SMOKE, *GRID)
    assert "4 already completed, skipped" in again.output
    assert finished == {d.name: read_json(d / "status.json")["finished"] for d in job_dirs(sweep)}


def test_a_key_with_no_effect_makes_no_new_run_and_the_sweep_says_so(cli, tmp_path):
    # model.final_norm only exists in a pre-norm stack: under post-norm both values are one run.
    # joblib: its workers start before the sweep knows which jobs are duplicates
    result = cli(
        "sweep",
        "--runs",
        tmp_path,
        "--name",
        "inert",
        "--launcher",
        "joblib",
        "--jobs",
        "2",
        *SMOKE,
        "norm=post",
        "model.final_norm=true,false",
    )
    out = " ".join(result.output.split())
    assert "is the same configuration as job" in out and "trained once" in out
    assert "model.final_norm=False and model.final_norm=True give the same configuration" in out
    dirs = job_dirs(tmp_path / "inert")
    assert len(dirs) == 1 and read_json(dirs[0] / "status.json")["state"] == "completed"
    index = read_json(tmp_path / "inert" / "sweep.json")
    assert len(index["jobs"]) == 2 and len({j["run_id"] for j in index["jobs"]}) == 1
    # under pre-norm the same key is a real factor: two runs
    cli("sweep", "--runs", tmp_path, "--name", "real", *SMOKE, "norm=pre", "model.final_norm=true,false")
    assert len(job_dirs(tmp_path / "real")) == 2


def test_a_crashing_job_does_not_stop_the_others_and_fails_the_sweep(cli, tmp_path):
    result = cli("sweep", "--runs", tmp_path, "--name", "crash", *SMOKE, "fault.crash_at_step=null,1", ok=False)
    assert result.exit_code == 1
    states = {d.name: read_json(d / "status.json") for d in job_dirs(tmp_path / "crash")}
    assert states["fault.crash_at_step=null,preset=smoke"]["state"] == "completed"
    crashed = states["fault.crash_at_step=1,preset=smoke"]
    assert crashed["state"] == "failed" and "InjectedCrash" in crashed["error"]
    assert "job failed" in result.output and "fault.crash_at_step=1,preset=smoke" in result.output
    # re-running re-runs the failed job only (it fails again, deterministically)
    again = cli("sweep", "--runs", tmp_path, "--name", "crash", *SMOKE, "fault.crash_at_step=null,1", ok=False)
    assert "1 already completed, skipped" in again.output


def test_nan_and_exploding_runs_are_results_not_crashes(cli, tmp_path):
    cli("sweep", "--runs", tmp_path, "--name", "nan", *SMOKE, "fault.nan_at_step=3,null")
    verdicts = sorted(read_json(d / "summary.json")["verdict"] for d in job_dirs(tmp_path / "nan"))
    assert "nan" in verdicts and len(verdicts) == 2


@pytest.mark.slow
def test_joblib_sweep_splits_threads_between_concurrent_jobs(cli, tmp_path):
    cli("sweep", "--runs", tmp_path, "--name", "par", "--launcher", "joblib", "--jobs", "2", *SMOKE, "residual=0.1,0.3")
    dirs = job_dirs(tmp_path / "par")
    assert len(dirs) == 2
    for d in dirs:
        status = read_json(d / "status.json")
        assert status["state"] == "completed"
        assert status["concurrency"] == 2 and status["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert status["pid"] != os.getpid()  # ran in a worker process
    for pid in {read_json(d / "status.json")["pid"] for d in dirs}:  # idle workers are not left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_submitit_local_sweep_runs_jobs_in_subprocesses(cli, tmp_path):
    cli("sweep", "--runs", tmp_path, "--name", "sub", "--launcher", "submitit_local", *SMOKE, "norm=pre,post")
    dirs = job_dirs(tmp_path / "sub")
    assert [read_json(d / "status.json")["state"] for d in dirs] == ["completed", "completed"]
    assert all(read_json(d / "status.json")["pid"] != os.getpid() for d in dirs)


@pytest.mark.slow
def test_a_sweep_killed_part_way_resumes_only_what_is_missing(tmp_path):
    args = [
        sys.executable,
        "-m",
        "cli.main",
        "sweep",
        "--runs",
        str(tmp_path),
        "--name",
        "kill",
        *SMOKE,
        "train.epochs=30",
        "residual=0.1,0.3",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep = tmp_path / "kill"
    deadline = time.monotonic() + CEILING_S  # an event to wait for; the ceiling only stops a hang
    while time.monotonic() < deadline:  # wait until the first job is done and the second is running
        states = [read_json(d / "status.json").get("state") for d in job_dirs(sweep)] if sweep.exists() else []
        if states.count("completed") == 1 and states.count("running") == 1:
            break
        if proc.poll() is not None:
            pytest.fail(f"sweep exited ({proc.returncode}) before one job completed and one ran: {states}")
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"sweep never reached one completed and one running job: {states}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [d for d in job_dirs(sweep) if read_json(d / "status.json")["state"] == "completed"]
    killed = [d for d in job_dirs(sweep) if read_json(d / "status.json")["state"] == "running"]
    assert len(done) == 1 and len(killed) == 1
    finished_before = read_json(done[0] / "status.json")["finished"]

    result = subprocess.run(args, capture_output=True, text=True, timeout=CEILING_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "found interrupted job" in result.stderr and killed[0].name in result.stderr
    assert "1 already completed, skipped" in result.stdout
    assert read_json(done[0] / "status.json")["finished"] == finished_before  # not re-run
    assert read_json(killed[0] / "status.json")["state"] == "completed"


def test_bad_sweeps_are_refused_before_any_job(cli, tmp_path):
    bad_value = cli("sweep", "--runs", tmp_path, "--name", "bad", *SMOKE, "residual=0.1,-2", ok=False)
    assert bad_value.exit_code == 2 and "residual=-2" in bad_value.output
    bad_launcher = cli("sweep", "--runs", tmp_path, "--launcher", "dask", *SMOKE, ok=False)
    assert bad_launcher.exit_code == 2 and "--launcher 'dask' is not allowed" in bad_launcher.output
    assert not list(tmp_path.rglob("status.json"))


def test_a_second_sweep_on_the_same_name_is_refused_while_the_first_runs(cli, tmp_path):
    with SweepLock(tmp_path / "busy"):
        result = cli("sweep", "--runs", tmp_path, "--name", "busy", *SMOKE, ok=False)
    assert result.exit_code == 2 and "is in use by pid" in result.output


def test_a_refused_joblib_sweep_stops_its_warming_workers_with_one_line(tmp_path):
    """The workers start before the configs are checked; a refused config stops them quietly."""
    args = [
        sys.executable,
        "-m",
        "cli.main",
        "sweep",
        "--runs",
        str(tmp_path),
        "--launcher",
        "joblib",
        *SMOKE,
        "residual=0.1,0.3",
        "norm=sideways",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=CEILING_S)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: norm='sideways' is not allowed: expected one of pre, post, deepnorm"
    ]
    assert not list(tmp_path.rglob("status.json"))
