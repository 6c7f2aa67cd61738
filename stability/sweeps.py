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

from stability import runformat as rf
from stability.rundirs import holder, writer_gone
from stability.storage import read_json, read_jsonl, write_json, write_status


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
    path = Path(run_dir) / rf.STATUS
    if not path.exists():
        return {"state": "pending"}
    try:
        return read_json(path)
    except (ValueError, OSError) as e:
        return {"state": "corrupt", "error": f"status.json unreadable: {e}"}


def mark_stale_running(sweep_dir: Path, why: str = "found by the next sweep") -> list[Path]:
    """Jobs `running` whose writer is provably gone: mark them interrupted. Jobs whose writer
    still lives (another process, a job of a sweep that is stopping) are left as they are."""
    stale = []
    for status_path in sorted(Path(sweep_dir).glob(f"*/{rf.STATUS}")):
        status = read_status(status_path.parent)
        if status.get("state") == "running" and writer_gone(status_path.parent, status):
            status.update(state="interrupted", finished=None, updated=time.time(),
                          error=f"process {status.get('pid')} stopped while running ({why})")
            write_status(status_path, status)
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
    """Why a `completed` run's record cannot be trusted (None if it can): its status, summary,
    metrics or epochs are missing, unreadable or disagree."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("state") == "corrupt":
        return status["error"]
    try:
        summary = read_json(run_dir / rf.SUMMARY)
    except FileNotFoundError:
        return "summary.json is missing"
    except (ValueError, OSError) as e:
        return f"summary.json unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(summary, dict) or not summary.get("verdict"):
        return "summary.json holds no verdict"
    for name in (rf.METRICS, rf.EPOCHS):
        path = run_dir / name
        if not path.exists():
            return f"{name}.jsonl is missing"
        try:
            records, bad = read_jsonl(path)
        except (OSError, UnicodeDecodeError) as e:
            return f"{name}.jsonl unreadable ({e})"
        if bad:
            return f"{name}.jsonl has {bad} unreadable line(s)"
        if not records:
            return f"{name}.jsonl is empty"
    if isinstance(summary.get("steps"), int) and summary["steps"] != len(read_jsonl(run_dir / rf.METRICS)[0]):
        return f"{rf.METRICS} holds {len(read_jsonl(run_dir / rf.METRICS)[0])} steps, {rf.SUMMARY} says {summary['steps']}"
    return None


def should_skip(run_dir: Path, run_id: str) -> bool:
    """A completed run of the same configuration identity, with a whole record, is not run again."""
    status = read_status(run_dir)
    return status.get("state") == "completed" and status.get("run_id") == run_id and incomplete(run_dir) is None


def job_record(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One line of the sweep index: where, what, and how it ended."""
    status = read_status(run_dir)
    rec: dict[str, Any] = {"folder": Path(run_dir).name, "overrides": overrides, "state": status.get("state"),
                           "run_id": status.get("run_id"), "error": status.get("error")}
    summary_path = Path(run_dir) / rf.SUMMARY
    if summary_path.exists():
        try:
            s = read_json(summary_path)
            rec.update(verdict=s.get("verdict"), first_nan=s.get("first_nan"), final_loss=s.get("final_loss"),
                       scream_epoch=s.get("scream_epoch"))
        except (ValueError, OSError):
            rec.update(verdict="?", error=(rec["error"] or "") + " summary.json unreadable")
    return rec


def write_index(sweep_dir: Path, jobs: list[dict[str, Any]], **meta: Any) -> None:
    write_json(Path(sweep_dir) / rf.SWEEP_INDEX, {"updated": time.time(), **meta, "jobs": jobs})
