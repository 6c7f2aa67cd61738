"""The sweep engine: launch a sweep's jobs, watch their progress, stop them, index what they left.

`stab sweep`, `stab doctor --try` and `stab margin` all run their jobs through `launch_jobs`:

    sweep = Sweep(runs=Path("runs"), name="sweep", launcher="basic", combos=[["norm=pre"], ["norm=post"]])
    done = launch_jobs(sweep, launcher, observer)   # -> Launched: the index records, crashes, ...

How a job is composed and run is the caller's (`Launcher`: the CLI composes each job's config
with Hydra and hands the jobs to Hydra's launchers, `cli/job.py`); what the sweep tells as it goes
goes to an `stability.observe.Observer` (`notice` lines, and `begin` / `jobs` / `end` around the
jobs with every job's progress read from its folder twice a second: the CLI's live view). This
module holds no Hydra, no Rich and no Typer.

What the engine does around the launcher: it checks every job's config before any job starts and
finds the jobs that are one configuration (trained once, `DUPLICATES_FILE`); it locks the sweep
folder (`SweepBusy` if another sweep holds it); it waits for the jobs of a killed earlier sweep
that still write, marks jobs whose writer is gone `interrupted` and says which completed jobs are
damaged (both run again); it writes the sweep index (`sweeps.write_index`) as `running`, then
with every job's record at the end. On Ctrl-C or SIGTERM (a `KeyboardInterrupt` in this process)
it stops every job of a local launcher (SIGTERM, SIGKILL after `STOP_GRACE_S`), marks them
`interrupted` and raises `SweepInterrupted`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stability.observe import Observer
from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.resources import available_cpus
from stability.rundirs import OWNER_ENV, alive, folder_name, me, owner_alive
from stability.storage import atomic_write_text
from stability.sweeps import (
    DUPLICATES_FILE,
    SweepLock,
    find_duplicates,
    incomplete,
    job_record,
    live_writers,
    mark_stale_running,
    read_status,
    same_configuration,
    sweep_progress,
    write_index,
)

LOCAL_LAUNCHERS = (
    "basic",
    "joblib",
    "submitit_local",
    "ray",
)  # their jobs run on this machine, and stop with the sweep
STOP_GRACE_S = 60.0  # how long stopped jobs get to write `interrupted` before they are killed
POLL_S = 0.5  # how often the jobs' progress is read while they run
CONCURRENCY_ENV = "STAB_CONCURRENCY"  # how many jobs run at once here, for each job's share of the cores

# `Observer.notice` kinds: what the line is about (a front end styles them)
STARTING = "stab sweep"  # the sweep starts: its jobs, folder, launcher and threads
WAITING = "waiting"  # jobs of a stopped sweep still write: waited for
RESUMED = "found interrupted job"  # its writer is gone: run again
DAMAGED = "found damaged job"  # completed, but its record is incomplete: run again
DUPLICATE = "trained once"  # the same configuration as an earlier job


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the sweep; every job it started here was stopped and marked
    `interrupted` (`how`: the signal's name). Running the same sweep again resumes it."""

    def __init__(self, how: str, sweep_dir: Path) -> None:
        super().__init__(f"{how} to the sweep")
        self.how, self.sweep_dir = how, sweep_dir


class LaunchFailed(RuntimeError):
    """The launcher itself failed, or refused the jobs (`error`: e.g. `slurm.SbatchRefused`, no job
    started); not a job's crash, which is in its folder and its record."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class SweepFolderError(OSError):
    """The sweep folder cannot be created (a file in the way, no permission)."""


class JobReturn(Protocol):
    """What a launcher returns per job (Hydra's `JobReturn`): the job function's return value (a
    dict: folder, skipped, busy, error, duplicate_of), its overrides and its folder."""

    @property
    def return_value(self) -> Any:
        """The job function's return value (Hydra raises the job's own error here, if it had one)."""

    @property
    def overrides(self) -> Sequence[str]:
        """The job's overrides."""

    @property
    def working_dir(self) -> str | None:
        """The job's folder, as the launcher made it."""


class Launcher(Protocol):
    """How a front end composes and runs a sweep's jobs (`cli.job.HydraLauncher`)."""

    def prepare(self, concurrency: int) -> None:
        """Called first, before the checks: e.g. start worker processes that import torch meanwhile."""

    def check(self, sweep: Sweep) -> list[str]:
        """Every job's run identity (`RunConfig.identity`) in the order of `sweep.combos`, each
        config checked (and preflighted) first, and that `sweep.runs` can be written; raises on
        bad input, before any job starts."""

    def run(self, sweep_dir: Path, combos: list[list[str]], concurrency: int) -> list[JobReturn]:
        """Run the jobs with their folders under `sweep_dir`, `concurrency` at a time; returns
        when every job has returned. Raises KeyboardInterrupt on Ctrl-C / SIGTERM."""

    def cancel(self) -> None:
        """Nothing will run (a check failed): undo `prepare`."""


@dataclass(frozen=True)
class Sweep:
    """One launch of a sweep's jobs: `combos` (one override list per job) into RUNS/NAME/.

    `launcher`: basic | joblib | submitit_local | submitit_slurm | ray; `jobs`: at once for the
    local parallel ones (None: 2); `overrides`: as the user gave them (kept in the index)."""

    runs: Path
    name: str
    launcher: str
    combos: list[list[str]]
    jobs: int | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def sweep_dir(self) -> Path:
        """RUNS/NAME, absolute."""
        return (self.runs / self.name).resolve()

    @property
    def concurrency(self) -> int:
        """How many jobs run at once on this machine."""
        if self.launcher == "basic":
            return 1
        if self.launcher == "submitit_local":
            return len(self.combos)  # submitit's local executor starts every job at once
        if self.launcher == "submitit_slurm":
            return 1  # each job gets its own allocation
        return min(len(self.combos), self.jobs or 2)


@dataclass
class Launched:
    """What one launch of a sweep's jobs left: the launcher's returns, one index record per job
    (its folder, state, verdict), the jobs folded into an earlier one, and those another process held."""

    sweep_dir: Path
    returns: list[Any]
    records: list[dict[str, Any]]
    duplicates: dict[str, int]
    busy: list[dict[str, Any]]

    @property
    def skipped(self) -> int:
        """Jobs found completed by an earlier launch, not run again."""
        return sum(
            1
            for r in self.returns
            if isinstance(r.return_value, dict)
            and r.return_value.get("skipped")
            and "duplicate_of" not in r.return_value
        )

    @property
    def crashed(self) -> list[dict[str, Any]]:
        """The index records of jobs that did not complete (crashed, or could not start), except
        those another live process holds (`busy`)."""
        held = {Path(b["folder"]).name for b in self.busy}
        return [r for r in self.records if r["state"] != "completed" and r["folder"] not in held]


def launch_jobs(sweep: Sweep, launcher: Launcher, observer: Observer | None = None) -> Launched:
    """Check every job's config, lock RUNS/NAME, run the jobs through `launcher`, index them.

    Resume (completed jobs are skipped by the job function), duplicates, progress and
    stop-on-signal are the same for every launcher.

    Raises:
        whatever `launcher.check` raises for bad input, before any job starts;
        sweeps.SweepBusy: another sweep process holds RUNS/NAME;
        SweepFolderError: RUNS/NAME cannot be created;
        SweepInterrupted: Ctrl-C / SIGTERM (the jobs are stopped and marked `interrupted`);
        LaunchFailed: the launcher failed, or the cluster refused the resources asked for
            (`error` a `slurm.SbatchRefused`: no job started); the index then says `failed`.
    """
    observer = observer or Observer()
    sweep_dir, concurrency = sweep.sweep_dir, sweep.concurrency
    os.environ[CONCURRENCY_ENV] = str(concurrency)  # before any worker starts: they inherit it
    if sweep.launcher in LOCAL_LAUNCHERS:
        os.environ[OWNER_ENV] = me()  # its jobs stop when this process is gone
    launcher.prepare(concurrency)
    try:
        identities = launcher.check(sweep)  # every job's config is valid before any job starts
        duplicates = find_duplicates(identities)
        for i, j in duplicates.items():
            observer.notice(DUPLICATE, same_configuration(sweep.combos[int(i)], sweep.combos[j]))
        try:
            lock = SweepLock(sweep_dir).__enter__()
        except OSError as e:
            raise SweepFolderError(e.errno, f"cannot create the sweep folder: {e}") from None
    except BaseException:
        launcher.cancel()
        raise
    try:
        if duplicates:  # read by each job, in whatever process runs it
            atomic_write_text(sweep_dir / DUPLICATES_FILE, json.dumps(duplicates))
        else:
            (sweep_dir / DUPLICATES_FILE).unlink(missing_ok=True)
        returns, records = _run(sweep, launcher, concurrency, observer)
    finally:
        lock.__exit__()
    busy = [r.return_value for r in returns if isinstance(r.return_value, dict) and r.return_value.get("busy")]
    return Launched(sweep_dir, returns, records, duplicates, busy)


def _run(
    sweep: Sweep, launcher: Launcher, concurrency: int, observer: Observer
) -> tuple[list[Any], list[dict[str, Any]]]:
    sweep_dir = sweep.sweep_dir
    wait_for_orphans(sweep_dir, observer)
    for path in mark_stale_running(sweep_dir):
        observer.notice(RESUMED, f"{path.name}: running it again")
    for path in sorted(sweep_dir.glob(f"*/{rf.STATUS}")):
        why = incomplete(path.parent) if read_status(path.parent).get("state") == "completed" else None
        if why:
            observer.notice(DAMAGED, f"{path.parent.name}: {why}; running it again")
    observer.notice(
        STARTING,
        f"{len(sweep.combos)} jobs -> {sweep_dir}  (launcher {sweep.launcher}, {concurrency} at a time, "
        f"{max(1, available_cpus() // concurrency)} thread(s) each)",
    )
    index = dict(name=sweep.name, launcher=sweep.launcher, overrides=sweep.overrides)
    write_index(sweep_dir, [], **index, state="running")
    try:
        with watching(sweep_dir, len(sweep.combos), {folder_name(c) for c in sweep.combos}, observer):
            returns = launcher.run(sweep_dir, sweep.combos, concurrency)
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "SIGINT"
        if sweep.launcher in LOCAL_LAUNCHERS:
            stop_jobs(sweep_dir)
        mark_stale_running(sweep_dir, why=f"{how} to the sweep")
        index_jobs(sweep_dir, index, "interrupted", combos=sweep.combos)
        raise SweepInterrupted(how, sweep_dir) from None
    except Exception as e:  # the launcher itself failed, or the cluster refused the jobs
        index_jobs(sweep_dir, index, "failed", combos=sweep.combos)
        raise LaunchFailed(e) from e
    return returns, index_jobs(sweep_dir, index, "completed", returns)


def index_jobs(
    sweep_dir: Path,
    index: dict[str, Any],
    state: str,
    returns: list[Any] | None = None,
    combos: list[list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The sweep index (`sweeps.write_index`) in `state`: a record per job returned (a duplicate
    gets its earlier job's record), or, with no `returns` (interrupted, failed), of every job
    folder on disk and, for each of `combos` that has none yet (never started), a `pending`
    record: an interrupted sweep's index names every job it was to run. Returns the records."""
    records: list[dict[str, Any]] = []
    for r in returns or []:
        value = r.return_value if isinstance(r.return_value, dict) else {}
        if "duplicate_of" in value:  # the same configuration as an earlier job: that job's record
            records.append(
                {
                    **records[value["duplicate_of"]],
                    "overrides": list(r.overrides),
                    "same_as": records[value["duplicate_of"]]["overrides"],
                }
            )
            continue
        folder = Path(value["folder"]) if value else Path(r.working_dir or "")
        records.append(job_record(folder, list(r.overrides)))
    if returns is None:
        records = [
            job_record(p.parent, RunFolder(p.parent).overrides() or []) for p in sorted(sweep_dir.rglob(rf.STATUS))
        ]
        on_disk = {r["folder"] for r in records}
        for c in combos or []:
            if folder_name(c) not in on_disk:
                records.append({"folder": folder_name(c), "overrides": list(c), "state": "pending"})
                on_disk.add(folder_name(c))
    write_index(sweep_dir, records, **index, state=state)
    return records


# --- stopping -----------------------------------------------------------------------------------


def stop_jobs(sweep_dir: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Stop every job this process's sweep started that still runs (a joblib worker, a
    re-parented submitit process): SIGTERM, which a job turns into status `interrupted`; after
    `grace_s` seconds, SIGKILL."""
    mine = me()
    writers = {
        d: w
        for d, w in live_writers(sweep_dir).items()
        if w.get("owner") == mine and w.get("host") == socket.gethostname() and w.get("pid") != os.getpid()
    }
    for w in writers.values():
        _signal(w, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while writers and time.monotonic() < deadline:
        time.sleep(0.1)
        writers = {d: w for d, w in writers.items() if d in live_writers(sweep_dir)}
    for w in writers.values():
        _signal(w, signal.SIGKILL)


def _signal(writer: dict[str, Any], sig: int) -> None:
    pid = writer.get("pid")
    if isinstance(pid, int) and alive(pid, writer.get("pid_start")):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for_orphans(sweep_dir: Path, observer: Observer, grace_s: float = STOP_GRACE_S) -> None:
    """Jobs of an earlier sweep of this folder that died stop themselves within a second or two
    (they watch their sweep's process): wait for them (at most `grace_s` seconds) rather than
    start a second writer."""

    def orphans() -> dict[Path, dict[str, Any]]:
        return {
            d: w
            for d, w in live_writers(sweep_dir).items()
            if w.get("owner") and w.get("host") == socket.gethostname() and not owner_alive(w["owner"])
        }

    waiting = orphans()
    if waiting:
        observer.notice(
            WAITING,
            f"waiting for {len(waiting)} job(s) of a stopped sweep to finish writing: "
            + ", ".join(d.name for d in waiting),
        )
    deadline = time.monotonic() + grace_s
    while waiting and time.monotonic() < deadline:
        time.sleep(0.1)
        waiting = orphans()


# --- progress -----------------------------------------------------------------------------------


@contextmanager
def watching(
    sweep_dir: Path,
    total: int,
    names: set[str] | None,
    observer: Observer,
    clock: Callable[[], float] = time.time,
    every_s: float = POLL_S,
) -> Iterator[None]:
    """While the block runs, the jobs' progress goes to `observer`: `begin("jobs", total, "jobs")`,
    `jobs(sweep_progress(...))` every `every_s` seconds from a thread and once at the end, `end()`."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            observer.jobs(sweep_progress(sweep_dir, names, clock()))

    observer.begin("jobs", total, "jobs")
    thread = threading.Thread(target=poll, daemon=True, name="stab-sweep-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            observer.jobs(sweep_progress(sweep_dir, names, clock()))
        finally:
            observer.end()
