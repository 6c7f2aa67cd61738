"""`stab replay RUN`: re-run a run's first non-finite step and name where it started.

stab replay runs/sweep/norm=post,residual=0.1
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import RUN_FOLDER, check_folder, console, fmt, runs_inside, styled, user_errors
from cli.config import UserError
from stability.record import format as rf
from stability.record.folder import RunFolder


def replay(
    run: Annotated[Path, typer.Argument(help="A run folder whose run went non-finite.")],
    others: Annotated[int, typer.Option("--others", help="Other batches to try from the same state.")] = 2,
) -> None:
    """Reload the saved batch and state of the first non-finite step and re-run it with hooks."""
    from stability.replay import ReplayError
    from stability.replay import replay as replay_run

    with user_errors():
        check_folder(run, RUN_FOLDER)
        if not RunFolder(run).has(rf.CONFIG):
            raise UserError(f"{run}: not a run folder (no {rf.CONFIG}){runs_inside(run) or f'; pass {RUN_FOLDER}'}")
        try:
            r = replay_run(run, n_other=others)
        except ReplayError as e:
            raise UserError(str(e)) from None
    console.print(styled(("replay", "bold"), f" of step {r.step} (epoch {r.epoch}, batch {r.batch_index}) from {run}"))
    console.print(f"loss on replay: {fmt(r.loss)}   batch tensors finite: {r.batch_finite}")
    if r.module:
        console.print(
            styled(
                f"first non-finite {'output' if r.where == 'forward' else 'gradient'}: ",
                (r.module, "bold red"),
                f" (group {r.group}, in the {r.where} pass)",
            )
        )
    for o in r.other_batches:
        console.print(
            f"same state, batch {o['indices']}: {'finite' if o['finite'] else 'non-finite'} (loss {fmt(o['loss'])})"
        )
    console.print(f"cause: {r.cause}")
