"""Run folders: their names, their exclusive creation, and the lease that keeps one writer each.

A run folder has exactly one live writer. The writer holds `RUN/.lease`: an `flock` on the file
for as long as its process lives (the kernel drops it when the process dies, whatever killed
it, so a reused pid cannot impersonate it) and, inside, who holds it: pid, host, the process's
start time and a heartbeat the holder refreshes. A folder whose lease cannot be locked is in use;
one whose lease names another host counts as in use until its heartbeat is `LEASE_S` old (a
shared filesystem may not carry `flock` between hosts).

    name = folder_name(["data.path=/x/pairs", "residual=0.3"])   # 'data.path=_x_pairs,residual=0.3~1f0c9a2e'
    run_dir = create_unique(runs / "run", f"{stamp}_{name}")      # never an existing folder
    with RunLease(run_dir):                                       # LeaseBusy if another writer holds it
        ...
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stability.config import OPERATIONAL_KEYS

LEASE = ".lease"
LEASE_S = 600.0  # a lease from another host is stale after this long without a heartbeat
HEARTBEAT_S = 60.0
NAME_BYTES = 120  # folder names stay far below the usual 255-byte limit, with room for a prefix
OPERATIONAL = OPERATIONAL_KEYS  # where or how fast a run runs: kept out of folder names
# The process that owns a sweep's jobs ("pid:start" on this host), set by `stab sweep` for local
# launchers: a job whose owner is gone stops (see `OwnerWatch`).
OWNER_ENV = "STAB_SWEEP_OWNER"


# --- names ----------------------------------------------------------------------------------


def folder_name(overrides: Iterable[str]) -> str:
    """The folder name of a run or sweep job: its overrides, sorted and joined with commas.

    The same rule for `stab run` and `stab sweep`. Operational keys are left out. Anything that
    could make a path (a separator, a NUL, a control character, a quote) is replaced by `_`; a
    name longer than NAME_BYTES is cut. A name that was changed either way gets `~` and a hash of
    the untouched overrides, so two different override sets never share a folder.
    """
    kept = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in OPERATIONAL)
    raw = ",".join(kept)
    if not raw:
        return "defaults"
    safe = "".join("_" if _unsafe(c) else c for c in raw)
    if safe == raw and len(safe.encode()) <= NAME_BYTES:
        return safe
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    head = safe.encode()[: NAME_BYTES - 9].decode(errors="ignore")  # whole characters only
    return f"{head}~{digest}"


def _unsafe(c: str) -> bool:
    return c in "/\\'\"" or c == os.sep or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")


def create_unique(parent: Path, name: str) -> Path:
    """Create parent/name, or parent/name-2, -3, ... if taken: never a folder that already exists,
    even for two processes that pick the same name in the same second."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent / name}: 10,000 folders of that name already exist")


# --- processes ------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None if unknown.
    With the pid it names one process: a pid reused later has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` exists on this host and (if `start` is given and known here) is the
    same process that had that start time."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = process_start(pid)
    return start is None or now is None or now == start


def me() -> str:
    """This process as 'pid:start', for OWNER_ENV."""
    return f"{os.getpid()}:{process_start(os.getpid()) or 0}"


def owner_alive(owner: str) -> bool:
    """Whether the process `owner` ("PID:START", as `me` writes it) still runs."""
    pid, _, start = owner.partition(":")
    return alive(int(pid), int(start) or None)


# --- the lease ------------------------------------------------------------------------------


class LeaseBusy(RuntimeError):
    """Another live process holds this run folder."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]) -> None:
        self.run_dir, self.holder = Path(run_dir), holder
        since = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        super().__init__(
            f"{run_dir} is being written by pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when})"
        )


@dataclass
class Holder:
    """What the lease file says about its writer, and whether that writer is provably gone."""

    info: dict[str, Any]
    locked: bool  # someone holds the flock now

    @property
    def live(self) -> bool:
        """Whether a live process holds the lease (this host: its lock; another: its heartbeat is fresh)."""
        if self.locked:
            return True
        if not self.info.get("pid"):  # released (or never written): nobody
            return False
        if self.info.get("host") == socket.gethostname():
            # The flock is free, so its holder died, unless this filesystem does not carry flock:
            # then the pid and its start time decide (a reused pid has another start time).
            pid = self.info["pid"]
            return isinstance(pid, int) and alive(pid, self.info.get("pid_start"))
        beat = self.info.get("heartbeat") or 0
        return time.time() - float(beat) < LEASE_S


def holder(run_dir: Path) -> Holder:
    """Who holds run_dir's lease, without taking it."""
    path = Path(run_dir) / LEASE
    if not path.exists():
        return Holder({}, False)
    info = _read(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return Holder(info, False)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return Holder(info, False)
    except BlockingIOError:
        return Holder(info, True)
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it


def writer_gone(run_dir: Path, status: Mapping[str, Any] | None = None) -> bool:
    """True when the folder's writer is provably gone: no live holder of its lease. A folder
    written before leases existed is judged by its status's pid: gone if that pid is not alive
    on this host; a writer on another host without a lease is not provably gone."""
    if (Path(run_dir) / LEASE).exists():
        return not holder(run_dir).live
    status = status or {}
    if not isinstance(status.get("pid"), int):
        return True  # no writer on record
    if status.get("host") == socket.gethostname():
        return not alive(status["pid"])
    return False


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLease:
    """Exclusive, held for the life of this process's work on one run folder.

    Acquire raises `LeaseBusy` if another live writer holds it (`acquire(wait=True)` waits for
    its flock instead). The flock is what excludes writers on this host; the file's contents say
    who holds it, for messages and for hosts that do not share locks; a thread refreshes its
    heartbeat. `name` is the lease file's name in the folder (`.lease` for a run's writer; another
    name for another kind of writer, e.g. `stab report`'s `.stab-report.lock`).
    """

    def __init__(self, run_dir: Path, name: str = LEASE, **extra: Any) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.extra = extra
        self.fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, wait: bool = False) -> RunLease:
        """Take the lease and start its heartbeat. Raises LeaseBusy if a live process holds it;
        with `wait`, blocks on the flock until the holder releases it instead."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseBusy(self.run_dir, _read(self.path)) from None
        other = Holder(_read(self.path), False)
        if other.info.get("pid") != os.getpid() and other.live:  # a writer on a host without shared flock
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise LeaseBusy(self.run_dir, other.info)
        self.fd = fd
        self.info = {
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "host": socket.gethostname(),
            "started": time.time(),
            "heartbeat": time.time(),
            **self.extra,
        }
        self._write()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="stab-lease")
        self._beat.start()
        return self

    def _write(self) -> None:
        data = json.dumps(self.info).encode().ljust(512)  # same size every time: rewritten in place
        if self.fd is None:  # released
            return
        try:
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # a full disk: the flock still excludes other writers here

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.info["heartbeat"] = time.time()
            self._write()

    def release(self) -> None:
        """Stop the heartbeat, mark the lease free and unlock it."""
        self._stop.set()
        if self.fd is not None:
            self.info = {}  # released: the file says nobody holds it
            self._write()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
