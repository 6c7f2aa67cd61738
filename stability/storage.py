"""Run-folder files: atomic JSON/YAML/CSV writes and append-only JSON Lines.

A killed process never leaves a half-written JSON file: whole files are written to a
temporary file in the same folder, flushed, and renamed over the old one. Streams (per-step
metrics, events) are JSON Lines appended one record per line; a reader skips a torn last line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    """Python's json writes NaN/Infinity for non-finite floats; keep them (never drop to null)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return x.item()
    return x


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(_jsonable(obj), sort_keys=False))


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one JSON object per line, in one write call."""
    lines = "".join(json.dumps(_jsonable(r), allow_nan=True) + "\n" for r in records)
    if lines:
        with open(path, "a") as f:
            f.write(lines)
            f.flush()


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON Lines file and the number of lines that did not parse (a torn tail)."""
    records, bad = [], 0
    path = Path(path)
    if not path.exists():
        return records, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad
