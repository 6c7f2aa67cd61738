"""What every command shares: the Rich console, user-error handling, verdict colours.

The consoles parse no Rich markup: a file named `Song [live].wav`, an override value or a key
prints as it is in every error, warning, table and progress line. Styles come only from `styled`
(a `rich.text.Text` built from plain strings and (text, style) pairs), never from `[bold]` tags
inside strings, so user text cannot be read as markup however it is interpolated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from cli.config import UserError
from stability.config import ConfigError
from stability.errors import CodecError, DataError, StorageError
from stability.formatting import format_number
from stability.record import verdicts as vd


def _width() -> int | None:
    """STAB_WIDTH if set; a terminal's own width; 160 columns when output goes to a file or a CI
    log, where Rich's default of 80 would fold every wide table."""
    if os.environ.get("STAB_WIDTH"):
        return int(os.environ["STAB_WIDTH"])
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160


console = Console(width=_width(), markup=False)
err_console = Console(stderr=True, width=_width(), markup=False)


def styled(*parts: str | tuple[str, str] | Text) -> Text:
    """One line from plain strings and (text, style) pairs: `styled(("error:", "bold red"), " ", msg)`."""
    return Text.assemble(*parts)


def warn(message: str) -> None:
    """A warning on stderr, one line; `message` is printed as it is."""
    err_console.print(styled(("warning:", "yellow"), " ", message), highlight=False, soft_wrap=True)


class WarningsToConsole(logging.Handler):
    """The library's warnings (`logging.getLogger("stab.*")`, e.g. a bad file skipped under
    data.on_bad_file=skip) printed through `warn`, like the CLI's own."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print the record's message as a `warning:` line."""
        warn(record.getMessage())


def route_library_warnings() -> None:
    """Send the library's `stab.*` loggers' warnings to the console (`WarningsToConsole`)."""
    # Hydra's logging setup in an in-process sweep (dictConfig) disables the loggers that exist
    # then and raises the root's level; a later command in the same process must hear the library.
    for name, existing in logging.Logger.manager.loggerDict.items():
        if (name == "stab" or name.startswith("stab.")) and isinstance(existing, logging.Logger):
            existing.disabled = False
    logger = logging.getLogger("stab")
    logger.setLevel(logging.WARNING)  # not the root's level, which Hydra sets to ERROR
    if not any(isinstance(h, WarningsToConsole) for h in logger.handlers):
        logger.addHandler(WarningsToConsole(logging.WARNING))


class ClosedStdout:
    """sys.stdout that a closed reader cannot break: `stab sweep ... | head -2`, `stab show RUN |
    head`. The first write or flush that finds the pipe closed (EPIPE) points file descriptor 1
    at /dev/null, so later prints, child processes and the interpreter's last flush write
    nowhere, and sets `closed`; the command goes on and finishes its work. `main` then ends the
    way other Unix tools end on a closed pipe: killed by SIGPIPE (status 141 in a shell), unless
    the work itself failed, whose status wins."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.closed_pipe = False

    def _cut(self) -> None:
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no real descriptor (a test's StringIO): just stop writing
            pass

    def write(self, text: str) -> int:
        """Write `text`; once the reader has gone (a closed pipe), swallow it. Returns its length."""
        if not self.closed_pipe:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._cut()
        return len(text)

    def flush(self) -> None:
        """Flush, unless the reader has gone."""
        if not self.closed_pipe:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._cut()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, ...
        return getattr(self._stream, name)


def flags_take_no_value() -> None:
    """Help lists a flag (`--debug`, `--help`, `doctor --try`, `show --plot`) without a value type.

    Typer 0.29's Rich help prints each option's type, flags included (`--debug <bool>`), which
    reads as if the flag took a value (`--debug true` is an error). A flag's type is left out;
    options that take a value keep theirs (`--runs <path>`). Idempotent; does nothing on a Typer
    without `TyperOption.display_type_rich`."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_take_no_value", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich.flags_take_no_value = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def guard_stdout() -> ClosedStdout:
    """Wrap sys.stdout in `ClosedStdout` once (idempotent); returns the guard."""
    if not isinstance(sys.stdout, ClosedStdout):
        sys.stdout = ClosedStdout(sys.stdout)
    return sys.stdout


EXIT_CRASH = 1  # a job crashed (internal error)
EXIT_USER = 2  # bad input: nothing was started
EXIT_INTERRUPTED = 130

STATE_STYLE = {"running": "cyan", "interrupted": "yellow", "?": "dim"}  # run states shown beside verdicts


DEBUG = {"on": False}  # set by `stab --debug`: tracebacks instead of one-line errors


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> one line on stderr and exit status 2, no traceback (unless --debug)."""
    try:
        yield
    except (UserError, ConfigError, CodecError, DataError) as e:
        if DEBUG["on"]:
            err_console.print_exception()
        err_console.print(styled(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER) from None


def storage_message(e: OSError) -> str:
    """`cannot write PATH: no space left on device` for any failed write."""
    if isinstance(e, StorageError):
        return str(e)
    return str(StorageError(e.filename or "?", e))


@contextlib.contextmanager
def write_errors() -> Iterator[None]:
    """A file that cannot be written (full disk, read-only folder) -> one line naming the path
    and the cause, exit status 1. What was written before stays as it was."""
    try:
        yield
    except StorageError as e:
        if DEBUG["on"]:
            raise
        err_console.print(styled(("error:", "bold red"), f" {storage_message(e)}"), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CRASH) from None


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the run cleanly (metrics flushed, status `interrupted`); a
    second signal while that cleanup runs exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def at_once(signum: int, frame: Any) -> None:
        os._exit(EXIT_INTERRUPTED)

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, at_once)
        signal.signal(signal.SIGTERM, at_once)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGINT, first), signal.signal(signal.SIGTERM, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def check_folder(path: Path, expected: str) -> None:
    """A folder the user names (RUN, RUNS_DIR) must exist and be a folder; otherwise one line
    naming the path, what it is, and what to pass (`expected`), before any work. Raises UserError."""
    if not path.exists():
        raise UserError(f"{path}: no such folder; pass {expected}")
    if not path.is_dir():
        raise UserError(f"{path}: is a file, not a folder; pass {expected}")


RUN_FOLDER = "a run folder, e.g. runs/run/<folder> or runs/<sweep>/<job>"


def runs_inside(folder: Path) -> str:
    """ "; run folders in it: A, B, C ..." when `folder` is not a run folder but holds some (the
    user passed the sweep or runs folder), else "" (for a not-a-run-folder message)."""
    from stability import report as rep

    inside = rep.find_runs(folder) if folder.is_dir() else []
    if not inside:
        return ""
    return f"; run folders in it: {', '.join(str(p) for p in inside[:3])}{' ...' if len(inside) > 3 else ''}"


def check_not_a_file(folder: Path, option: str = "--runs") -> None:
    """A folder option that names an existing file: one line, before any work. Raises UserError."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {str(folder)!r} is a file, not a folder: pass a folder (it is created if missing)")


def check_writable(folder: Path, option: str = "--runs") -> None:
    """`--runs` (or another folder `option`) must be a folder we can create files in; say so
    before any work. Raises UserError."""
    check_not_a_file(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".stab-write-check"):
            pass
    except OSError as e:
        raise UserError(f"{option} {str(folder)!r} is not a writable folder: {e.strerror or e}") from None


def verdict_text(v: str) -> Text:
    """A verdict or run state as Rich text in its colour (`verdicts.style`)."""
    return Text(v, style=STATE_STYLE.get(v) or vd.style(v))


verdict_markup = verdict_text  # the old name: its str() is the plain verdict


def doubt_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per borderline finding that could change the run's verdict (`verdicts.in_doubt`):
    `stab run` and `stab show` print them under the verdict, so a `stable` 2% below its start or
    an `exploding` at 2.05x against 2.0 is not read as a firm answer (the report counts such runs
    apart)."""
    doubts = vd.in_doubt(summary.get("verdict"), summary.get("borderline"), summary.get("flags"))
    return [
        f"  borderline: {b.get('message') or b.get('what')}; the verdict could go either way "
        "(the report counts this run apart)"
        for b in doubts
    ]


def seconds(s: float | None) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'; '?' when unknown."""
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


fmt = format_number  # numbers for tables: NaN and inf shown as such, never blank or zero
