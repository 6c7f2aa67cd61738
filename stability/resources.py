"""Sharing one machine between a sweep's concurrent jobs: CPU threads and GPU slots.

No launcher does this: joblib and submitit start N processes that each grab every core (and
GPU 0). A job asks `plan(job_num, concurrency, n_cpus, n_gpus)` for its share.

    plan(job_num=3, concurrency=2, n_cpus=2, n_gpus=0)  # Resources(threads=1, device=None, slot=None)
    plan(job_num=3, concurrency=4, n_cpus=16, n_gpus=4) # Resources(threads=4, device='cuda:3', slot=3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """One job's share of the machine (`plan`): CPU threads, its device and GPU slot."""

    threads: int
    device: str | None  # None: leave the configured device alone
    slot: int | None  # GPU index this job was given, if any


def plan(job_num: int, concurrency: int, n_cpus: int, n_gpus: int) -> Resources:
    """Threads = cores / concurrent jobs (at least 1); GPUs round-robin by job number when
    several jobs run at once on a machine with more than one GPU."""
    concurrency = max(1, concurrency)
    threads = max(1, n_cpus // concurrency)
    if n_gpus > 1 and concurrency > 1:
        slot = job_num % n_gpus
        return Resources(threads, f"cuda:{slot}", slot)
    return Resources(threads, None, None)


def available_cpus() -> int:
    """The cores this process may use: its CPU affinity, and in a SLURM job at most its
    `--cpus-per-task` (a cluster without task affinity, e.g. `TaskPlugin=task/none`, pins nothing)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(n, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else n
