"""The `stab` command: wires one module per command, nothing else.

    stab run preset=smoke norm=pre
    stab sweep residual=0.1,0.3 norm=pre,post
    stab margin norm=pre,post residual=0.1,0.3
    stab doctor runs/run/<folder> --try
    stab report runs/
"""

from __future__ import annotations

import gc
from typing import Annotated

import typer

from cli.common import DEBUG, route_library_warnings

from cli import cache as cache_cmd
from cli import data as data_cmd
from cli import doctor as doctor_cmd
from cli import margin as margin_cmd
from cli import bench as bench_cmd
from cli import probe as probe_cmd
from cli import replay as replay_cmd
from cli import report as report_cmd
from cli import run as run_cmd
from cli import show as show_cmd
from cli import sweep as sweep_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Training-stability ablations of transformers: sweep stabilizers, record "
                       "gradients, find the first NaN and the scream.")
app.command("run")(run_cmd.run)
app.command("sweep")(sweep_cmd.sweep)
app.command("margin")(margin_cmd.margin)
app.command("doctor")(doctor_cmd.doctor)
app.command("report")(report_cmd.report)
app.command("show")(show_cmd.show)
app.command("replay")(replay_cmd.replay)
app.add_typer(probe_cmd.app, name="probe")
app.command("bench")(bench_cmd.bench)
app.add_typer(data_cmd.app, name="data")
app.add_typer(cache_cmd.app, name="cache")


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    """Training-stability ablations of transformers."""
    DEBUG["on"] = debug
    route_library_warnings()


def main() -> None:
    try:
        app()
    finally:
        # Everything torch and Hydra built stays referenced until exit; freezing it spares the
        # interpreter's last garbage-collector pass over all of it (about 0.5 s per command).
        gc.freeze()


if __name__ == "__main__":
    main()
