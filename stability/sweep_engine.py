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
from typing import Any, Protocol, TypedDict

from stability.observe import Observer
from stability.record import format as rf
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
from stability.resources import available_cpus
from stability.rundirs import OWNER_ENV, alive, folder_name, me, owner_alive
from stability.storage import atomic_write_text
from stability.sweeps import (
    SweepLock,
    incomplete,
    job_record,
    live_writers,
    mark_stale_running,
    read_status,
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
# Written into the sweep folder before the launch: {job number: the earlier job of the same run
# identity}. A file, not the environment: joblib's workers start before the sweep has composed its
# jobs, so they would not inherit it.
DUPLICATES_FILE = ".duplicates.json"

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
        index_jobs(sweep_dir, index, "interrupted")
        raise SweepInterrupted(how, sweep_dir) from None
    except Exception as e:  # the launcher itself failed, or the cluster refused the jobs
        index_jobs(sweep_dir, index, "failed")
        raise LaunchFailed(e) from e
    return returns, index_jobs(sweep_dir, index, "completed", returns)


def index_jobs(
    sweep_dir: Path, index: dict[str, Any], state: str, returns: list[Any] | None = None
) -> list[dict[str, Any]]:
    """The sweep index (`sweeps.write_index`) in `state`: a record per job returned (a duplicate
    gets its earlier job's record), or, with no `returns` (interrupted, failed), of every job
    folder on disk. Returns the records."""
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
    write_index(sweep_dir, records, **index, state=state)
    return records


# --- duplicates ---------------------------------------------------------------------------------


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
            # still falls is undertraining (stability.detectors.scream_onset); many end stable
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
