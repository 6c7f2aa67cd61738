"""`stab run [--runs DIR] [OVERRIDES...]`: train one configuration and print its verdict.

    stab run                                   # default preset, about a minute on 2 CPU cores
    stab run preset=smoke norm=pre residual=0.3 clip=5
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (DEBUG, EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USER, check_writable, console, err_console, fmt,
                        graceful_signals,
                        styled, user_errors, verdict_text, write_errors)
from cli.config import UserError, compose_run, set_config_dirs
from stability.errors import DataError, StorageError, storage_error
from stability.preflight import preflight
from stability.rundirs import create_unique, folder_name
from stability.storage import read_json


def run(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Hydra overrides, e.g. norm=pre residual=0.3 clip=5")] = None,
    runs: Annotated[Path, typer.Option("--runs", help="Folder the run folder is created in.")] = Path("runs"),
    config_dir: Annotated[Optional[list[Path]], typer.Option("--config-dir", help="A folder of your own config groups (e.g. model/my_transformer.yaml), searched after stab's conf/; repeatable.")] = None,
) -> None:
    """Train one configuration and write its run folder."""
    overrides = list(overrides or [])
    with user_errors():
        set_config_dirs(config_dir)
        cfg = compose_run(overrides)
        from cli.launch import with_declared_grid

        grid = with_declared_grid(overrides)[len(overrides):]
        if grid:  # e.g. experiment=story: its grid is under hydra.sweeper.params, which only a sweep reads
            raise UserError(f"{' '.join(o for o in overrides if o.startswith(('experiment=', '+experiment=')))} declares "
                            f"a sweep grid ({' '.join(grid)}): run it with `stab sweep {' '.join(overrides)}`")
        check_writable(runs)
        preflight(cfg)
    with write_errors():
        try:  # a folder of its own, even for the same overrides in the same second
            run_dir = create_unique(runs / "run", f"{time.strftime('%Y%m%d-%H%M%S')}_{folder_name(overrides)}")
        except OSError as e:
            raise StorageError(e.filename or runs / "run", e) from e
    console.print(styled(("stab run", "bold"), f" {' '.join(overrides) or '(defaults)'} -> {run_dir}"))
    from cli.progress import RichProgress, reporter
    from stability import training
    from stability.progress import reporting

    try:
        with graceful_signals(), reporting(reporter(console)):
            summary = training.run(cfg, run_dir, overrides, RichProgress(console))
    except KeyboardInterrupt:
        err_console.print(f"interrupted; status and metrics so far are in {run_dir}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except DataError as e:  # found once the data were decoded or encoded (constant latents): bad input
        if DEBUG["on"]:
            raise
        err_console.print(styled(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER) from None
    except Exception as e:
        if storage_error(e):  # a full disk: one line; status.json says failed where it could be written
            with write_errors():
                raise storage_error(e) from None
        if DEBUG["on"]:
            raise
        err_console.print(styled(("crashed:", "bold red"), f" {type(e).__name__}: {e}\n"
                                 f"traceback in {run_dir / 'status.json'} (or run with stab --debug)"))
        raise typer.Exit(EXIT_CRASH) from None
    s = summary
    nan = s["first_nan"]
    console.print(styled("verdict: ", verdict_text(s["verdict"]), f"  {s['evidence']}"))
    for f in s.get("flags", [])[1:]:  # the first is the verdict's own evidence
        console.print(f"  also {f['flag']}: {f['evidence']}")
    for w in s.get("warnings", []):
        console.print(f"  warning: {w['message']}", style="yellow")
    console.print(f"grad norm by epoch: {', '.join(fmt(v) for v in s['grad_norm_by_epoch'])}   "
                  f"final loss {fmt(s['final_loss'])}   val {fmt(s['final_val_loss'])}")
    if nan:
        console.print(f"first NaN: epoch {nan['epoch']} batch {nan['batch']} (step {nan['step']}) in {nan['module']}")
    notes = read_json(run_dir / "data.json") if (run_dir / "data.json").exists() else {}
    for check in ("scream", "health"):  # a custom model's checks stab could not set up, and why
        if str(notes.get(check, "")).startswith("not available"):
            console.print(f"{check} check: {notes[check]}", highlight=False)
    data = f"codec: {s['codec']['weights']}  latent scale x{fmt(s['latent_scale'])}  " if s.get("codec") else ""
    console.print(f"{data}wall {s['wall_s']:.1f} s   run folder: {run_dir}")

