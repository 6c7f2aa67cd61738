"""`stab sweep --launcher submitit_slurm` against a real single-node SLURM cluster.

The cluster is started by `.ci/slurm-up` (Debian's slurm-wlm and munge, as root; idempotent). The
tests skip, saying why, only where it cannot be installed (not root, no apt). Every job goes
through the real sbatch / squeue / scancel; accounting is off, as on many small clusters, so
`sacct` fails and stab reads job states from squeue. Jobs are smoke runs of a few epochs: the
machine has 2 cores, and each job asks for one (`cpus_per_task=1`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stability.slurm import SbatchRefused, launcher_key, sbatch_reason, squeue_states
from tests.conftest import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
STAB = [sys.executable, "-m", "cli.main"]
CEILING_S = 600.0  # an event that has not come by then will not come
SLURM = ["--launcher", "submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
SMOKE = ["preset=smoke"]


@pytest.fixture(scope="module")
def cluster() -> None:
    """The single-node cluster, up (started if need be); skips only where it cannot be installed."""
    up = subprocess.run([str(ROOT / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        pytest.skip(f"no SLURM cluster here: {up.stderr.strip().splitlines()[-1] if up.stderr.strip() else 'slurm-up'}")
    assert up.returncode == 0, up.stdout + up.stderr


def env() -> dict[str, str]:
    # the jobs inherit this (sbatch exports the submitting environment): the code under test, the
    # session's latent cache
    return {**os.environ, "PYTHONPATH": str(ROOT), "STAB_WIDTH": "260"}


def sweep(tmp: Path, name: str, *args: str, launcher: list[str] = SLURM) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STAB, "sweep", "--runs", str(tmp), "--name", name, *launcher, *args],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        env=env(),
    )


def start(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*STAB, "sweep", "--runs", str(tmp), "--name", name, *SLURM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + CEILING_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {CEILING_S:.0f} s")
        time.sleep(0.2)


def status(run: Path) -> dict:
    try:
        return read_json(run / "status.json")
    except (OSError, ValueError):
        return {}


def steps_and_epochs(run: Path) -> tuple[list[int], list[int]]:
    return [m["step"] for m in read_jsonl(run / "metrics.jsonl")], [
        e["epoch"] for e in read_jsonl(run / "epochs.jsonl")
    ]


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", job], capture_output=True, text=True)
    return out.returncode == 0 and job in out.stdout.split()


def overhead_per_job(sweep_dir: Path, wall_s: float) -> float:
    """Mean over the jobs of the sweep's wall time not spent inside the job's own run (from
    submission to its start, and from its end to the sweep's answer): what the launcher costs."""
    spans = [status(p.parent)["finished"] - status(p.parent)["started"] for p in sweep_dir.glob("*/status.json")]
    return sum(wall_s - s for s in spans) / len(spans)


# --- without a cluster: the words of sbatch's refusals -----------------------------------------


@pytest.mark.parametrize(
    "error, key",
    [
        ("sbatch: error: Invalid generic resource (gres) specification", "hydra.launcher.gpus_per_node"),
        (
            "sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: "
            "Requested node configuration is not available",
            "hydra.launcher.mem_gb",
        ),
        (
            "sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: "
            "Invalid partition name specified",
            "hydra.launcher.partition",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
            "hydra.launcher.timeout_min",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
            "hydra.launcher.cpus_per_task",
        ),
    ],
)
def test_an_sbatch_refusal_names_its_reason_and_the_launcher_key(error, key):
    e = SbatchRefused(f"Command '['sbatch', '/x/submission_file_1.sh']' returned non-zero exit status 1.\n{error}")
    assert "\n" not in str(e) and key in str(e)
    assert e.reason == sbatch_reason(error) and e.reason in error and "sbatch: error" not in e.reason
    assert launcher_key("something else entirely") == "the hydra.launcher keys in conf/hydra/launcher/stab_slurm.yaml"


# --- the real cluster ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_on_slurm_completes_is_reported_and_a_rerun_skips_it(cluster, tmp_path):
    args = [*SMOKE, "train.epochs=2", "residual=0.1,0.3"]
    t0 = time.monotonic()
    done = sweep(tmp_path, "two", *args)
    slurm_wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    runs = sorted(p.parent for p in (tmp_path / "two").glob("*/summary.json"))
    assert [r.name for r in runs] == [
        "preset=smoke,residual=0.1,train.epochs=2",
        "preset=smoke,residual=0.3,train.epochs=2",
    ]
    jobs = set()
    for run in runs:
        st, summary = status(run), read_json(run / "summary.json")
        assert st["state"] == "completed" and st["threads"] == 1  # its --cpus-per-task, not the node's 2 cores
        jobs.add(st["slurm_job"])
        steps, epochs = steps_and_epochs(run)
        assert steps == list(range(8)) and epochs == [1, 2]
        assert summary["loss_by_epoch"] == [e["loss"] for e in read_jsonl(run / "epochs.jsonl")]
    assert len(jobs) == 2 and all("_" in j for j in jobs)  # two elements of one job array
    index = read_json(tmp_path / "two" / "sweep.json")
    assert index["state"] == "completed" and sorted(j["state"] for j in index["jobs"]) == ["completed", "completed"]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "residual" in report
    # accounting is off here: said once, not at every poll
    assert done.stderr.count("sacct fails on this cluster") == 1, done.stderr
    assert "Bypassing sacct error" not in done.stdout + done.stderr

    before = {r.name: (r / "metrics.jsonl").stat().st_mtime_ns for r in runs}
    again = sweep(tmp_path, "two", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 already completed, skipped" in again.stdout
    assert {r.name: (r / "metrics.jsonl").stat().st_mtime_ns for r in runs} == before
    assert {status(r)["slurm_job"] for r in runs} == jobs

    t0 = time.monotonic()
    local = sweep(tmp_path, "local", *args, launcher=["--launcher", "submitit_local"])
    local_wall = time.monotonic() - t0
    assert local.returncode == 0, local.stdout + local.stderr
    slurm_over, local_over = (
        overhead_per_job(tmp_path / "two", slurm_wall),
        overhead_per_job(tmp_path / "local", local_wall),
    )
    print(
        f"\n2-job smoke sweep: submitit_slurm {slurm_wall:.1f} s, submitit_local {local_wall:.1f} s; "
        f"per-job overhead (sweep wall minus the job's own run): slurm {slurm_over:.1f} s, "
        f"local {local_over:.1f} s, slurm - local {slurm_over - local_over:+.1f} s"
    )


@pytest.mark.slow
def test_scancel_records_interrupted_and_a_rerun_resubmits_it(cluster, tmp_path):
    args = [*SMOKE, "train.epochs=12", "residual=0.2"]
    run = tmp_path / "cancel" / "preset=smoke,residual=0.2,train.epochs=12"
    proc = start(tmp_path, "cancel", *args)
    try:
        wait_for(lambda: (run / "epochs.jsonl").exists() and status(run).get("slurm_job"), "a trained epoch", proc)
        job = status(run)["slurm_job"]
        assert in_queue(job)
        subprocess.run(["scancel", job], check=True)
        out, err = proc.communicate(timeout=CEILING_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err  # a job that did not run to its end (README: exit status)
    st = status(run)
    assert st["state"] == "interrupted" and "cancelled on the cluster (scancel)" in st["error"], st
    _, epochs = steps_and_epochs(run)
    assert 1 <= len(epochs) < 12
    assert f"job interrupted: {run.name}: " in err and "scancel" in err
    assert [j["state"] for j in read_json(tmp_path / "cancel" / "sweep.json")["jobs"]] == ["interrupted"]

    again = sweep(tmp_path, "cancel", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    st2 = status(run)
    assert st2["state"] == "completed" and st2["slurm_job"] != job and st2["pid"] != st["pid"]
    steps, epochs = steps_and_epochs(run)  # one writer: each step and epoch once, in order
    assert steps == list(range(12 * 4)) and epochs == list(range(1, 13))


@pytest.mark.slow
def test_a_job_killed_at_its_time_limit_is_recorded_and_rerun(cluster, tmp_path):
    """SLURM's shortest limit is a minute: a job far longer than that is stopped at it (SIGTERM,
    checked every 30 s or so), recorded, and the same sweep again submits it anew."""
    args = [*SMOKE, "train.epochs=2000", "residual=0.2", "hydra.launcher.timeout_min=1"]
    run = tmp_path / "limit" / "preset=smoke,residual=0.2,train.epochs=2000"
    done = sweep(tmp_path, "limit", *args)
    assert done.returncode == 1, done.stdout + done.stderr
    st = status(run)
    assert st["state"] == "interrupted" and st["slurm_state"] == "TIMEOUT", st
    assert "SLURM time limit reached (hydra.launcher.timeout_min=1)" in st["error"]
    assert "hydra.launcher.timeout_min=1" in done.stderr
    _, epochs = steps_and_epochs(run)
    assert 1 <= len(epochs) < 2000
    assert 55 <= st["updated"] - st["started"] <= 180  # stopped at its limit, not before or long after

    proc = start(tmp_path, "limit", *args)  # resubmitted: a new SLURM job writes the folder anew
    try:
        wait_for(
            lambda: (
                status(run).get("state") == "running"
                and status(run).get("slurm_job") not in (None, st["slurm_job"])
                and (run / "epochs.jsonl").exists()
            ),
            "the resubmitted job's first epoch",
            proc,
        )
        subprocess.run(["scancel", status(run)["slurm_job"]], check=True)  # not another minute
        proc.communicate(timeout=CEILING_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(run)["state"] == "interrupted" and status(run)["pid"] != st["pid"]


@pytest.mark.slow
def test_tasks_per_node_2_is_one_two_process_gloo_run(cluster, tmp_path):
    done = sweep(tmp_path, "ddp", *SMOKE, "train.epochs=2", "residual=0.3", "hydra.launcher.tasks_per_node=2")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [p.parent for p in (tmp_path / "ddp").glob("*/status.json")]
    assert len(runs) == 1  # one job folder, written by rank 0 alone
    run = runs[0]
    st, summary = status(run), read_json(run / "summary.json")
    assert st["world_size"] == 2 and summary["world_size"] == 2 and st["threads"] == 1
    steps, epochs = steps_and_epochs(run)  # rank 1 wrote nothing: each step once
    assert steps == list(range(8)) and epochs == [1, 2]
    assert all(g > 0 for g in summary["grad_norm_by_epoch"])


@pytest.mark.slow
def test_an_sbatch_refusal_on_the_cluster_is_one_line_before_any_job(cluster, tmp_path):
    for setting, key in [
        ("hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_node"),
        ("hydra.launcher.partition=nosuch", "hydra.launcher.partition"),
        ("hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb"),
    ]:
        done = sweep(tmp_path, "refused", *SMOKE, "residual=0.1,0.3", setting)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sweep not started: sbatch refused the jobs: "), done.stderr
        assert key in lines[0], lines[0]
        assert not list((tmp_path / "refused").glob("*/status.json"))
        assert read_json(tmp_path / "refused" / "sweep.json")["state"] == "failed"


def test_squeue_stands_in_for_sacct(cluster):
    """The watcher's fallback reads what squeue says in sacct's format; a job the controller no
    longer holds is GONE (ended), so a sweep never waits on it forever."""
    out = subprocess.run(
        ["sbatch", "--parsable", "--wrap", "true", "--output", "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
        env=env(),
    )
    job = out.stdout.strip()
    text = squeue_states({job, "999999"})
    rows = {line.split("|")[0]: line.split("|")[1] for line in text.splitlines()[1:]}
    assert text.splitlines()[0] == "JobID|State|NodeList"
    assert rows["999999"] == "GONE"
    assert rows[job] in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED")
    json.dumps(rows)
