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

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli import launch
from cli.common import console, err_console, fmt, seconds, user_errors, verdict_text
from cli.config import UserError, config_dirs, shell_command
from cli.sweepview import report_crashes, run_jobs
from stability.sweep_engine import Sweep

__all__ = ["summary_table", "sweep"]


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
    done = run_jobs(Sweep(runs, name, launcher, combos, jobs, overrides), hydra_args, grid=task_args, dirs=dirs)
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
                title=rep.ANSWER_TITLE,
            )
        )
    console.print(result.sentence, style="bold", markup=False, highlight=False)
    console.print(
        f"report: {result.out / 'report.md'} ({shell_command('stab', 'report', sweep_dir)} for every table)",
        markup=False,
        highlight=False,
    )


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
