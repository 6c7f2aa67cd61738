"""Run-folder files: atomic JSON/YAML/CSV writes and append-only JSON Lines.

A killed process never leaves a half-written JSON file: whole files are written to a
temporary file in the same folder, flushed, and renamed over the old one, with the mode any file
the user creates gets (0666 less the umask). Streams (per-step metrics, events) are JSON Lines
appended one record per line; a reader skips a torn last line.

A write that fails (a full disk, most often) raises `StorageError`, whose message names the file
and the cause. `write_status` still gets the final state out on a full disk: status files are
padded to STATUS_RESERVE bytes when written, and when a temporary file cannot be had the new
status overwrites the old one in place, in blocks the file already owns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from stability.errors import StorageError

STATUS_RESERVE = 4096  # bytes a status file keeps allocated for the final write on a full disk


def file_mode() -> int:
    """0666 less the process's umask: the mode `open()` gives a new file."""
    try:  # Linux: read it without changing it (os.umask is process-wide, not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text`, UTF-8."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`. On an error the old
    file is untouched and `StorageError` names `path` and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600; results are for sharing
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise e if isinstance(e, StorageError) else StorageError(path, e) from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


# Strict JSON has no NaN or Infinity: a non-finite float is written as one of these strings, so
# that jq, Node's JSON.parse and Python's json with parse_constant raising all read every file,
# and its kind (nan, +inf, -inf) is kept. `decode` (used by `read_json`/`read_jsonl`) turns them
# back into floats; older run folders with bare NaN/Infinity still read.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _jsonable(x: Any, strict: bool = True) -> Any:
    """Plain JSON types; with `strict`, non-finite floats as "NaN", "Infinity", "-Infinity". Any
    mapping (a dict, a frozen record of `stability.record.records`) becomes a dict."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, strict) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, strict) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        x = x.item()
    if strict and isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def decode(x: Any) -> Any:
    """What `_jsonable` wrote, back: the non-finite strings as floats, everywhere in `x`."""
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, str) and x in NONFINITE:
        return NONFINITE[x]
    return x


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of `obj` (see NONFINITE)."""
    return json.dumps(_jsonable(obj), allow_nan=False, **kw)


def loads(text: str) -> Any:
    """Parse JSON written by `dumps` (or by older stab, with bare NaN) into Python, floats restored."""
    return decode(json.loads(text))


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented strict JSON (`dumps`: non-finite floats encoded, see NONFINITE), atomically."""
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Write a status file so that the last state gets out even on a full disk.

    Padded with spaces (valid JSON) to STATUS_RESERVE bytes; if the atomic write fails, the new
    status is written into the old file's blocks in place (without a traceback that would not
    fit). Raises `StorageError` only when neither works.
    """
    text = dumps(status, indent=2) + "\n"
    try:
        atomic_write_text(path, text.ljust(STATUS_RESERVE))
    except StorageError as first:
        short = dict(status, traceback=None) if "traceback" in status else status
        for candidate in (text, dumps(short) + "\n"):
            if _overwrite_in_place(Path(path), candidate.encode()):
                return
        raise first


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """Overwrite `path` without allocating: only if `data` fits in its current size."""
    try:
        size = path.stat().st_size
        if len(data) > size:
            return False
        with open(path, "r+b") as f:
            f.write(data.ljust(size))  # same length: no new blocks, no truncation
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def read_json(path: Path) -> Any:
    """A JSON file as `loads` reads it (non-finite floats restored). Raises OSError or ValueError."""
    return loads(Path(path).read_text())


def write_yaml(path: Path, obj: Any) -> None:
    """`obj` as YAML, keys in their order, atomically."""
    atomic_write_text(path, yaml.safe_dump(_jsonable(obj, strict=False), sort_keys=False))


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records, one JSON object per line, in one write call."""
    append_text(path, "".join(dumps(r) + "\n" for r in records))


def append_text(path: Path, text: str) -> None:
    """Append `text` (whole lines) to `path`; `StorageError` names the file. A write that fails
    part-way (a full disk takes what fits, then says ENOSPC) is taken back by truncating the file
    to its length before, so every line in it stays whole: `jq` reads it after a full disk."""
    if not text:
        return
    data = memoryview(text.encode("utf-8"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # 0o666 less the umask, as open()
    except OSError as e:
        raise StorageError(path, e) from e
    try:
        start = os.fstat(fd).st_size
        while data:
            data = data[os.write(fd, data) :]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)  # frees blocks: possible on a full disk
        raise StorageError(path, e) from e
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON Lines file and the number of lines that did not parse (a torn tail)."""
    records: list[dict[str, Any]] = []
    bad = 0
    path = Path(path)
    if not path.exists():
        return records, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad
