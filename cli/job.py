"""The task function Hydra's launchers call once per job of a sweep.

It runs in whatever process the launcher chose (the sweep's own, a joblib worker, a submitit
subprocess or a SLURM node), so it reads everything from the job's Hydra config and the
environment, never from the parent's memory. It never raises: a crash is recorded in the job
folder and returned, so one bad job cannot stop the others.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cli.config import to_run_config
from stability import resources
from stability.storage import write_json
from stability.sweeps import read_status, should_skip

CONCURRENCY_ENV = "STAB_CONCURRENCY"  # set by `stab sweep`: how many jobs run at once here
DUPLICATES_ENV = "STAB_DUPLICATES"  # set by `stab sweep`: {job number: earlier job of the same identity}


def job(cfg: DictConfig) -> dict[str, Any]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    same = json.loads(os.environ.get(DUPLICATES_ENV) or "{}").get(str(hc.job.num))
    if same is not None:  # trained by job `same`; drop the folder Hydra made for this one
        shutil.rmtree(run_dir, ignore_errors=True)
        return {"folder": None, "duplicate_of": same, "skipped": True}
    try:
        run_cfg = to_run_config(cfg)
        if should_skip(run_dir, run_cfg.identity()):
            return {"folder": str(run_dir), "skipped": True}
        import torch

        from stability import training

        concurrency = int(os.environ.get(CONCURRENCY_ENV, "1"))
        n_gpus = torch.cuda.device_count() if run_cfg.train.device == "auto" else 0
        plan = resources.plan(hc.job.num, concurrency, resources.available_cpus(), n_gpus)
        if run_cfg.train.threads is None:
            run_cfg.train.threads = plan.threads
        if plan.device:
            run_cfg.train.device = plan.device
        training.run(run_cfg, run_dir, overrides, extra_status={
            "job_num": hc.job.num, "concurrency": concurrency, "gpu_slot": plan.slot})
        return {"folder": str(run_dir), "skipped": False}
    except BaseException as e:  # recorded in status.json by training.run (or here, if it never started)
        if isinstance(e, KeyboardInterrupt):
            raise
        if read_status(run_dir).get("state") != "failed":  # it failed before training.run began
            write_json(run_dir / "status.json", {"state": "failed", "error": f"{type(e).__name__}: {e}"})
        return {"folder": str(run_dir), "skipped": False, "error": f"{type(e).__name__}: {e}"}


def warm() -> int:
    """What every job imports, done by a joblib worker before the first job reaches it: torch,
    the training loop, and torch._dynamo, which the first torch.optim optimizer of a process
    imports (about 1.4 s of a smoke job's 2 s). Returns the worker's pid."""
    import torch._dynamo  # noqa: F401

    from stability import training  # noqa: F401

    return os.getpid()
