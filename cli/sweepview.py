"""A sweep on the terminal: the live view of its jobs, its notices, and the lines for jobs that crashed.

`stab sweep`, `stab doctor --try` and `stab margin` launch their jobs with `run_jobs`, which
hands them to the engine (`stability.sweep_engine.launch_jobs`) with Hydra as the launcher
(`cli.job.HydraLauncher`) and a `LiveView` as its observer, and turns the engine's errors into
one line and an exit status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli.common import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_USER,
    console,
    err_console,
    fmt,
    seconds,
    styled,
    user_errors,
    verdict_text,
    write_errors,
)
from cli.config import UserError
from cli.job import HydraLauncher
from cli.launch import as_hydra_reads
from stability import sweep_engine as se
from stability.observe import Observer
from stability.slurm import SbatchRefused
from stability.sweeps import SweepBusy

NOTICE_STYLE = {se.RESUMED: "yellow", se.DAMAGED: "yellow"}  # the others are plain lines


def run_jobs(
    sweep: se.Sweep,
    hydra_args: list[str] | None = None,
    grid: list[str] | None = None,
    dirs: Sequence[Path] = (),
) -> se.Launched:
    """Launch `sweep`'s jobs through Hydra with the live view; returns what they left.

    `grid`: comma lists Hydra's sweeper expands (`stab sweep`); None runs `sweep.combos`, each
    spelt as Hydra's sweeper spells a job (`train.stop_early=true` -> `train.stop_early=True`,
    `cli.launch.as_hydra_reads`), so a job `stab margin` or `stab doctor --try` names is the same
    folder as the same job of a `stab sweep` and is found completed, not trained twice.
    `dirs`: the `--config-dir` folders (`cli.config.config_dirs`).
    Bad input exits 2 before any job starts, Ctrl-C 130 (resume by running it again), a refused
    or failed launch 2 or 1; a job's crash is not an exit here (`report_crashes`)."""
    if grid is None:
        sweep = dataclasses.replace(sweep, combos=[as_hydra_reads(c) for c in sweep.combos])
    view = LiveView()
    try:
        with user_errors(), write_errors():
            try:
                return se.launch_jobs(sweep, HydraLauncher(sweep.launcher, hydra_args, grid, dirs), view)
            except SweepBusy as e:
                raise UserError(str(e)) from None
            except se.SweepFolderError as e:
                raise UserError(f"--runs {sweep.runs}: {e.strerror}") from None
    except se.SweepInterrupted as e:
        err_console.print(f"interrupted; run the same command again to resume ({e.sweep_dir})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except se.LaunchFailed as e:
        if isinstance(e.error, SbatchRefused):  # the cluster refused the resources asked for
            err_console.print(
                styled(("sweep not started:", "bold red"), f" {e.error}"), highlight=False, soft_wrap=True
            )
            raise typer.Exit(EXIT_USER) from None
        err_console.print(styled(("sweep failed to launch:", "bold red"), f" {e}"))
        raise typer.Exit(EXIT_CRASH) from None


def report_crashes(done: se.Launched) -> None:
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


class LiveView(Observer):
    """The engine's observer on the terminal: its notices, and its jobs' progress while they run.

    On a terminal: a live table, a row per job with its epoch, last grad norm, verdict so far,
    elapsed time and ETA, as wide as the terminal from its first frame. Elsewhere (a CI log): a
    line each time a job starts, finishes an epoch or ends."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.terminal = console.is_terminal
        self.live: Live | None = None
        self.seen: dict[str, tuple[Any, ...]] = {}

    # --- what the engine tells ----------------------------------------------------------------
    def notice(self, kind: str, text: str) -> None:
        """A line about the sweep (`kind`: `sweep_engine.STARTING`, `RESUMED`, ...): the start on
        stdout, the others on stderr."""
        if kind == se.STARTING:
            console.print(styled(("stab sweep", "bold"), f" {text}"))
        elif kind in NOTICE_STYLE:
            err_console.print(styled((kind, NOTICE_STYLE[kind]), f" {text}"), highlight=False)
        else:
            err_console.print(text, markup=False, highlight=False)

    def begin(self, name: str, total: int | None, unit: str) -> None:
        """The jobs start: `total` of them."""
        self.total = total or 0
        if self.terminal:
            self.live = Live(self.render([]), console=console, refresh_per_second=2, transient=True)
            self.live.__enter__()

    def jobs(self, jobs: Sequence[Any]) -> None:
        """Every job's progress (`sweeps.JobProgress`): redraw, or print what changed."""
        if self.live is not None:
            self.live.update(self.render(jobs))
        else:
            self.print_changes(jobs)

    def end(self) -> None:
        """The jobs returned: the live table goes (the summary table follows)."""
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    # --- drawing ------------------------------------------------------------------------------
    def render(self, jobs: Sequence[Mapping[str, Any]]) -> Table:
        """The live table of `jobs`."""
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

    def print_changes(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        """Plain lines for what changed since the last call (no terminal)."""
        for j in jobs:
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
