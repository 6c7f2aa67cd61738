"""A sweep's jobs through Hydra: `HydraLauncher` (how `stability.sweep_engine` composes and
launches them) and `job`, the task function Hydra's launchers call once per job.

It runs in whatever process the launcher chose (the sweep's own, a joblib worker, a submitit
subprocess or a SLURM node), so it reads everything from the job's Hydra config and the
environment, never from the parent's memory. It never raises: a crash is recorded in the job
folder and returned, so one bad job cannot stop the others.

A job of a local sweep stops when its sweep does: SIGINT/SIGTERM end it cleanly (status
`interrupted`), and a job whose sweep process is gone (killed, even with SIGKILL; a submitit job
is re-parented and would train on) interrupts itself within a second. A job whose folder another
live process is writing is not started a second time: it returns `busy`.

A job with several tasks (`hydra.launcher.tasks_per_node=N` with a submitit launcher: srun, or
submitit's local executor, starts N processes, each calling this function) is one distributed
run: each task joins the job's process group from its environment, rank 0 decides whether the
job runs (skip, duplicate) and tells the others, and writes the job folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cli import launch
from cli.common import check_writable, graceful_signals
from cli.config import compose_run, to_run_config
from stability import resources, slurm
from stability.errors import StorageError, storage_error
from stability.preflight import preflight
from stability.record import format as rf
from stability.rundirs import OWNER_ENV, LeaseBusy, owner_alive, writer_gone
from stability.storage import write_status
from stability.sweep_engine import CONCURRENCY_ENV, Sweep
from stability.sweeps import read_duplicates, read_status, should_skip


class HydraLauncher:
    """`stability.sweep_engine.Launcher` through Hydra: each job's config composed from conf/
    and its overrides (`cli.config.compose_run`) and preflighted; the jobs run by Hydra's launcher
    `name` (basic, joblib, submitit_local, submitit_slurm, ray), which calls `job` in whatever
    process it chose.

    `hydra_args`: the user's hydra.* overrides; `grid`: comma lists that Hydra's sweeper expands
    into the jobs (`stab sweep`), or None to run the sweep's combos exactly as given (`stab margin`'s
    probes, `stab doctor --try`'s fixes); `dirs`: the `--config-dir` folders searched after conf/."""

    def __init__(
        self,
        name: str,
        hydra_args: list[str] | None = None,
        grid: list[str] | None = None,
        dirs: Sequence[Path] = (),
    ) -> None:
        self.name, self.hydra_args, self.grid, self.dirs = name, list(hydra_args or []), grid, tuple(dirs)
        self.workers: launch.WarmWorkers | None = None

    def prepare(self, concurrency: int) -> None:
        """Start joblib's workers: they import torch while this process checks the configs."""
        self.workers = launch.WarmWorkers.start(self.name, concurrency, self.hydra_args, warm)

    def check(self, sweep: Sweep) -> list[str]:
        """Every job's run identity, its config composed and preflighted; then that --runs is a
        writable folder. Raises UserError / ConfigError / DataError naming the bad value."""
        identities = []
        for combo in sweep.combos:
            cfg = compose_run(combo, self.dirs)
            preflight(cfg)
            identities.append(cfg.identity())
        check_writable(sweep.runs)
        return identities

    def run(self, sweep_dir: Path, combos: list[list[str]], concurrency: int) -> list[Any]:
        """Hydra's multirun of `job` over the jobs; SIGINT/SIGTERM raise KeyboardInterrupt here."""
        overrides = (self.grid or []) + launch.hydra_overrides(sweep_dir, self.name, concurrency) + self.hydra_args
        with graceful_signals():
            if self.workers:
                self.workers.wait()
            return launch.multirun(overrides, job, jobs=combos if self.grid is None else None, dirs=self.dirs)

    def cancel(self) -> None:
        """Stop the warm workers: nothing will run."""
        if self.workers:
            self.workers.cancel()


def job(cfg: DictConfig) -> dict[str, Any]:
    """Run one job of a sweep (called by Hydra's launcher with the job's composed config):
    skipped when completed before, folded into an earlier job of the same identity, else trained
    into its folder. Never raises but KeyboardInterrupt; returns {folder, skipped, error | busy |
    duplicate_of}."""
    hc = HydraConfig.get()
    # The sweep folder and the job's subfolder, not hc.runtime.output_dir: Hydra stores that as
    # text in the config, where a `${` of the user's path (data, quoted by cli.launch) would be
    # read back as an interpolation and the job written elsewhere
    run_dir = Path(os.path.abspath(os.path.join(hc.sweep.dir, hc.sweep.subdir)))
    overrides = list(hc.overrides.task)
    world = _join(cfg)
    try:
        return _job(cfg, hc, run_dir, overrides, world)
    finally:
        if world.distributed:
            from stability import distributed

            distributed.close()


def distributed_threads(world: Any, cpus: int) -> int:
    """This task's share of the job's `cpus` cores (`stability.distributed.threads`)."""
    from stability import distributed

    return distributed.threads(world, cpus)


def _join(cfg: DictConfig) -> Any:
    """This task's `stability.distributed.World`; with several tasks, the job's group joined."""
    from stability import distributed
    from stability.devices import resolve_device

    world = distributed.World.from_env()
    if world.distributed:
        distributed.init(world, resolve_device(str(cfg.train.device), world))
    return world


def _job(cfg: DictConfig, hc: Any, run_dir: Path, overrides: list[str], world: Any) -> dict[str, Any]:
    same = read_duplicates(Path(hc.sweep.dir)).get(str(hc.job.num))
    if same is not None:  # trained by job `same`; drop the folder Hydra made for this one
        if world.main:
            shutil.rmtree(run_dir, ignore_errors=True)
        return {"folder": None, "duplicate_of": same, "skipped": True}
    owner = os.environ.get(OWNER_ENV)
    try:
        run_cfg = to_run_config(cfg)
        decision = None
        if world.main:
            if should_skip(run_dir, run_cfg.identity()):
                decision = {"folder": str(run_dir), "skipped": True}
            elif owner and not owner_alive(owner):  # the sweep was stopped before this job began
                decision = {
                    "folder": str(run_dir),
                    "skipped": False,
                    "error": "interrupted (the sweep stopped before it began)",
                }
        if world.distributed:  # rank 0 read the folder; the others do as it says
            from stability import distributed

            decision = distributed.broadcast(decision, world)
        if decision is not None:
            return decision
        import torch

        from stability import training

        concurrency = int(os.environ.get(CONCURRENCY_ENV, "1"))
        n_gpus = torch.cuda.device_count() if run_cfg.train.device == "auto" and not world.distributed else 0
        plan = resources.plan(hc.job.num, concurrency, resources.available_cpus(), n_gpus)
        run_cfg = run_cfg.resolve(  # the job's share of the cores (split between its tasks) and its GPU
            threads=distributed_threads(world, plan.threads) if run_cfg.train.threads is None else None,
            device=plan.device or None,
        )
        with graceful_signals(), _stop_when_gone(owner), slurm.time_limit_warning_noted():
            training.run(
                run_cfg,
                run_dir,
                overrides,
                extra_status={
                    "job_num": hc.job.num,
                    "concurrency": concurrency,
                    "gpu_slot": plan.slot,
                    "owner": owner,
                    "world_size": world.size,
                    "slurm_job": slurm.job_id(),
                },
                world=world if world.distributed else None,
            )
        return {"folder": str(run_dir), "skipped": False}
    except LeaseBusy as e:  # another live process writes this folder: leave it to that one
        return {"folder": str(run_dir), "skipped": False, "busy": str(e)}
    except BaseException as e:  # recorded in status.json by training.run (or here, if it never started)
        if isinstance(e, KeyboardInterrupt):
            raise
        error = str(storage_error(e) or f"{type(e).__name__}: {e}")
        if world.main and read_status(run_dir).get("state") != "failed" and writer_gone(run_dir, read_status(run_dir)):
            try:  # it failed before training.run began
                write_status(run_dir / rf.STATUS, {"state": "failed", "error": error})
            except StorageError:
                pass
        return {"folder": str(run_dir), "skipped": False, "error": error}


@contextlib.contextmanager
def _stop_when_gone(owner: str | None) -> Iterator[None]:
    """Interrupt this job (as SIGTERM would) once the sweep process `owner` is gone."""
    if (
        not owner
        or owner.split(":")[0] == str(os.getpid())
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            if not owner_alive(owner):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, daemon=True, name="stab-owner-watch")
    thread.start()
    try:
        yield
    finally:
        done.set()


def warm() -> int:
    """What every job imports, done by a joblib worker before the first job reaches it: torch,
    the training loop, and torch._dynamo, which the first torch.optim optimizer of a process
    imports (about 1.4 s of a smoke job's 2 s). Returns the worker's pid."""
    import torch._dynamo  # noqa: F401

    from stability import training  # noqa: F401

    return os.getpid()
