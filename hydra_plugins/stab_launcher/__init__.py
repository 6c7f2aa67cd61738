"""stab's SLURM launcher, where Hydra looks for launcher plugins (Hydra instantiates a launcher
only from a class in the `hydra_plugins` namespace package): hydra-submitit-launcher's
`SlurmLauncher` with `stability.slurm`'s watcher, one record per job whatever became of it, and a
refused submission raised as `SbatchRefused`. conf/hydra/launcher/stab_slurm.yaml names this class."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from stability.slurm import SLURM_ENDS, SbatchRefused, install_watcher

WRITER_WAIT_S = (
    90.0  # how long a job that ended without a result may still be writing (SLURM's KillWait, 30 s by default)
)


class _Held:
    drop = False


@contextlib.contextmanager
def _stderr_held() -> Iterator[_Held]:
    """File descriptor 2 (what child processes such as sbatch write to) goes to a temporary
    file; written out at the end unless `drop` was set."""
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.drop:
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace"))
                sys.stderr.flush()


class StabSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher: the same sbatch parameters (every
    `hydra.launcher.*` key) and the same job function, with `stability.slurm`'s watcher, one record per job
    whatever became of it, and a refused submission raised as `SbatchRefused`."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit one job array for `job_overrides`; one JobReturn per job, in order.

        Raises SbatchRefused when sbatch refuses the array (no job was started)."""
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        assert self.config is not None
        install_watcher()
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"slurm_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = [
            (
                list(o),
                "hydra.sweep.dir",
                initial_job_idx + i,
                f"job_id_for_{initial_job_idx + i}",
                Singleton.get_state(),
            )
            for i, o in enumerate(job_overrides)
        ]
        with _stderr_held() as held:  # sbatch's own stderr: in SbatchRefused's one line, not beside it
            try:
                jobs = executor.map_array(self, *zip(*job_params))
            except submitit.core.utils.FailedJobError as e:
                held.drop = True
                raise SbatchRefused(str(e)) from None
        out = []
        for overrides, j in zip(job_overrides, jobs):
            try:
                out.append(j.results()[0])
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
                out.append(self._left_no_result(sweep_dir, list(filter_overrides(overrides)), j, e))
        return out

    def _left_no_result(self, sweep_dir: Path, overrides: list[str], job: Any, error: Exception) -> JobReturn:
        """The record of a job that ended without a result: SLURM's reason, in its status.json
        too where its writer is gone and left it `running` (or `interrupted` without a reason)."""
        from stability.record import format as rf
        from stability.rundirs import folder_name, writer_gone
        from stability.storage import write_status
        from stability.sweeps import read_status

        state = str(job.watcher.get_state(job.job_id, mode="force")).split()[0].upper()
        stab_state, why = SLURM_ENDS.get(state, ("failed", f"SLURM state {state}; its log: {job.paths.stderr}"))
        why = why.format(timeout_min=self.params.get("timeout_min"), mem_gb=self.params.get("mem_gb"))
        if state not in SLURM_ENDS and isinstance(error, submitit.core.utils.FailedJobError):
            why = f"{why}: {' '.join(str(error).split())[-300:]}"
        run_dir = sweep_dir / folder_name(overrides)
        # SLURM says CANCELLED or TIMEOUT at once; the job's process may still be writing its
        # `interrupted` for up to KillWait seconds: wait for its lease (a ceiling, not a sleep)
        deadline = time.monotonic() + WRITER_WAIT_S
        while not writer_gone(run_dir, read_status(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        status = dict(read_status(run_dir))  # a Status record (a Mapping); updated below
        if status.get("state") in ("running", "interrupted") and writer_gone(run_dir, status):
            prior = status.get("error") if status.get("state") == "interrupted" else None
            write_status(
                run_dir / rf.STATUS,
                {
                    **status,
                    "state": stab_state,
                    "updated": time.time(),
                    "slurm_state": state,
                    "slurm_job_id": job.job_id,
                    "error": f"{prior}: {why}" if prior else why,
                },
            )
        return JobReturn(
            overrides=overrides,
            working_dir=str(run_dir),
            status=JobStatus.COMPLETED,
            _return_value={"folder": str(run_dir), "skipped": False, "error": why},
        )
