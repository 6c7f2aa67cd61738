"""The `stab` command: wires one module per command, nothing else.

stab run preset=smoke norm=pre
stab sweep residual=0.1,0.3 norm=pre,post
stab margin norm=pre,post residual=0.1,0.3
stab doctor runs/run/<folder> --try
stab report runs/
stab export runs/grid --to tensorboard
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
from typing import Annotated, Any

import typer

from cli import bench as bench_cmd
from cli import cache as cache_cmd
from cli import data as data_cmd
from cli import doctor as doctor_cmd
from cli import export as export_cmd
from cli import margin as margin_cmd
from cli import probe as probe_cmd
from cli import replay as replay_cmd
from cli import report as report_cmd
from cli import run as run_cmd
from cli import show as show_cmd
from cli import sweep as sweep_cmd
from cli.common import DEBUG, ClosedStdout, flags_take_no_value, guard_stdout, route_library_warnings

flags_take_no_value()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Training-stability ablations of transformers: sweep stabilizers, record "
    "gradients, find the first NaN and the scream.",
)
app.command("run")(run_cmd.run)
app.command("sweep")(sweep_cmd.sweep)
app.command("margin")(margin_cmd.margin)
app.command("doctor")(doctor_cmd.doctor)
app.command("report")(report_cmd.report)
app.command("show")(show_cmd.show)
app.command("replay")(replay_cmd.replay)
app.command("export")(export_cmd.export)
app.add_typer(probe_cmd.app, name="probe")
app.command("bench")(bench_cmd.bench)
app.add_typer(data_cmd.app, name="data")
app.add_typer(cache_cmd.app, name="cache")


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    """Training-stability ablations of transformers."""
    DEBUG["on"] = debug
    route_library_warnings()


def user_code_importable() -> None:
    """Your own model's package (model._target_=my_pkg.build) imports from the folder you run stab
    in, as with `python -m`: the folder goes at the end of sys.path (installed packages win), and
    of PYTHONPATH, so a sweep's worker processes and cluster jobs find it too."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, cwd])


def main() -> None:
    """The `stab` entry point: run the Typer app; exit with its status (a closed stdout is not an error)."""
    user_code_importable()
    out = guard_stdout()
    ending: dict[str, Any] = {"code": 0}
    # Registered before anything the command imports (joblib, loky, torch), so it runs after
    # their exit handlers, which remove joblib's /dev/shm folders and tell loky's resource
    # tracker they are gone (killed before them, the tracker prints "leaked folder objects").
    atexit.register(_end_as_a_pipe_reader_left, out, ending)
    try:
        app()
    except SystemExit as e:
        ending["code"] = e.code
    finally:
        # Everything torch and Hydra built stays referenced until exit; freezing it spares the
        # interpreter's last garbage-collector pass over all of it (about 0.5 s per command).
        gc.freeze()
    out.flush()
    sys.exit(ending["code"])


def _end_as_a_pipe_reader_left(out: ClosedStdout, ending: dict[str, Any]) -> None:
    """The last exit handler: when the reader left (`| head`) and the work succeeded, the work is
    done and recorded; end as `seq 1 100000 | head -1` does, killed by SIGPIPE (141 in a shell),
    not with a failure status of our own. The other exit handlers and threads have run."""
    if out.closed_pipe and ending["code"] in (0, None):
        sys.stderr.flush()
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)


if __name__ == "__main__":
    main()
