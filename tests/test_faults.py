"""Faults as users and operators produce them (issue 29): a reader that closes stdout, a folder
that is not a run, a full disk under a promise, trackers that cannot work, audio folders as
people keep them, and messages with holes. Each test fails on the behaviour the issue found."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stability.record import verdicts as vd
from tests.conftest import SMOKE, Cli, only_run, read_json

ROOT = Path(__file__).resolve().parents[1]
STAB = [sys.executable, "-m", "cli.main"]
CEILING_S = 600  # a generous ceiling for a subprocess on a busy 2-core machine, not a timing


def closed_pipe_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run stab with stdout a real pipe whose reader has already gone (`stab ... | head -0`):
    every write to stdout meets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*STAB, *args],
            check=False,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            timeout=CEILING_S,
        )
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
    assert read_json(folder / "summary.json")["verdict"] in set(vd.SEVERITY) - {vd.FAILED}
    for args in (["show", str(folder)], ["--help"], ["report", str(tmp_path)]):
        cut = closed_pipe_run(*args)
        assert cut.returncode == -signal.SIGPIPE, (args, cut.stderr)
        assert cut.stderr == "", (args, cut.stderr)
    assert (tmp_path / "report.md").is_file()  # the report's work was done although nothing was printed


@pytest.mark.slow
def test_a_sweep_whose_stdout_closes_finishes_every_job_and_says_so_in_sweep_json(tmp_path):
    cut = closed_pipe_run(
        "sweep", "--runs", str(tmp_path), "--name", "grid", *SMOKE, "train.epochs=1", "residual=0.1,0.3"
    )
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
    cut = closed_pipe_run(
        "sweep", "--runs", str(tmp_path), "--name", "grid", *SMOKE, "train.epochs=1", "fault.crash_at_step=1,null"
    )
    assert cut.returncode == 1, cut.stderr  # the work's own failure wins over the cut pipe
    assert "job failed:" in cut.stderr
    index = read_json(tmp_path / "grid" / "sweep.json")
    assert sorted(j["state"] for j in index["jobs"]) == ["completed", "failed"]


# --- stab report: folders that are not runs, files stab did not write, a full disk -------------


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    """One real smoke run (1 epoch): RUNS/run/<folder>."""
    runs = tmp_path_factory.mktemp("runs")
    Cli()("run", "--runs", runs, *SMOKE, "train.epochs=1")
    return only_run(runs)


def _copy_runs(run: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(run, where / "run" / run.name)
    return where


def test_report_on_a_folder_with_no_valid_run_refuses_in_one_line_and_touches_nothing(cli, tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "report.md").write_text("my own notes\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("report", tmp_path, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}: no valid run in it") and "summary.json with a verdict" in line
    assert (tmp_path / "report.md").read_text() == "my own notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_report_never_overwrites_a_file_it_did_not_write(cli, tmp_path, one_run):
    runs = _copy_runs(one_run, tmp_path / "runs")
    (runs / "report.md").write_text("my own notes\n")
    result = cli("report", runs, ok=False)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{runs / 'report.md'} was not written by stab report" in line
    assert (runs / "report.md").read_text() == "my own notes\n" and not (runs / "runs.csv").exists()

    (runs / "report.md").unlink()
    cli("report", runs)
    assert (runs / "report.md").read_text().startswith("# Stability report")
    cli("report", runs)  # its own files: rewritten
    (runs / "plots" / "curves.png").write_bytes(b"my own plot")  # changed by the user since
    result = cli("report", runs, ok=False)
    assert result.exit_code == 2 and "plots/curves.png was not written by stab report" in result.stderr
    assert (runs / "plots" / "curves.png").read_bytes() == b"my own plot"


def test_report_of_a_folder_written_before_the_manifest_is_still_ours(cli, tmp_path, one_run):
    runs = _copy_runs(one_run, tmp_path / "runs")
    cli("report", runs)
    (runs / ".stab-report.json").unlink()  # as an older stab left it
    cli("report", runs)
    assert (runs / ".stab-report.json").is_file()


def test_report_out_on_a_full_disk_exits_1_naming_the_file(cli, tmp_path, one_run, monkeypatch):
    """A 64 KiB tmpfs as --out where it can be mounted (root), else the write fails at the OS."""
    runs = _copy_runs(one_run, tmp_path / "runs")
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64k")
    if not mounted:
        import errno

        real_write = os.write

        def full(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(disk)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", full)
    try:
        result = cli("report", runs, "--out", disk / "rep", ok=False)
        assert result.exit_code == 1, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot write {disk / 'rep'}") and line.endswith("no space left on device")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, check=False
        ).returncode
        == 0
    )


# --- promises in the README: one naming rule, a whole last JSON line ------------------------------


def test_stab_run_names_a_long_float_like_stab_sweep_names_the_same_job(cli, tmp_path):
    over = [*SMOKE, "train.epochs=1", "residual=0.1000000000000000055511151231257827", "train.lr=1e-3"]
    cli("sweep", "--runs", tmp_path / "s", "--name", "one", *over)
    cli("run", "--runs", tmp_path / "r", *over)
    (job,) = [p.parent.name for p in (tmp_path / "s" / "one").glob("*/status.json")]
    (run,) = [p.name for p in (tmp_path / "r" / "run").iterdir()]
    assert run.split("_", 1)[1] == job == "preset=smoke,residual=0.1,train.epochs=1,train.lr=0.001"


def test_a_full_disk_mid_append_leaves_every_jsonl_line_whole(cli, tmp_path, monkeypatch):
    """The disk fills part-way through an append (the kernel writes what fits, then ENOSPC): a
    3 MB tmpfs with 96 KiB left where it can be mounted (root), else that short write and ENOSPC
    made at os.write. The README says jq reads every .jsonl; after this it still does."""
    import errno
    import shutil

    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "3m")
    if mounted:
        (disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 96 * 2**10))
    else:
        real_write, appends = os.write, []

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
                appends.append(len(data))
                if len(appends) == 3:
                    return real_write(fd, bytes(data[: len(data) // 2]))  # half of the lines fit ...
                if len(appends) > 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    try:
        result = cli("run", "--runs", disk / "runs", *SMOKE, "train.epochs=400", ok=False)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().endswith("no space left on device"), result.stderr
        (folder,) = (disk / "runs" / "run").iterdir()
        for path in folder.glob("*.jsonl"):
            records = [json.loads(line) for line in path.read_text().splitlines()]  # strict: a torn line raises
            if shutil.which("jq"):
                jq = subprocess.run(["jq", "-c", ".", str(path)], capture_output=True, text=True, check=False)
                assert jq.returncode == 0 and len(jq.stdout.splitlines()) == len(records), (path, jq.stderr)
        steps = [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]
        assert steps and steps == list(range(len(steps)))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# --- messages with holes ------------------------------------------------------------------------


def test_a_duplicate_job_says_why_it_is_trained_once(cli, tmp_path):
    from stability.sweeps import same_configuration

    result = cli("sweep", "--runs", tmp_path, *SMOKE, "train.epochs=1", "residual=0.1,0.10", ok=False)
    (line,) = [x for x in result.stderr.splitlines() if "trained once" in x]
    assert "( has" not in line and "()" not in line, line
    assert line.startswith("job preset=smoke train.epochs=1 residual=0.1 is listed twice"), line
    line = same_configuration(["norm=post", "model.final_norm=false"], ["norm=post", "model.final_norm=true"])
    assert "(model.final_norm=false and model.final_norm=true give the same configuration)" in line
    line = same_configuration(["norm=post", "residual=0.1"], ["norm=post"])
    assert "(residual=0.1 changes nothing there)" in line


def test_a_damaged_job_is_named_with_its_file_name_once(tmp_path, one_run):
    import shutil

    from stability.sweeps import incomplete

    run = shutil.copytree(one_run, tmp_path / "job")
    assert incomplete(run) is None
    (run / "epochs.jsonl").unlink()
    assert incomplete(run) == "epochs.jsonl is missing"
    (run / "metrics.jsonl").write_text("")
    assert incomplete(run) == "metrics.jsonl is empty"
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "lo')
    assert incomplete(run) == "metrics.jsonl: 1 unparsable line(s) skipped"


def test_the_live_view_counts_only_this_launchs_jobs(tmp_path, monkeypatch):
    """`stab margin` runs rounds of probes into one folder: `[14/2 done]` counted every round's."""
    import io

    from rich.console import Console

    import cli.sweepview as sweep_mod
    from cli.sweepview import LiveView
    from stability.sweeps import sweep_progress

    def job(name: str, state: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(
            json.dumps({"state": state, "started": 1.0, "finished": 2.0, "verdict": "stable"})
        )

    for i in range(14):
        job(f"residual=0.1,train.lr=0.{i + 1}", "completed")  # earlier rounds
    job("residual=0.1,train.lr=1", "completed")
    job("residual=0.1,train.lr=2", "running")
    view = LiveView(2)
    buf = io.StringIO()
    monkeypatch.setattr(sweep_mod, "console", Console(file=buf, width=200, color_system=None))
    view.print_changes(sweep_progress(tmp_path, {"residual=0.1,train.lr=1", "residual=0.1,train.lr=2"}, 3.0))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all("/2 done]" in x for x in lines), lines
    assert max(int(x[1 : x.index("/")]) for x in lines) == 1, lines


def test_the_live_view_never_guesses_a_scream_for_a_run_that_ends_stable(tmp_path, one_run):
    import shutil

    from stability.sweeps import job_progress

    run = shutil.copytree(one_run, tmp_path / "job")
    status = read_json(run / "status.json")
    epochs = [json.loads(x) for x in (run / "epochs.jsonl").read_text().splitlines()]
    epochs[-1]["collapsed"] = True  # the output collapsed in its last epoch so far ...
    (run / "epochs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (run / "status.json").write_text(json.dumps({**status, "state": "running", "verdict": None, "finished": None}))
    j = job_progress(run, now=status["started"] + 1)
    assert j["verdict"] is None and j["note"] == f"output collapsed at epoch {epochs[-1]['epoch']}"
    (run / "status.json").write_text(json.dumps(status))  # ... and it ended stable
    j = job_progress(run, now=status["finished"])
    assert j["verdict"] == status["verdict"] and j["note"] is None


def test_doctor_on_an_interrupted_run_says_why_there_is_no_verdict(cli, tmp_path, one_run):
    import shutil

    run = shutil.copytree(one_run, tmp_path / "job")
    (run / "summary.json").unlink()  # as a run stopped by SIGINT before its end leaves it
    status = read_json(run / "status.json")
    (run / "status.json").write_text(json.dumps({**status, "state": "interrupted", "error": "SIGINT", "verdict": None}))
    out = cli("doctor", run).output
    (line,) = [x for x in out.splitlines() if x.startswith("verdict")]
    assert "?" not in line, line
    assert line.startswith("verdict: none: the run is interrupted (SIGINT) after 1 of 1 epoch(s)"), line
    (run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": 2**22 + 1, "verdict": None}))
    out = cli("doctor", run).output
    assert "verdict: none: the run is interrupted (its writer, pid 4194305, is gone)" in out, out


# --- trackers that cannot work: found out in seconds, said once in one line, the run goes on ------


def _read_only_folder(where: Path) -> bool:
    """A read-only file system at `where` (root: a tmpfs remounted ro); else a folder without write
    permission, which only binds a user who is not root."""
    if _mount_tmpfs(where, "1m"):
        return (
            subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, check=False).returncode == 0
        )
    where.chmod(0o555)
    return os.geteuid() != 0


def test_a_read_only_mlflow_store_is_one_line_at_once_and_wandb_dir_is_respected(cli, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    store = tmp_path / "ro"
    if not _read_only_folder(store):
        pytest.skip("no read-only folder can be made here")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
        monkeypatch.delenv("WANDB_MODE", raising=False)
        result = cli("run", "--runs", tmp_path / "runs", *SMOKE, "train.epochs=1", "log=[mlflow,wandb]")
    finally:
        subprocess.run(["umount", str(store)], capture_output=True, check=False)
    warned = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(warned) == 1, result.stderr  # not MLflow's 9 retry warnings, not a Python warning with its source line
    assert warned[0].startswith("warning: tracker mlflow could not start (") and "cannot be written" in warned[0]
    assert "retried" not in result.output
    run = only_run(tmp_path / "runs")
    assert read_json(run / "status.json")["state"] == "completed"
    stored = read_json(run / "trackers.json")
    assert "cannot be written" in stored["mlflow"]["error"] and stored["wandb"]["error"] is None
    assert not (run / "wandb").exists()  # W&B's files went where WANDB_DIR says
    assert list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert stored["wandb"]["dir"] == str(tmp_path / "wandb_home" / "wandb")


@pytest.mark.slow
def test_tensorboard_on_a_full_disk_prints_no_thread_traceback(tmp_path):
    pytest.importorskip("tensorboard")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        (disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 96 * 2**10))
        result = subprocess.run(
            [*STAB, "run", "--runs", str(disk / "runs"), *SMOKE, "train.epochs=400", "log=tensorboard"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=CEILING_S,
            check=False,
        )
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: cannot write ") and lines[-1].endswith("no space left on device"), lines
    assert all(x.startswith(("warning: tracker tensorboard", "error: ")) for x in lines), lines
    assert len(lines) <= 2, lines
