"""What every command shares: the Rich console, user-error handling, verdict colours."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import typer
from rich.console import Console

from cli.config import UserError
from stability.codec import CodecError
from stability.config import ConfigError

console = Console(width=int(os.environ["STAB_WIDTH"]) if os.environ.get("STAB_WIDTH") else None)
err_console = Console(stderr=True, width=console.width if os.environ.get("STAB_WIDTH") else None)

EXIT_CRASH = 1  # a job crashed (internal error)
EXIT_USER = 2  # bad input: nothing was started
EXIT_INTERRUPTED = 130

VERDICT_STYLE = {"stable": "green", "exploding": "yellow", "nan": "bold red", "scream": "magenta",
                 "failed": "bold white on red", "running": "cyan", "interrupted": "yellow", "?": "dim"}


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except (UserError, ConfigError, CodecError) as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER) from None


def verdict_markup(v: str) -> str:
    return f"[{VERDICT_STYLE.get(v, 'white')}]{v}[/]"


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers for tables: NaN and inf shown as such, never blank or zero."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)
