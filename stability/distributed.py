"""One run across processes: the process group, DDP, each rank's shard of a batch, and launching.

A stab run is data-parallel when its process is one of several started together. Three ways:

    stab run --nproc 2 preset=smoke            # stab starts 2 processes through torch.distributed.run
    torchrun --nproc-per-node 4 -m cli.main run preset=gpu model=charlm     # or torchrun itself
    srun --ntasks-per-node 4 stab run ...      # or SLURM (stab sweep --launcher submitit_slurm)

Each process finds its place from the environment (`World.from_env`: torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; else SLURM's or submitit's task variables, exported
to those names by submitit's `TorchDistributedEnvironment`), joins the group (`init`: gloo on
CPU, NCCL on CUDA, each rank on GPU LOCAL_RANK), wraps the model in DDP (`wrap`) and trains on
its `shard` of every global batch. `train.batch_size` stays the global batch, so a step sees the
same examples at any world size; DDP averages the ranks' gradients, which equals the gradient of
the global batch's mean loss when the shards are equal-sized (hence `check_batch`).

Batch statistics inside the model (the cascade's RMS match is one) are taken over the global
batch as well: `global_mean` all-reduces them, with gradients, inside `synced_batch_stats()`,
as SyncBatchNorm does for BatchNorm.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others before it fails (instead of hanging when
# a peer died). Generous: rank 0 runs the per-epoch checks while the others wait at the next step.
TIMEOUT_S = int(os.environ.get("STAB_DIST_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: rank in [0, size), local_rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: a data-parallel run."""
        return self.size > 1

    @classmethod
    def from_env(cls, environ: Any = None) -> World:
        """The world this process was started in: torchrun's variables (RANK, WORLD_SIZE,
        LOCAL_RANK, LOCAL_WORLD_SIZE), else a SLURM step or submitit job with several tasks
        (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID / submitit's local executor), whose
        variables submitit's `TorchDistributedEnvironment` exports under torchrun's names, with
        MASTER_ADDR the job's first host. World size 1 otherwise. Raises ValueError for
        inconsistent values."""
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env and environ is None and _task_count() > 1:
            from submitit.helpers import TorchDistributedEnvironment

            # GPUs are picked by LOCAL_RANK in `device`; leave CUDA_VISIBLE_DEVICES as the job set it.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
            local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
        except ValueError as e:
            raise ValueError(
                f"distributed environment: {e}; expected integers in RANK, WORLD_SIZE, LOCAL_RANK"
            ) from None
        if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
            raise ValueError(
                f"distributed environment: RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local_rank} "
                f"is not a place in a world (expected 0 <= RANK < WORLD_SIZE)"
            )
        return cls(rank, size, local_rank, local_size)


def _task_count() -> int:
    """Tasks of this SLURM step (srun) or submitit job; 1 when there is neither. An sbatch
    script's own shell is not a task of a step: only srun sets SLURM_STEP_NUM_TASKS."""
    for key in ("SLURM_STEP_NUM_TASKS", "SUBMITIT_LOCAL_NTASKS"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                return 1
    return 1


def backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(world: World, dev: torch.device) -> None:
    """Join the process group of `world` (env:// rendezvous: MASTER_ADDR, MASTER_PORT); no-op
    at world size 1 or when already joined. Collectives then fail after TIMEOUT_S (set
    STAB_DIST_TIMEOUT_S) rather than hang on a dead peer."""
    if not world.distributed or dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(
        backend(dev), rank=world.rank, world_size=world.size, timeout=datetime.timedelta(seconds=TIMEOUT_S), **kwargs
    )


def close() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def threads(world: World, cpus: int) -> int:
    """CPU threads for this rank out of the `cpus` this process may use: srun pins each task to
    its own cores (`cpus_per_task`), so all of them; ranks started on one machine by torchrun or
    submitit's local executor share them, so an equal part each."""
    if "SLURM_STEP_NUM_TASKS" in os.environ:
        return max(1, cpus)
    return max(1, cpus // world.local_size)


def check_batch(batch_size: int, world_size: int) -> None:
    """Raises ValueError unless the global batch splits into equal shards."""
    if world_size > 1 and batch_size % world_size:
        raise ValueError(
            f"train.batch_size={batch_size} is not allowed with {world_size} processes: the global "
            f"batch is split evenly between them, so expected a multiple of {world_size}"
        )


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's examples of a global batch (B,) -> (B / size,): every size-th one from
    `rank`, the order `torch.utils.data.DistributedSampler` deals a sequence to its ranks."""
    return indices[world.rank :: world.size] if world.distributed else indices


def wrap(model: torch.nn.Module, world: World, dev: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (gradients averaged over ranks in backward); the model
    itself at world size 1. Probes and hooks stay on the inner module (`unwrap`)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def sum_(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) `t` in place over the ranks; stays on the device (no host sync)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value, e.g. the run folder's path)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_SYNC = [False]


@contextlib.contextmanager
def synced_batch_stats() -> Iterator[None]:
    """Inside: `global_mean` averages over the ranks (the training forward of a distributed
    step). Outside (validation, health, forensics on one rank): it is a plain mean."""
    _SYNC[0] = dist.is_initialized() and dist.get_world_size() > 1
    try:
        yield
    finally:
        _SYNC[0] = False


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """x.mean() over this rank's shard, or, inside `synced_batch_stats`, over the global batch:
    the all-reduce carries gradients to every rank (functional collectives), so DDP's averaged
    gradient is that of the world-size-1 computation. Equal-sized shards assumed (check_batch)."""
    m = x.mean()
    if not _SYNC[0]:
        return m
    from torch.distributed._functional_collectives import all_reduce  # differentiable: its backward all-reduces

    world = dist.group.WORLD
    assert world is not None  # _SYNC is set only inside an initialised process group
    return all_reduce(m, "sum", world) / dist.get_world_size()


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `python -m cli.main ARGS` in `nproc` processes on this machine through
    `torch.distributed.run` (elastic launch, standalone rendezvous on a free port, no restarts):
    when one process fails the agent stops the others. Returns 0, or the failed rank's exit code
    (the lowest rank's when several failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "cli.main", *args])
    except SignalException as e:  # Ctrl-C or SIGTERM to the launcher: the agent stopped every rank
        raise KeyboardInterrupt(signal.Signals(e.sigval).name) from None
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        return next((f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0), 1)
    return 0
