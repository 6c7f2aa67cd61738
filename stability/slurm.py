"""SLURM through hydra-submitit-launcher, made to work on any cluster, accounting or not.

`conf/hydra/launcher/stab_slurm.yaml` points Hydra at `StabSlurmLauncher`, the plugin's own
`SlurmLauncher` with three changes:

- **Job states without accounting.** submitit learns a job's state from `sacct`, which fails
  on a cluster without accounting storage (a small or test cluster: no slurmdbd). It then warns
  on every poll and, worse, never learns that a job ended without writing its result (cancelled,
  killed at its time limit, out of memory): the sweep would wait forever. Here the first failing
  `sacct` is said in one line and the states come from `squeue --states=all` from then on.
- **One job's end is not the sweep's.** A job that left no result (its process was killed, or
  stopped by a signal) becomes that job's record, with SLURM's reason (`TIMEOUT` names
  `hydra.launcher.timeout_min`), instead of an exception that would drop every other job's
  return. Its `status.json`, if its writer is gone and left it `running`, says `interrupted`.
- **A refused submission is one line** naming the launcher key to change (`SbatchRefused`).

It is imported where Hydra instantiates the launcher (the sweep's process) and where submitit
unpickles it (each job, on its node); it imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

# sbatch's refusal (a line of its stderr) -> the hydra.launcher keys that decide it
SBATCH_KEYS: tuple[tuple[str, str], ...] = (
    (r"partition", "hydra.launcher.partition (sinfo lists them)"),
    (r"time limit", "hydra.launcher.timeout_min"),
    (r"account", "hydra.launcher.account"),
    (r"qos", "hydra.launcher.qos"),
    (
        r"generic resource|\bgres\b|\bgpus?\b",
        "hydra.launcher.gpus_per_node (null asks for none) or hydra.launcher.gres",
    ),
    (r"memory|\bmem\b", "hydra.launcher.mem_gb"),
    (r"node count", "hydra.launcher.nodes"),
    (
        r"more processors|cpu|node configuration|tasks",
        "hydra.launcher.cpus_per_task, tasks_per_node or mem_gb (sinfo -o '%n %c %m %G' shows what a node has)",
    ),
)

# SLURM's final job states -> (stab state, why) for a job that left no result
SLURM_ENDS: dict[str, tuple[str, str]] = {
    "TIMEOUT": ("interrupted", "SLURM time limit reached (hydra.launcher.timeout_min={timeout_min})"),
    "CANCELLED": ("interrupted", "cancelled on the cluster (scancel)"),
    "PREEMPTED": ("interrupted", "preempted on the cluster"),
    "NODE_FAIL": ("interrupted", "its node failed"),
    "BOOT_FAIL": ("interrupted", "its node failed to boot"),
    "DEADLINE": ("interrupted", "SLURM deadline reached"),
    "OUT_OF_MEMORY": ("failed", "out of memory on the cluster (hydra.launcher.mem_gb={mem_gb})"),
}


WRITER_WAIT_S = (
    90.0  # how long a job that ended without a result may still be writing (SLURM's KillWait, 30 s by default)
)


class SbatchRefused(Exception):
    """sbatch refused the sweep's jobs: one line with sbatch's reason and the launcher key to
    change (e.g. `Invalid generic resource (gres) specification` -> hydra.launcher.gpus_per_node)."""

    def __init__(self, error: str) -> None:
        self.reason = sbatch_reason(error)
        super().__init__(f"sbatch refused the jobs: {self.reason}; change {launcher_key(self.reason)}")


def sbatch_reason(error: str) -> str:
    """The first `sbatch: error:` line of submitit's error text, without the prefix; else its
    first non-empty line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        m = re.search(r"sbatch: error:\s*(.*)", line)
        if m and m.group(1) and "Batch job submission failed" not in m.group(1):
            return m.group(1)
    for line in lines:
        m = re.search(r"Batch job submission failed:\s*(.*)", line)
        if m:
            return m.group(1)
    return lines[0] if lines else "no reason given"


def launcher_key(reason: str) -> str:
    """The hydra.launcher key(s) that decide an sbatch refusal `reason`."""
    low = reason.lower()
    for pattern, key in SBATCH_KEYS:
        if re.search(pattern, low):
            return key
    return "the hydra.launcher keys in conf/hydra/launcher/stab_slurm.yaml"


def squeue_states(job_ids: set[str]) -> str:
    """`sacct -o JobID,State,NodeList --parsable2`'s output for `job_ids` (array ids `5_0` or
    plain `5`), from `squeue --states=all`, which sees every job the controller still holds
    (MinJobAge after its end). A job it no longer holds is `GONE` (ended, long enough ago)."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N"], capture_output=True, text=True, timeout=60
    )
    if out.returncode:
        raise subprocess.CalledProcessError(out.returncode, "squeue", out.stdout, out.stderr)
    rows = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    mains = {j.split("_")[0] for j in job_ids}
    rows = [r for r in rows if r.split("|")[0].split("_")[0] in mains]
    seen = {r.split("|")[0] for r in rows} | {r.split("|")[0].split("_")[0] for r in rows}
    gone = [
        f"{j}|GONE|"
        for j in sorted(job_ids)
        if j not in seen and not any(r.split("|")[0].startswith(f"{j.split('_')[0]}_[") for r in rows)
    ]
    return "\n".join(["JobID|State|NodeList", *rows, *gone]) + "\n"


def _watcher_class() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueFallbackWatcher(SlurmInfoWatcher):
        """submitit's sacct watcher that falls back to squeue, for good, at the first failing
        sacct, saying so once on stderr instead of warning at every poll."""

        sacct_failed: str | None = None

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            to_check = set(self._registered - self._finished)
            output = None
            if self.sacct_failed is None:
                try:
                    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
                except (subprocess.SubprocessError, OSError) as e:
                    err = getattr(e, "stderr", None) or getattr(e, "output", None) or str(e)
                    self.sacct_failed = " ".join(str(err).split()) or type(e).__name__
                    print(
                        f"sacct fails on this cluster ({self.sacct_failed}): stab reads the jobs' states "
                        "from squeue instead",
                        file=sys.stderr,
                        flush=True,
                    )
            if output is None:
                try:
                    output = squeue_states(to_check)
                except (subprocess.SubprocessError, OSError):
                    output = None  # the controller is unreachable for now: poll again later
            if output is not None:
                self._info_dict.update(self.read_info(output))
            self._last_status_check = time.time()
            for job_id in to_check:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return SqueueFallbackWatcher


def install_watcher(delay_s: float = 15.0) -> None:
    """Make submitit's SLURM jobs poll through `SqueueFallbackWatcher`, at least every `delay_s`
    seconds (submitit's own waits up to 600 s between polls, to spare slurmdbd, so a job that
    ended without a result, e.g. cancelled, would be noticed up to 10 minutes late; one squeue
    call covers every job of the sweep)."""
    from submitit.slurm.slurm import SlurmJob

    if type(SlurmJob.watcher).__name__ != "SqueueFallbackWatcher":
        SlurmJob.watcher = _watcher_class()(delay_s=delay_s)


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
    `hydra.launcher.*` key) and the same job function, with the watcher above, one record per job
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


def job_id() -> str | None:
    """This process's SLURM job as `scancel` and `squeue` name it (`5_0` for an array's element,
    `5` otherwise); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


@contextlib.contextmanager
def time_limit_warning_noted() -> Iterator[None]:
    """In a SLURM job, SLURM's warning before the time limit (SIGUSR2, `signal_delay_s` before
    it, at once when the limit is shorter) is noted on stderr and the run goes on: submitit's own
    handler would raise in the middle of a step to requeue a job stab cannot resume. At the limit
    SLURM sends SIGTERM, which the run records as `interrupted`; the sweep adds SLURM's reason."""
    if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: Any) -> None:
        print("SLURM's time-limit warning (SIGUSR2): the run goes on until the limit", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGUSR2, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, old)
