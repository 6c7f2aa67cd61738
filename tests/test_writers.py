"""Nothing lost, nothing written twice (issue 14): one writer per run folder, sweeps that stop
their jobs on a signal, full disks, damaged records, file modes.

Tests that wait for another process wait for an event (a file, a state, a pid's exit) with a
ceiling far above any expected time, so they pass on a loaded machine.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stability import report, storage
from stability.errors import StorageError
from stability.rundirs import LEASE, RunLease, alive, holder
from tests.conftest import SMOKE, read_json

STAB = [sys.executable, "-m", "cli.main"]
CEILING_S = 600.0  # an event that has not come by then will not come


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + CEILING_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {CEILING_S:.0f} s")
        time.sleep(0.1)


def steps_and_epochs(run: Path) -> tuple[list[int], list[int]]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    return [m["step"] for m in metrics], [e["epoch"] for e in epochs]


def every_json_parses(folder: Path) -> None:
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())


# --- one writer per folder --------------------------------------------------------------------


def test_two_runs_with_the_same_overrides_in_the_same_second_get_a_folder_each(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second, always
    for _ in range(2):
        cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=2")
    runs = sorted((tmp_path / "run").iterdir())
    assert [r.name for r in runs] == [
        "20260101-000000_preset=smoke,train.epochs=2",
        "20260101-000000_preset=smoke,train.epochs=2-2",
    ]
    for run in runs:  # each written once: every step and epoch exactly once, in order
        steps, epochs = steps_and_epochs(run)
        assert steps == list(range(8)) and epochs == [1, 2]


def test_a_second_writer_is_refused_and_touches_nothing(tmp_path):
    from cli.config import compose_run
    from stability import training
    from stability.rundirs import LeaseBusy

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with RunLease(run):
        assert holder(run).live
        with pytest.raises(LeaseBusy, match=f"being written by pid {os.getpid()}"):
            training.run(compose_run([*SMOKE]), run)
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n' and not (run / "status.json").exists()
    assert not holder(run).live  # released


def test_a_dead_writer_is_told_apart_from_a_live_one_by_pid_and_start_time(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(
        json.dumps({"state": "running", "pid": gone.pid, "host": os.uname().nodename, "started": time.time()})
    )
    (run / LEASE).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "pid_start": 1}))
    loaded = report.load_run(run, tmp_path)  # report and show: never `running` forever
    assert loaded.state == "interrupted" and any("is gone" in w for w in loaded.warnings)
    # a live pid whose start time differs is a reused pid: its writer is gone too
    assert alive(os.getpid()) and not alive(os.getpid(), start=1)


def test_a_job_still_written_by_a_live_process_is_not_started_a_second_time(cli, tmp_path):
    job = tmp_path / "busy" / "preset=smoke"
    job.mkdir(parents=True)
    running = {"state": "running", "pid": os.getpid(), "host": os.uname().nodename, "started": time.time()}
    (job / "status.json").write_text(json.dumps(running))
    with RunLease(job):  # another live writer: this test process
        result = cli("sweep", "--runs", tmp_path, "--name", "busy", *SMOKE, ok=False)
    assert result.exit_code == 1
    assert "not started" in result.output and f"being written by pid {os.getpid()}" in result.output
    assert read_json(job / "status.json")["state"] == "running"  # not marked interrupted
    assert not (job / "metrics.jsonl").exists()  # no second writer


# --- signals to a sweep -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_a_signal_to_a_sweep_stops_its_jobs_and_a_rerun_resumes_with_one_writer(tmp_path, launcher):
    args = [
        *STAB,
        "sweep",
        "--runs",
        str(tmp_path),
        "--name",
        "sig",
        "--launcher",
        launcher,
        *SMOKE,
        "train.epochs=15",
        "residual=0.1,0.3",
    ]
    sweep = tmp_path / "sig"
    parallel = launcher != "basic"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(
            lambda: len(list(sweep.glob("*/epochs.jsonl"))) >= (2 if parallel else 1),
            "a trained epoch in every running job",
            proc,
        )
        first = {p.parent: read_json(p.parent / "status.json")["pid"] for p in sweep.glob("*/epochs.jsonl")}
        proc.send_signal(signal.SIGTERM)  # to the sweep's pid only, not its process group
        out, err = proc.communicate(timeout=CEILING_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    for run, pid in first.items():
        assert not alive(pid), f"job {run.name} (pid {pid}) still runs after its sweep stopped"
        status = read_json(run / "status.json")
        assert status["state"] == "interrupted", status
    index = read_json(sweep / "sweep.json")
    assert index["state"] == "interrupted"
    # every job it was to run is named: those started interrupted, one never started (basic) pending
    states = {j["folder"]: j["state"] for j in index["jobs"]}
    assert len(states) == 2 and {f for f, st in states.items() if st == "interrupted"} == {r.name for r in first}
    assert set(states.values()) <= {"interrupted", "pending"}
    assert sorted(o for j in index["jobs"] for o in j["overrides"] if o.startswith("residual")) == [
        "residual=0.1",
        "residual=0.3",
    ]

    again = subprocess.run(args, capture_output=True, text=True, timeout=CEILING_S)
    assert again.returncode == 0, again.stdout + again.stderr
    for run in sorted(sweep.glob("*/status.json")):
        status = read_json(run)
        assert status["state"] == "completed" and status["pid"] not in first.values()
        steps, epochs = steps_and_epochs(run.parent)  # one writer: each step once, in order
        assert steps == list(range(15 * 4)) and epochs == list(range(1, 16))
    assert sorted(j["state"] for j in read_json(sweep / "sweep.json")["jobs"]) == ["completed", "completed"]


@pytest.mark.slow
def test_jobs_of_a_sigkilled_submitit_sweep_stop_themselves_and_an_immediate_rerun_has_one_writer(tmp_path):
    """submitit re-parents its jobs: SIGKILL to the sweep leaves them orphans, which must not
    train on beside the re-run (issue 14: 216 metric lines for 120 steps)."""
    args = [
        *STAB,
        "sweep",
        "--runs",
        str(tmp_path),
        "--name",
        "orphans",
        "--launcher",
        "submitit_local",
        *SMOKE,
        "train.epochs=40",
        "residual=0.1,0.3",
    ]  # long enough to overlap a re-run
    sweep = tmp_path / "orphans"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(list(sweep.glob("*/epochs.jsonl"))) == 2, "a trained epoch in both jobs", proc)
        orphans = [read_json(p.parent / "status.json")["pid"] for p in sweep.glob("*/epochs.jsonl")]
    finally:
        proc.send_signal(signal.SIGKILL)  # the sweep only: its jobs live on in their own processes
        proc.wait()

    again = subprocess.run(args, capture_output=True, text=True, timeout=CEILING_S)  # at once
    assert again.returncode == 0, again.stdout + again.stderr
    assert not any(alive(pid) for pid in orphans)
    for run in sorted(sweep.glob("*/status.json")):
        assert read_json(run)["state"] == "completed" and read_json(run)["pid"] not in orphans
        steps, epochs = steps_and_epochs(run.parent)
        assert steps == list(range(40 * 4)) and epochs == list(range(1, 41))


# --- full disks and write errors ------------------------------------------------------------


def enospc(path: object = "?") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_mid_run_ends_with_one_line_and_a_failed_status(cli, tmp_path, monkeypatch):
    """From the second metrics write on, the disk is full: no new file, no appended byte."""
    from stability.record import writer as runwriter

    full = {"on": False}
    real_append, real_mkstemp = runwriter.append_text, storage.tempfile.mkstemp

    def append(path, text):
        if Path(path).name == "metrics.jsonl" and (path.exists() or full["on"]):
            full["on"] = True
            raise StorageError(path, enospc(path))
        return real_append(path, text)

    def mkstemp(*a, **kw):
        if full["on"]:
            raise enospc()
        return real_mkstemp(*a, **kw)

    monkeypatch.setattr(runwriter, "append_text", append)
    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    result = cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=3", ok=False)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and "metrics.jsonl: no space left on device" in line
    (run,) = (tmp_path / "run").iterdir()
    every_json_parses(run)  # nothing half-written
    status = read_json(run / "status.json")  # written in place: no temp file could be had
    assert status["state"] == "failed" and "no space left on device" in status["error"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert report.load_run(run).state == "failed"


def test_a_sweep_index_on_a_full_disk_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda *a, **kw: (_ for _ in ()).throw(enospc()))
    result = cli("sweep", "--runs", tmp_path, "--name", "full", *SMOKE, ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'full' / 'sweep.json'}: no space left on device"
    ]


def test_a_cache_entry_on_a_full_disk_names_the_cache_and_the_cause(tmp_path, monkeypatch):
    import torch

    from stability.workloads.cascade import cache

    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda *a, **kw: (_ for _ in ()).throw(enospc()))
    entry = tmp_path / "cache" / "latents" / "abc.pt"
    with pytest.raises(StorageError) as e:
        cache.write_entry(entry, {"tensors": {"x": torch.zeros(3)}, "meta": json.dumps({"digest": "0"})})
    assert str(e.value) == f"cannot write {entry}: no space left on device"
    assert not list(entry.parent.iterdir())  # no partial entry, no temp file left


def test_status_is_written_in_place_when_no_temp_file_can_be_had(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    storage.write_status(path, {"state": "running", "pid": 1})
    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda *a, **kw: (_ for _ in ()).throw(enospc()))
    storage.write_status(path, {"state": "failed", "error": "x" * 100, "traceback": "t" * 10_000})
    assert read_json(path) == {"state": "failed", "error": "x" * 100, "traceback": None}


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )
    return ok


@pytest.mark.slow
def test_a_real_full_disk(tmp_path):
    """A 3 MB tmpfs as --runs and as STAB_CACHE (needs root to mount: skipped otherwise)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        (disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 96 * 2**10))  # leave 96 KiB
        env = dict(os.environ)
        run = subprocess.run(
            [*STAB, "run", "--runs", str(disk / "runs"), *SMOKE, "train.epochs=400"],
            capture_output=True,
            text=True,
            env=env,
            timeout=CEILING_S,
        )
        assert run.returncode == 1, run.stdout + run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot write {disk}") and line.endswith("no space left on device")
        (folder,) = (disk / "runs" / "run").iterdir()
        every_json_parses(folder)
        assert read_json(folder / "status.json")["state"] == "failed"

        (disk / "filler").unlink()
        (disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 96 * 2**10))
        env["STAB_CACHE"] = str(disk / "cache")  # a fresh cache entry (> 1 MB) cannot fit
        cache = subprocess.run(
            [*STAB, "run", "--runs", str(tmp_path / "runs"), *SMOKE],
            capture_output=True,
            text=True,
            env=env,
            timeout=CEILING_S,
        )
        assert cache.returncode == 1, cache.stdout + cache.stderr
        (line,) = cache.stderr.strip().splitlines()
        assert f"cannot write {disk / 'cache' / 'latents'}" in line and line.endswith("no space left on device")
    finally:
        subprocess.run(["umount", str(disk)])


# --- damaged records, file modes ------------------------------------------------------------


@pytest.mark.slow
def test_resume_reruns_completed_jobs_whose_record_is_damaged_and_says_why(cli, tmp_path):
    args = ["sweep", "--runs", tmp_path, "--name", "dmg", *SMOKE, "train.epochs=2", "residual=0.1,0.3"]
    cli(*args)
    sweep = tmp_path / "dmg"
    a, b = sorted(p.parent for p in sweep.glob("*/status.json"))
    (a / "summary.json").write_text("garbage")
    lines = (b / "metrics.jsonl").read_text().splitlines()
    (b / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # steps lost

    shown = cli("report", sweep)
    assert f"{a.name}: summary.json unreadable" in shown.output  # a warning, not a silent `?`

    again = cli(*args)
    assert f"found damaged job {a.name}: summary.json unreadable" in again.output
    assert f"found damaged job {b.name}: metrics.jsonl holds 3 steps, summary.json says 8" in again.output
    assert "skipped" not in again.output  # both ran again
    for run in (a, b):
        steps, epochs = steps_and_epochs(run)
        assert steps == list(range(8)) and epochs == [1, 2]
        assert read_json(run / "summary.json")["verdict"]


def test_result_files_honour_the_umask(cli, tmp_path):
    old = os.umask(0o002)
    try:
        cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=1")
    finally:
        os.umask(old)
    (run,) = (tmp_path / "run").iterdir()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    assert {"status.json", "summary.json", "config.yaml", "grad_norms.csv", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {0o664}, modes
