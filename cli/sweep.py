"""`stab sweep [OPTIONS] [OVERRIDES...]`: every combination of the comma lists, as a Hydra multirun.

    stab sweep residual=0.1,0.3 norm=pre,post                      # one job after another
    stab sweep --launcher joblib --jobs 2 residual=0.1,0.3 clip=none,5
    stab sweep --launcher submitit_slurm hydra.launcher.partition=gpu norm=pre,post

Jobs land in RUNS/NAME/<overrides>/ (one level, named by `stability.rundirs.folder_name`, as
`stab run` names its folders). Running the same sweep again skips completed jobs and re-runs
failed, interrupted and damaged ones; a job another live process is still writing is not started
twice. SIGINT/SIGTERM stop every job of a local sweep and mark them `interrupted`. Exit status:
0 unless a job crashed or could not run (an exploding or NaN run is a result), 2 for bad input,
130 when interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli import launch
from cli.common import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_USER,
    check_writable,
    console,
    err_console,
    fmt,
    graceful_signals,
    seconds,
    styled,
    user_errors,
    verdict_text,
    write_errors,
)
from cli.config import UserError, compose_run, config_dirs, shell_command
from cli.job import CONCURRENCY_ENV, DUPLICATES_FILE, job, warm
from stability.preflight import preflight
from stability.record import format as rf
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
from stability.resources import available_cpus
from stability.rundirs import OWNER_ENV, alive, folder_name, me, owner_alive
from stability.slurm import SbatchRefused
from stability.storage import atomic_write_text
from stability.sweeps import (
    SweepBusy,
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


def sweep(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Hydra overrides; comma lists are swept, e.g. residual=0.1,0.3 norm=pre,post"),
    ] = None,
    runs: Annotated[Path, typer.Option("--runs", help="Folder that holds sweeps.")] = Path("runs"),
    name: Annotated[
        str, typer.Option("--name", help="Sweep name: its folder under --runs. Same name again = resume.")
    ] = "sweep",
    launcher: Annotated[
        str, typer.Option("--launcher", help="basic | joblib | submitit_local | submitit_slurm | ray")
    ] = "basic",
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", help="Jobs at once for local parallel launchers (joblib, ray); default: 2 for those, 1 for basic."
        ),
    ] = None,
    config_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--config-dir",
            help="A folder of your own config groups (e.g. model/my_transformer.yaml), searched after stab's conf/; repeatable.",
        ),
    ] = None,
) -> None:
    """Train every combination of the comma lists and print a table of verdicts."""
    overrides = list(overrides or [])
    hydra_args = [o for o in overrides if o.startswith(("hydra.", "hydra/", "+hydra."))]
    task_args = [o for o in overrides if o not in hydra_args]
    with user_errors():
        dirs = config_dirs(config_dir)
        if "/" in name or not name.strip() or name.strip(".") == "":
            raise UserError(f"--name {name!r} is not allowed: expected a plain folder name")
        launch.check_launcher(launcher)
        if jobs is not None and jobs < 1:
            raise UserError(f"--jobs {jobs} is not allowed: expected an integer >= 1")
        task_args = launch.with_declared_grid(task_args, dirs)
        combos = launch.expand(task_args)
    t0 = time.perf_counter()
    done = launch_jobs(combos, runs, name, launcher, jobs, hydra_args, overrides, task_args, dirs)
    wall = time.perf_counter() - t0
    console.print(summary_table(done.records, done.skipped, same=len(done.duplicates)))
    console.print(
        f"wall time {seconds(wall)} for {len(done.records)} jobs"
        + (f", {done.skipped} of them already completed" if done.skipped else "")
        + f", launcher {launcher}",
        highlight=False,
        markup=False,
    )
    _answer(done.sweep_dir)
    report_crashes(done)


@dataclass
class Launched:
    """What one launch of a sweep's jobs left: Hydra's JobReturns, one index record per job (its
    folder, state, verdict), the jobs folded into an earlier one, and those another process held."""

    sweep_dir: Path
    returns: list[Any]
    records: list[dict[str, Any]]
    duplicates: dict[str, int]
    busy: list[dict[str, Any]]

    @property
    def skipped(self) -> int:
        return sum(
            1
            for r in self.returns
            if isinstance(r.return_value, dict)
            and r.return_value.get("skipped")
            and "duplicate_of" not in r.return_value
        )

    @property
    def crashed(self) -> list[dict[str, Any]]:
        held = {Path(b["folder"]).name for b in self.busy}
        return [r for r in self.records if r["state"] != "completed" and r["folder"] not in held]


def launch_jobs(
    combos: list[list[str]],
    runs: Path,
    name: str,
    launcher: str,
    jobs: int | None,
    hydra_args: list[str],
    overrides: list[str],
    task_args: list[str] | None = None,
    dirs: tuple[Path, ...] = (),
) -> Launched:
    """Check every job's config, lock RUNS/NAME, run the jobs through the launcher, index them.

    With `task_args` (a grid of comma lists), Hydra's sweeper expands it into `combos`; without,
    the launcher runs `combos` as they are (e.g. `stab margin`'s probes: each configuration at its
    own learning rate). Resume, duplicates, live view and stop-on-signal are the same either way.
    Bad input raises typer.Exit(EXIT_USER) before any job starts. `dirs`: the `--config-dir` folders."""
    sweep_dir = (runs / name).resolve()
    concurrency = _concurrency(launcher, jobs, len(combos))
    os.environ[CONCURRENCY_ENV] = str(concurrency)  # before any worker starts: they inherit it
    if launcher in LOCAL_LAUNCHERS:
        os.environ[OWNER_ENV] = me()  # its jobs stop when this process is gone
    workers = launch.WarmWorkers.start(launcher, concurrency, hydra_args, warm)  # they import torch meanwhile
    try:
        with user_errors():
            identities = []
            for combo in combos:  # every job's config is valid before any job starts
                cfg = compose_run(combo, dirs)
                preflight(cfg)
                identities.append(cfg.identity())
            duplicates = _duplicates(combos, identities)
            check_writable(runs)
            try:
                lock = SweepLock(sweep_dir).__enter__()
            except SweepBusy as e:
                raise UserError(str(e)) from None
            except OSError as e:
                raise UserError(f"--runs {runs}: cannot create the sweep folder: {e}") from None
    except typer.Exit:
        if workers:
            workers.cancel()
        raise
    with write_errors():  # read by each job (cli/job.py), in whatever process runs it
        if duplicates:
            atomic_write_text(sweep_dir / DUPLICATES_FILE, json.dumps(duplicates))
        else:
            (sweep_dir / DUPLICATES_FILE).unlink(missing_ok=True)
    try:
        with write_errors():
            returns, records = _run_sweep(
                sweep_dir, name, launcher, overrides, task_args, hydra_args, combos, concurrency, workers, dirs
            )
    finally:
        lock.__exit__()
    busy = [r.return_value for r in returns if isinstance(r.return_value, dict) and r.return_value.get("busy")]
    return Launched(sweep_dir, returns, records, duplicates, busy)


def report_crashes(done: Launched) -> None:
    """One line per job that crashed or could not start; exit EXIT_CRASH if there was one."""
    for b in done.busy:
        err_console.print(
            styled(("not started:", "bold yellow"), f" {b['busy']}; run the sweep again once it has finished"),
            highlight=False,
        )
    for r in done.crashed:
        err_console.print(
            styled((f"job {r['state']}:", "bold red"), f" {r['folder']}: {r.get('error')}"), highlight=False
        )
    if done.crashed or done.busy:
        raise typer.Exit(EXIT_CRASH)


def _run_sweep(
    sweep_dir: Path,
    name: str,
    launcher: str,
    overrides: list[str],
    task_args: list[str] | None,
    hydra_args: list[str],
    combos: list[list[str]],
    concurrency: int,
    workers: Any,
    dirs: tuple[Path, ...] = (),
) -> tuple[list[Any], list[dict[str, Any]]]:
    _wait_for_orphans(sweep_dir)
    for path in mark_stale_running(sweep_dir):
        err_console.print(styled(("found interrupted job", "yellow"), f" {path.name}: running it again"))
    for path in sorted(sweep_dir.glob(f"*/{rf.STATUS}")):
        why = incomplete(path.parent) if read_status(path.parent).get("state") == "completed" else None
        if why:
            err_console.print(
                styled(("found damaged job", "yellow"), f" {path.parent.name}: {why}; running it again"),
                highlight=False,
            )
    console.print(
        styled(
            ("stab sweep", "bold"),
            f" {len(combos)} jobs -> {sweep_dir}  "
            f"(launcher {launcher}, {concurrency} at a time, {max(1, available_cpus() // concurrency)} thread(s) each)",
        )
    )
    write_index(sweep_dir, [], name=name, launcher=launcher, overrides=overrides, state="running")
    explicit = task_args is None  # run `combos` as given, not a grid the sweeper expands
    hydra_over = (task_args or []) + launch.hydra_overrides(sweep_dir, launcher, concurrency) + hydra_args
    view = LiveView(sweep_dir, len(combos), {folder_name(c) for c in combos})
    try:
        with view, graceful_signals():
            if workers:
                workers.wait()
            returns = launch.multirun(hydra_over, job, jobs=combos if explicit else None, dirs=dirs)
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "SIGINT"
        if launcher in LOCAL_LAUNCHERS:
            _stop_jobs(sweep_dir)
        mark_stale_running(sweep_dir, why=f"{how} to the sweep")
        _finish(sweep_dir, name, launcher, overrides, "interrupted")
        err_console.print(f"interrupted; run the same command again to resume ({sweep_dir})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except SbatchRefused as e:  # the cluster refused the resources asked for: no job started
        _finish(sweep_dir, name, launcher, overrides, "failed")
        err_console.print(styled(("sweep not started:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER) from None
    except Exception as e:  # the launcher itself failed
        _finish(sweep_dir, name, launcher, overrides, "failed")
        err_console.print(styled(("sweep failed to launch:", "bold red"), f" {type(e).__name__}: {e}"))
        raise typer.Exit(EXIT_CRASH) from None
    return returns, _finish(sweep_dir, name, launcher, overrides, "completed", returns)


def _stop_jobs(sweep_dir: Path) -> None:
    """Stop every job this sweep started that still runs (a joblib worker, a re-parented submitit
    process): SIGTERM, which a job turns into status `interrupted`; after STOP_GRACE_S, SIGKILL."""
    mine = me()
    writers = {
        d: w
        for d, w in live_writers(sweep_dir).items()
        if w.get("owner") == mine and w.get("host") == socket.gethostname() and w.get("pid") != os.getpid()
    }
    for w in writers.values():
        _signal(w, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
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


def _wait_for_orphans(sweep_dir: Path) -> None:
    """Jobs of an earlier sweep of this folder that died stop themselves within a second or two
    (they watch their sweep's process): wait for them rather than start a second writer."""

    def orphans() -> dict[Path, dict[str, Any]]:
        return {
            d: w
            for d, w in live_writers(sweep_dir).items()
            if w.get("owner") and w.get("host") == socket.gethostname() and not owner_alive(w["owner"])
        }

    waiting = orphans()
    if waiting:
        err_console.print(
            f"waiting for {len(waiting)} job(s) of a stopped sweep to finish writing: "
            + ", ".join(d.name for d in waiting),
            highlight=False,
        )
    deadline = time.monotonic() + STOP_GRACE_S
    while waiting and time.monotonic() < deadline:
        time.sleep(0.1)
        waiting = orphans()


def _duplicates(combos: list[list[str]], identities: list[str]) -> dict[str, int]:
    """{job number: the earlier job with the same run identity}: overrides that differ only in
    keys with no effect here (e.g. model.final_norm under post-norm) are one configuration,
    trained once. Says so, naming the keys."""
    first: dict[str, int] = {}
    out: dict[str, int] = {}
    for i, ident in enumerate(identities):
        if ident in first:
            out[str(i)] = first[ident]
        else:
            first[ident] = i
    for i_text, j in out.items():
        err_console.print(same_configuration(combos[int(i_text)], combos[j]), markup=False, highlight=False)
    return out


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


def _answer(sweep_dir: Path) -> None:
    """The report's answer for this sweep (which factor decided stability), and report.md with
    every table and plot in the sweep folder; `stab report` over the folder prints the rest."""
    from cli.report import frame_table
    from stability import report as rep

    try:
        result = rep.write_report(sweep_dir)
    except (rep.ReportError, OSError) as e:
        err_console.print(f"no report: {e}", markup=False)
        return
    if result.answer is not None and not result.answer.empty:
        console.print(
            frame_table(
                rep.answer_display(result.answer),
                title="unstable (exploding, scream or nan) per factor value; medians over those runs",
            )
        )
    console.print(result.sentence, style="bold", markup=False, highlight=False)
    console.print(
        f"report: {result.out / 'report.md'} ({shell_command('stab', 'report', sweep_dir)} for every table)",
        markup=False,
        highlight=False,
    )


def _concurrency(launcher: str, jobs: int | None, n: int) -> int:
    if launcher == "basic":
        return 1
    if launcher == "submitit_local":
        return n  # submitit's local executor starts every job at once
    if launcher == "submitit_slurm":
        return 1  # each job gets its own allocation
    return min(n, jobs or 2)


def _finish(
    sweep_dir: Path, name: str, launcher: str, overrides: list[str], state: str, returns: list[Any] | None = None
) -> list[dict[str, Any]]:
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
    if returns is None:  # interrupted: index what is on disk
        records = [
            job_record(p.parent, RunFolder(p.parent).overrides() or []) for p in sorted(sweep_dir.rglob(rf.STATUS))
        ]
    write_index(sweep_dir, records, name=name, launcher=launcher, overrides=overrides, state=state)
    return records


def summary_table(records: list[dict[str, Any]], skipped: int = 0, same: int = 0) -> Table:
    """One row per job; the overrides that differ between jobs are the first columns."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in records]
    keys = (
        [k for k in dict.fromkeys(k for p in parsed for k in p) if len({p.get(k) for p in parsed}) > 1]
        if len(records) > 1
        else []
    )
    notes = ([f"{skipped} already completed, skipped"] if skipped else []) + (
        [f"{same} the same configuration as another, trained once"] if same else []
    )
    t = Table(title=f"{len(records)} jobs" + (f" ({'; '.join(notes)})" if notes else ""))
    show_state = any(r["state"] != "completed" for r in records)  # only worth a column when some did not finish
    for col in (*keys, *(["state"] if show_state else []), "verdict", "first NaN", "scream", "final loss"):
        t.add_column(col, overflow="fold")
    for r, p in zip(records, parsed):
        nan = r.get("first_nan")
        t.add_row(
            *(p.get(k, "") for k in keys),
            *([r["state"] or "?"] if show_state else []),
            verdict_text(r.get("verdict") or "?"),
            f"e{nan['epoch']} b{nan['batch']} {nan['module']}" if nan else "-",
            fmt(r.get("scream_epoch")),
            fmt(r.get("final_loss")),
        )
    return t


def job_progress(run_dir: Path, now: float) -> dict[str, Any]:
    """What the sweep view shows of one job, read from its folder: state, epoch (done/total),
    last epoch's mean grad norm, verdict so far, elapsed and ETA (elapsed per epoch so far)."""
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


class LiveView:
    """Polls the sweep folder's job files while Hydra runs the jobs (any launcher, any process).

    On a terminal: a live table, a row per job with its epoch, last grad norm, verdict so far,
    elapsed time and ETA, as wide as the terminal from its first frame. Elsewhere (a CI log): a
    line each time a job starts, finishes an epoch or ends."""

    def __init__(
        self, sweep_dir: Path, total: int, names: set[str] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        # `names`: this launch's job folders; a folder also holds earlier launches' jobs (a margin
        # search's rounds, another grid under the same --name), which are not counted in `total`
        self.sweep_dir, self.total, self.names, self.clock = sweep_dir, total, names, clock
        self.terminal = console.is_terminal
        self.live = (
            Live(self.render(), console=console, refresh_per_second=2, transient=True) if self.terminal else None
        )
        self.seen: dict[str, tuple[Any, ...]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def jobs(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            job_progress(p.parent, now)
            for p in sorted(self.sweep_dir.glob(f"*/{rf.STATUS}"))
            if self.names is None or p.parent.name in self.names
        ]

    def render(self) -> Table:
        jobs = self.jobs()
        counts = {s: sum(1 for j in jobs if j["state"] == s) for s in ("completed", "running", "failed", "interrupted")}
        # min_width: with no rows yet, Rich would size the table (and wrap its title) to the
        # header's ~23 columns; the first frames keep the terminal's width instead
        t = Table(
            title=f"{counts['completed']}/{self.total} done, {counts['running']} running, {counts['failed']} failed",
            show_edge=False,
            min_width=min(console.width, 120),
        )
        for col in ("job", "state", "epoch", "grad norm", "verdict", "elapsed", "ETA"):
            t.add_column(
                col, justify="right" if col in ("epoch", "grad norm", "elapsed", "ETA") else "left", overflow="fold"
            )
        for j in jobs:
            t.add_row(
                j["name"],
                verdict_text(j["state"]),
                f"{j['epoch']}/{j['epochs'] or '?'}",
                fmt(j["grad_norm"]),
                verdict_text(j["verdict"]) if j["verdict"] else Text(j["note"] or "", style="dim"),
                seconds(j["elapsed"]),
                seconds(j["eta"]) if j["state"] == "running" else "",
            )
        return t

    def print_changes(self) -> None:
        """Plain lines for what changed since the last poll (no terminal)."""
        for j in self.jobs():
            key = (j["state"], j["epoch"], j["verdict"], j["note"])
            if self.seen.get(j["name"]) == key:
                continue
            self.seen[j["name"]] = key
            done = sum(1 for k in self.seen.values() if k[0] == "completed")
            line = (
                f"[{done}/{self.total} done] {j['name']}: {j['state']}, epoch {j['epoch']}/{j['epochs'] or '?'}, "
                f"grad norm {fmt(j['grad_norm'])}, elapsed {seconds(j['elapsed'])}"
            )
            if j["state"] == "running":
                line += f", ETA {seconds(j['eta'])}"
            if j["verdict"]:
                line += f", verdict {j['verdict']}"
            elif j["note"]:
                line += f", {j['note']} (a verdict comes at the end)"
            console.print(line, highlight=False, soft_wrap=True)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            if self.live is not None:
                self.live.update(self.render())
            else:
                self.print_changes()

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        if self.live:
            self.live.__exit__(*exc)
        else:
            self.print_changes()
