"""Sweep bookkeeping that Hydra does not do: job status, resume decisions, the sweep index, the
jobs that are one configuration, and each job's progress as its folder says.

Every job folder holds `status.json` (written by the run itself) and the run's lease (see
`stability.rundirs`). A sweep holds an exclusive lock on its folder while it runs. A job found
`running` when a sweep starts is `interrupted` only if its writer is provably gone (its lease is
free: the process died, SIGKILL, power loss); one whose writer still lives is left alone and not
started a second time. A `completed` job whose record is incomplete or unreadable is run again.

    with SweepLock(sweep_dir):
        mark_stale_running(sweep_dir)
        ...
        write_index(sweep_dir, jobs)
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, TypedDict

from stability.record import format as rf
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
from stability.record.records import Status
from stability.rundirs import holder
from stability.storage import write_json, write_status

# Written into the sweep folder before the launch: {job number: the earlier job of the same run
# identity}. A file, not the environment: joblib's workers start before the sweep has composed its
# jobs, so they would not inherit it.
DUPLICATES_FILE = ".duplicates.json"


class SweepBusy(RuntimeError):
    """Another `stab sweep` process holds this sweep's folder."""


class SweepLock:
    """An exclusive lock on a sweep folder for one `stab sweep` process (`with SweepLock(dir):`);
    SweepBusy if another process holds it."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir) / ".sweep.lock"
        self.fd: int | None = None

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            holder = self.path.read_text().strip() or "another process"
            raise SweepBusy(
                f"sweep folder {self.path.parent} is in use by {holder}; wait for it or use another --name"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def read_status(run_dir: Path) -> Status:
    """status.json of a run folder (`RunFolder.status`); state `pending` where there is none yet,
    `corrupt` (with the reason under `error`) where it cannot be read."""
    folder = RunFolder(run_dir)
    if not folder.has(rf.STATUS):
        return Status(state="pending")
    status = folder.status()
    if folder.warnings or not status:
        return Status(state="corrupt", error=folder.warnings[0] if folder.warnings else f"{rf.STATUS} is not a mapping")
    return status


def mark_stale_running(sweep_dir: Path, why: str = "found by the next sweep") -> list[Path]:
    """Jobs `running` whose writer is provably gone: mark them interrupted. Jobs whose writer
    still lives (another process, a job of a sweep that is stopping) are left as they are."""
    stale = []
    for status_path in sorted(Path(sweep_dir).glob(f"*/{rf.STATUS}")):
        status = read_status(status_path.parent)
        if status.state == "running" and RunFolder(status_path.parent).state(status) == "interrupted":
            write_status(
                status_path,
                {
                    **status,
                    "state": "interrupted",
                    "finished": None,
                    "updated": time.time(),
                    "error": f"process {status.pid} stopped while running ({why})",
                },
            )
            stale.append(status_path.parent)
    return stale


def live_writers(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """Job folders held by a live writer now, with what their lease says about it."""
    out = {}
    for lease in sorted(Path(sweep_dir).glob("*/.lease")):
        h = holder(lease.parent)
        if h.live:
            out[lease.parent] = h.info
    return out


def incomplete(run_dir: Path) -> str | None:
    """Why a `completed` run's record cannot be trusted (None if it can): `RunFolder.incomplete`."""
    return RunFolder(run_dir).incomplete()


def should_skip(run_dir: Path, run_id: str) -> bool:
    """A completed run of the same configuration identity, with a whole record, is not run again."""
    status = read_status(run_dir)
    return status.state == "completed" and status.run_id == run_id and incomplete(run_dir) is None


def job_record(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One line of the sweep index: where, what, and how it ended."""
    folder = RunFolder(run_dir)
    status = read_status(run_dir)
    rec: dict[str, Any] = {
        "folder": folder.path.name,
        "overrides": overrides,
        "state": status.get("state"),
        "run_id": status.get("run_id"),
        "error": status.get("error"),
    }
    if folder.has(rf.SUMMARY):
        s = folder.summary()
        if folder.warnings:
            rec.update(verdict="?", error=(rec["error"] or "") + f" {rf.SUMMARY} unreadable")
        else:
            rec.update(
                verdict=s.get("verdict"),
                first_nan=s.get("first_nan"),
                final_loss=s.get("final_loss"),
                scream_epoch=s.get("scream_epoch"),
            )
    return rec


def write_index(sweep_dir: Path, jobs: list[dict[str, Any]], **meta: Any) -> None:
    """The sweep index (sweep.json): `meta` (name, launcher, overrides, state) of this launch and
    a record per job in the folder: first the jobs an earlier launch into the same folder listed
    whose folders are still there (a margin search's earlier rounds, the same --name run again
    with another grid), each re-read from its folder (`job_record`), then this launch's `jobs`."""
    sweep_dir = Path(sweep_dir)
    this = {j["folder"] for j in jobs}
    earlier: dict[str, dict[str, Any]] = {}
    for j in _listed(sweep_dir):
        folder = j.get("folder")
        if isinstance(folder, str) and folder not in this and folder not in earlier and _is_job(sweep_dir, folder):
            earlier[folder] = job_record(sweep_dir / folder, [str(o) for o in j.get("overrides") or []])
    write_json(sweep_dir / rf.SWEEP_INDEX, {"updated": time.time(), **meta, "jobs": [*earlier.values(), *jobs]})


def _listed(sweep_dir: Path) -> list[dict[str, Any]]:
    """The job records sweep.json holds now ([] when it is missing or unreadable)."""
    try:
        jobs = json.loads((sweep_dir / rf.SWEEP_INDEX).read_text()).get("jobs")
    except (OSError, ValueError, AttributeError):
        return []
    return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []


def _is_job(sweep_dir: Path, folder: str) -> bool:
    """`folder` names a run folder one level under the sweep folder (never a path out of it)."""
    path = sweep_dir / folder
    return "/" not in folder and folder not in ("", ".", "..") and any((path / m).exists() for m in rf.RUN_MARKERS)


# --- jobs that are one configuration ---------------------------------------------------------------------------------


def find_duplicates(identities: list[str]) -> dict[str, int]:
    """{job number (as text): the earlier job with the same run identity}: overrides that differ
    only in keys with no effect (e.g. model.final_norm under post-norm) are one configuration,
    trained once."""
    first: dict[str, int] = {}
    out: dict[str, int] = {}
    for i, ident in enumerate(identities):
        if ident in first:
            out[str(i)] = first[ident]
        else:
            first[ident] = i
    return out


def read_duplicates(sweep_dir: Path) -> dict[str, int]:
    """The sweep's `DUPLICATES_FILE` as a job reads it; {} where there is none."""
    try:
        return json.loads((sweep_dir / DUPLICATES_FILE).read_text())
    except (OSError, ValueError):
        return {}


def same_configuration(job: list[str], earlier: list[str]) -> str:
    """One line on why `job` is trained once with `earlier`: listed twice, or which of its
    overrides change nothing (a key with no effect there, a default, the same value spelt apart)."""
    if sorted(job) == sorted(earlier):
        return f"job {' '.join(job)} is listed twice (the same overrides as job {' '.join(earlier)}): trained once"
    mine, theirs = (dict(o.partition("=")[::2] for o in c) for c in (job, earlier))
    why = []
    for key in sorted(mine.keys() | theirs.keys()):
        if mine.get(key) == theirs.get(key):
            continue
        shown = " and ".join(f"{key}={c[key]}" for c in (mine, theirs) if key in c)
        why.append(
            f"{shown} give the same configuration"
            if key in mine and key in theirs
            else f"{shown} changes nothing there"
        )
    return f"job {' '.join(job)} is the same configuration as job {' '.join(earlier)} ({'; '.join(why)}): trained once"


# --- a sweep's progress, as its job folders say while they run -------------------------------------


class JobProgress(TypedDict):
    """One job as its folder says while it runs (`job_progress`)."""

    name: str  # the job's folder name
    state: str | None  # status.json's state: running, completed, failed, interrupted
    epoch: int  # epochs done
    epochs: int | None  # epochs planned (config.yaml), None where unknown
    grad_norm: float | None  # the last epoch's mean total grad norm
    verdict: str | None  # final, or `nan` so far once a first_nan event is written
    note: str | None  # a fact that is not a verdict (an output collapse while running)
    elapsed: float | None  # seconds since the job started (to its end, once finished)
    eta: float | None  # seconds left, from elapsed per epoch so far (running jobs only)


def job_progress(run_dir: Path, now: float) -> JobProgress:
    """What the sweep view shows of one job, read from its folder (`RunFolder`) at time `now`
    (seconds since the epoch): state, epochs done and planned, last epoch's mean grad norm,
    verdict so far, elapsed and ETA (elapsed per epoch so far)."""
    folder = RunFolder(run_dir)
    status = read_status(run_dir)
    epochs = folder.epochs()  # a torn last line (the job is writing it) is left out
    total = folder.epochs_planned()
    done = len(epochs)
    started, finished = status.started, status.finished
    elapsed = ((finished or now) - started) if isinstance(started, (int, float)) else None
    state = status.state
    eta = None
    if state == "running" and elapsed is not None and done and total:
        eta = elapsed / done * (total - done)
    verdict, note = status.verdict, None
    if verdict is None and state == "running":  # so far: a NaN recorded (final: nothing undoes it)
        events = {e.event for e in folder.events()}
        verdict = vd.NAN if "first_nan" in events else None
        if verdict is None and epochs and epochs[-1].collapsed:
            # a fact, not a verdict: a scream must last to the end, and a collapse while the loss
            # still falls is undertraining (stability.detectors.collapse.scream_onset); many end stable
            note = f"output collapsed at epoch {epochs[-1].get('epoch', done)}"
    return {
        "name": run_dir.name,
        "state": state,
        "epoch": done,
        "epochs": total,
        "grad_norm": epochs[-1].get("grad_norm_mean") if epochs else None,
        "verdict": verdict,
        "note": note,
        "elapsed": elapsed,
        "eta": eta,
    }


def sweep_progress(sweep_dir: Path, names: set[str] | None, now: float) -> list[JobProgress]:
    """`job_progress` of every job folder in `sweep_dir` (those named in `names` only: a folder
    also holds earlier launches' jobs, e.g. a margin search's rounds), by folder name."""
    return [
        job_progress(p.parent, now)
        for p in sorted(sweep_dir.glob(f"*/{rf.STATUS}"))
        if names is None or p.parent.name in names
    ]
