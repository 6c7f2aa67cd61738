"""One run across processes: 2 gloo processes on CPU against the same run in one process.

The distributed runs go through the real entry points (`stab run --nproc 2`, which starts its
processes with torch.distributed.run, and a submitit_local sweep job with 2 tasks), in a child
process with a generous timeout as a ceiling only. CUDA (NCCL, a GPU per LOCAL_RANK) is the
same code path with another backend and is not exercised here: no test needs a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from stability.record import format as rf
from stability.replay import replay
from tests.conftest import SMOKE, only_run, read_json, read_jsonl

# Pre-norm at a small learning rate: a trajectory that float32 rounding does not throw off within
# the run, so the tables of the two summation orders (one process vs two) agree to ~1e-6.
STEADY = [
    *SMOKE,
    "norm=pre",
    "train.lr=1e-3",
    "train.epochs=3",
    "train.on_nan=skip",
    "fault.nan_at_step=6",
    "fault.nan_module=stage1.layer0.attn",
]


def stab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "STAB_WIDTH": "200"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout
    )  # a ceiling, not a wait


@pytest.mark.slow
def test_two_processes_measure_what_one_does_and_find_the_nan_at_its_step(tmp_path, cli, one_thread):
    """Same seed and global batch at world size 1 and 2 (the second with train.sync_every=4):
    the same per-epoch grad-norm table within float32 tolerance, the same verdict, the injected
    NaN at step 6 in the same module, and a replay from the 2-process run's saved state."""
    cli("run", "--runs", tmp_path / "one", *STEADY)
    two = stab("run", "--nproc", "2", "--runs", str(tmp_path / "two"), *STEADY, "train.sync_every=4")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "(2 processes, gloo)" in " ".join(two.stdout.split())  # Rich may wrap the header where the path ends
    one_dir, two_dir = only_run(tmp_path / "one"), only_run(tmp_path / "two")  # rank 0 alone wrote a folder
    s1, s2 = read_json(one_dir / "summary.json"), read_json(two_dir / "summary.json")
    assert (s1["world_size"], s2["world_size"], s2["sync_every"]) == (1, 2, 4)
    assert s1["verdict"] == s2["verdict"] == "nan"
    for s in (s1, s2):
        assert (s["first_nan"]["step"], s["first_nan"]["module"]) == (6, "stage1.layer0.attn")
        assert s["nonfinite_steps"] == 1 and s["steps"] == 12
    t1, t2 = (
        rf.read_grad_table(d / rf.GRAD_TABLE).sort_values(["epoch", "group"]).reset_index(drop=True)
        for d in (one_dir, two_dir)
    )
    assert t1[["epoch", "group"]].equals(t2[["epoch", "group"]]) and sorted(set(t1["epoch"])) == [1, 2, 3]
    nan_epoch = t1["epoch"] == 2  # the NaN step's epoch: its means are NaN in both
    assert t1.loc[nan_epoch, "mean"].isna().all() and t2.loc[nan_epoch, "mean"].isna().all()
    for col in ("mean", "max"):
        np.testing.assert_allclose(t2.loc[~nan_epoch, col], t1.loc[~nan_epoch, col], rtol=2e-5)
    # per step: the all-reduced loss is the global batch's mean loss
    l1 = [r["loss"] for r in read_jsonl(one_dir / "metrics.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(two_dir / "metrics.jsonl")]
    np.testing.assert_allclose(l2, l1, rtol=2e-5)
    r = replay(two_dir)  # the saved state is the unwrapped model's, the batch the global one
    assert (r.step, r.group) == (6, "stage1.layer0.attn")


def test_a_global_batch_that_does_not_split_evenly_is_refused_before_any_work(tmp_path, cli):
    result = cli("run", "--nproc", "2", "--runs", tmp_path, *SMOKE, "train.batch_size=5", ok=False)
    assert result.exit_code == 2
    assert "train.batch_size=5 is not allowed with 2 processes" in result.output
    assert "multiple of 2" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sweep_job_with_two_tasks_is_one_distributed_run(tmp_path):
    """--launcher submitit_local with hydra.launcher.tasks_per_node=2: SLURM's code path on
    this machine. Each task joins the job's group from submitit's environment; one folder."""
    result = stab(
        "sweep",
        "--runs",
        str(tmp_path),
        "--launcher",
        "submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *SMOKE,
        "train.epochs=2",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = only_run(tmp_path)
    s = read_json(run / "summary.json")
    assert s["world_size"] == 2 and s["verdict"] != "failed"
    assert read_json(run / "status.json")["state"] == "completed"
    assert all(np.isfinite(s["grad_norm_by_epoch"]))


@pytest.mark.slow
def test_a_crash_in_a_two_process_run_ends_both_and_is_recorded(tmp_path):
    """fault.crash_at_step raises in every rank; the elastic agent ends the run (no rank waits
    in a collective for a dead peer), the exit status says crashed and rank 0's folder says why."""
    result = stab("run", "--nproc", "2", "--runs", str(tmp_path), *SMOKE, "fault.crash_at_step=2")
    assert result.returncode != 0
    status = read_json(next(tmp_path.rglob("status.json")))
    assert status["state"] == "failed" and "fault.crash_at_step=2" in status["error"]
    assert "exited with status" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_one_device_resolver_refuses_cuda_without_it_for_a_single_process_and_for_a_rank():
    """stab's loop, preflight, bench, replay and each rank of a data-parallel run resolve
    train.device through one function: a rank asking for cuda on a CPU machine is refused with the
    same one-line error as a single process (a rank's own resolver used to hand back
    torch.device('cuda') and fail later, inside the process group)."""
    import torch

    from stability.devices import resolve_device
    from stability.distributed import World

    rank = World(rank=1, size=2, local_rank=1, local_size=2)
    for world in (None, rank):
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=rf"train.device='{name}': CUDA is not available on this machine"):
                resolve_device(name, world)
        assert resolve_device("auto", world) == torch.device("cpu")
        assert resolve_device("cpu", world) == torch.device("cpu")
