"""What stab knows about SLURM, for its launcher (`hydra_plugins.stab_launcher.StabSlurmLauncher`,
hydra-submitit-launcher's `SlurmLauncher` made to work on any cluster, accounting or not) and for
the jobs it runs. This module imports neither Hydra nor torch; the launcher has three changes:

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
import threading
import time
from collections.abc import Iterator
from typing import Any

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
