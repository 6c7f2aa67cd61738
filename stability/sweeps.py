"""Sweep bookkeeping that Hydra does not do: job status, resume decisions, the sweep index.

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
import os
import time
from pathlib import Path
from typing import Any

from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.record.records import Status
from stability.rundirs import holder
from stability.storage import write_json, write_status


class SweepBusy(RuntimeError):
    """Another `stab sweep` process holds this sweep's folder."""


class SweepLock:
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
    write_json(Path(sweep_dir) / rf.SWEEP_INDEX, {"updated": time.time(), **meta, "jobs": jobs})
