"""The `stab` command: wires one module per command, nothing else.

    stab run preset=smoke norm=pre
    stab sweep residual=0.1,0.3 norm=pre,post
    stab report runs/
"""

from __future__ import annotations

import typer

from cli import run as run_cmd
from cli import sweep as sweep_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Training-stability ablations of transformers: sweep stabilizers, record "
                       "gradients, find the first NaN and the scream.")
app.command("run")(run_cmd.run)
app.command("sweep")(sweep_cmd.sweep)


@app.callback()
def root() -> None:
    """Training-stability ablations of transformers."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
