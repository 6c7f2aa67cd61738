"""`stab export RUN_OR_SWEEP --to TARGET`: send finished runs to a tracker (or another target)
after training, through the same tracker code as `log=`; a second export sends nothing twice.

    stab export runs/run/<folder> --to tensorboard
    stab export runs/grid --to mlflow

Exit status 2 on bad input (unknown target, package missing, no run folder) before any work;
1 when some run could not be exported (each named, with why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, user_errors, warn
from cli.config import UserError


def export(
    runs: Annotated[
        Path, typer.Argument(metavar="RUN_OR_SWEEP", help="A run folder, or a folder of them (any depth).")
    ],
    to: Annotated[str, typer.Option("--to", help="Where to: tensorboard, mlflow, wandb (and any registered target).")],
    out: Annotated[Path | None, typer.Option("--out", help="For targets that write files: the folder.")] = None,
) -> None:
    """Send finished runs' records to TARGET, as if they had run with log=TARGET."""
    from stability import export as ex
    from stability.config import ConfigError

    with user_errors():
        try:
            outcomes = ex.export(runs, to, out)
        except (ValueError, ConfigError) as e:
            raise UserError(str(e)) from None
    failed = 0
    for o in outcomes:
        if o.error:
            failed += 1
            warn(f"{o.run}: {o.error}")
        else:
            console.print(f"{o.run}: {o.sent}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)
