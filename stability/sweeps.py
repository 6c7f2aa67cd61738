"""Sweep bookkeeping that Hydra does not do: job status, resume decisions, the sweep index.

Every job folder holds `status.json` (written by the run itself). A sweep holds an exclusive
lock on its folder while it runs, so a job found `running` when a sweep starts was left by a
process that died (SIGKILL, power loss): it is marked `interrupted` and run again.

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

from stability.storage import read_json, write_json


class SweepBusy(RuntimeError):
    """Another `stab sweep` process holds this sweep's folder."""


class SweepLock:
    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir) / ".sweep.lock"
        self.fd: int | None = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            holder = self.path.read_text().strip() or "another process"
            raise SweepBusy(f"sweep folder {self.path.parent} is in use by {holder}; wait for it or use another --name") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json of a run folder; {'state': 'corrupt', ...} if it cannot be read."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return {"state": "pending"}
    try:
        return read_json(path)
    except (ValueError, OSError) as e:
        return {"state": "corrupt", "error": f"status.json unreadable: {e}"}


def mark_stale_running(sweep_dir: Path) -> list[Path]:
    """Jobs still `running` while we hold the sweep lock were killed: mark them interrupted."""
    stale = []
    for status_path in Path(sweep_dir).rglob("status.json"):
        status = read_status(status_path.parent)
        if status.get("state") == "running":
            status.update(state="interrupted", finished=None, updated=time.time(),
                          error=f"process {status.get('pid')} died while running (found by the next sweep)")
            write_json(status_path, status)
            stale.append(status_path.parent)
    return stale


def should_skip(run_dir: Path, run_id: str) -> bool:
    """A completed run of the same configuration identity is not run again."""
    status = read_status(run_dir)
    return status.get("state") == "completed" and status.get("run_id") == run_id \
        and (Path(run_dir) / "summary.json").exists()


def job_record(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One line of the sweep index: where, what, and how it ended."""
    status = read_status(run_dir)
    rec: dict[str, Any] = {"folder": Path(run_dir).name, "overrides": overrides, "state": status.get("state"),
                           "run_id": status.get("run_id"), "error": status.get("error")}
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.exists():
        try:
            s = read_json(summary_path)
            rec.update(verdict=s.get("verdict"), first_nan=s.get("first_nan"), final_loss=s.get("final_loss"),
                       scream_epoch=s.get("scream_epoch"))
        except (ValueError, OSError):
            rec.update(verdict="?", error=(rec["error"] or "") + " summary.json unreadable")
    return rec


def write_index(sweep_dir: Path, jobs: list[dict[str, Any]], **meta: Any) -> None:
    write_json(Path(sweep_dir) / "sweep.json", {"updated": time.time(), **meta, "jobs": jobs})
