"""`stab cache ls | clear`: the latent cache that runs and sweeps share ($STAB_CACHE, default
~/.cache/stab).

    stab cache ls
    stab cache clear                     # every entry
    stab cache clear 57ee1333            # entries whose key starts with this (see `ls`)
    stab cache clear --older-than 7d     # entries not written in the last 7 days

An entry that another process is writing (its lock is held) is left alone. A cleared entry is
encoded again by the next run that needs it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import check_not_a_file, console, err_console, styled, user_errors
from cli.config import UserError

app = typer.Typer(no_args_is_help=True, help="The latent cache shared by runs and sweeps.")

DirOption = Annotated[
    Path | None, typer.Option("--dir", help="Cache folder (default: $STAB_CACHE, else ~/.cache/stab).")
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise UserError(
            f"--older-than {text!r} is not allowed: expected a number and a unit, e.g. 90s, 30m, 12h, 7d, 2w"
        )
    return float(m[1]) * _UNITS[m[2]]


def cache_root(cache_dir: Path | None) -> Path:
    """The cache folder: --dir, else $STAB_CACHE, else ~/.cache/stab. Raises UserError (one line)
    when it names a file: it is no cache, and a listing of it would say "no cache entries"."""
    import os

    from stability.workloads.cascade.data import default_cache_root

    root = cache_dir or default_cache_root()
    check_not_a_file(
        root, "--dir" if cache_dir else "STAB_CACHE" if os.environ.get("STAB_CACHE") else "the cache folder"
    )
    return root


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units: "512 B", "3.4 MB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_age(seconds: float) -> str:
    """An age in the largest whole unit: "2.5 d", "3.0 h", "12.0 m", "40 s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@app.command("ls")
def ls(cache_dir: DirOption = None) -> None:
    """Every entry: key, size, age and what it holds."""
    from stability.workloads.cascade.data import cache_entries

    with user_errors():
        root = cache_root(cache_dir)
    entries = cache_entries(root)
    if not entries:
        console.print(f"no cache entries in {root}", highlight=False)
        return
    now = time.time()
    t = Table(title=f"{len(entries)} latent cache entries, {human_bytes(sum(e.bytes for e in entries))}, in {root}")
    for col, right in (("key", False), ("size", True), ("age", True), ("holds", False)):
        t.add_column(col, justify="right" if right else "left", overflow="fold")
    for e in entries:
        t.add_row(e.key, human_bytes(e.bytes), human_age(now - e.modified), e.describe())
    console.print(t)


@app.command("clear")
def clear(
    keys: Annotated[list[str] | None, typer.Argument(help="Keys (or key prefixes) to remove; none: all.")] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Only entries older than this: 90s, 30m, 12h, 7d, 2w.")
    ] = None,
    cache_dir: DirOption = None,
) -> None:
    """Remove entries: all, those with the given keys, or those older than an age."""
    from stability.workloads.cascade.data import cache_entries, clear_cache

    with user_errors():
        root = cache_root(cache_dir)
        age = parse_age(older_than) if older_than is not None else None
        if keys:
            known = [e.key for e in cache_entries(root)]
            unknown = [k for k in keys if not any(key.startswith(k) for key in known)]
            if unknown:
                raise UserError(f"no cache entry in {root} has a key starting with {unknown[0]!r}; see `stab cache ls`")
    removed, busy = clear_cache(root, keys or (), age)
    console.print(
        f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
        f"({human_bytes(sum(e.bytes for e in removed))}) from {root}",
        highlight=False,
    )
    for e in busy:
        err_console.print(styled((f"left {e.key}", "yellow"), ": another process is writing it"), highlight=False)
