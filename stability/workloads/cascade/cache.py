"""The latent cache on disk: where it is, its entries' format, and the entries listed and cleared.

An entry is RUN-independent: `latents/KEY.pt` (the tensors and a JSON meta with their digest)
under `data.cache_dir` ($STAB_CACHE, else ~/.cache/stab), with a JSON sidecar saying what it
holds (`stab cache ls`). It is written to a temporary file and renamed under a file lock, so the
jobs of a sweep that start together encode once and never read a half-written entry; an entry
whose digest does not match is rebuilt, never trained on. What goes into an entry and its key is
`data.py`'s.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from stability.config import DataConfig
from stability.errors import StorageError
from stability.storage import atomic_write_bytes, atomic_write_text, dumps, loads

CACHE_FORMAT = 2  # an entry's layout; part of every key, so a new layout never reads an old entry


def default_cache_root() -> Path:
    """Where latents are cached: $STAB_CACHE, else ~/.cache/stab."""
    return Path(os.environ.get("STAB_CACHE") or Path.home() / ".cache" / "stab")


def cache_root(cfg: DataConfig) -> Path:
    """The cache folder of a configuration: `data.cache_dir` (with ~ expanded), else the default."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names and bytes, in name order: what an entry's meta records."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def load_entry(path: Path) -> dict[str, Any] | None:
    """The cache entry at `path`, or None if it is missing or corrupt."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        meta = loads(entry["meta"])
        if digest(entry["tensors"]) != meta["digest"]:
            return None
        return entry
    except Exception:  # truncated, not a torch file, wrong structure: rebuild
        return None


def write_entry(path: Path, entry: dict[str, Any]) -> None:
    """Write the entry and its sidecar atomically (temporary file, then rename); hold the lock.

    Serialized in memory first: torch's zip writer reports a full disk as "unexpected pos",
    while a plain file write names the cause (StorageError: path and "no space left on device").
    """
    buf = io.BytesIO()
    torch.save(entry, buf)
    atomic_write_bytes(path, buf.getvalue())
    meta = loads(entry["meta"])
    meta.pop("digest")
    atomic_write_text(path.with_suffix(".json"), dumps(meta, indent=2) + "\n")


def entry_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The entry at `path`, else `build()` written there under the entry's file lock (another
    process that built it meanwhile is read instead). Returns (entry, hit: read, not built).
    Raises StorageError when the cache folder or its lock cannot be made or written."""
    hit = True
    entry = load_entry(path)
    if entry is None:
        lock = FileLock(str(path) + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError as e:  # the cache folder or its lock file cannot be created
            raise StorageError(e.filename or lock.lock_file, e) from e
        try:
            entry = load_entry(path)  # another process may have written it while we waited
            if entry is None:
                hit = False
                entry = build()
                write_entry(path, entry)
        finally:
            lock.release()
    return entry, hit


@dataclass
class CacheEntry:
    """One entry as `stab cache ls` shows it: its key, file, size (bytes), last write and sidecar."""

    key: str
    path: Path
    bytes: int
    modified: float  # time.time() of the last write
    meta: dict[str, Any] | None  # the sidecar (None: missing or unreadable)

    def describe(self) -> str:
        """One line: what the entry holds."""
        m = self.meta
        if not m:
            return "?"
        src, segs = m.get("source", {}), f"{m.get('n_train')}+{m.get('n_val')}"
        secs = src.get("segment_seconds")
        what = (
            f"folder {src.get('path')}: {src.get('pairs')} pairs, {segs} segments x {secs:g} s"
            if src.get("kind") == "folder"
            else f"synthetic seed {src.get('seed')}: {segs} clips x {secs:g} s"
        )
        weights = m.get("codec", {}).get("weights", "?")
        return f"{what}; EnCodec {Path(weights).name if '/' in str(weights) else weights}"


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The latent cache's entries, newest first."""
    folder = (root or default_cache_root()) / "latents"
    out = []
    for p in folder.glob("*.pt") if folder.is_dir() else ():
        try:
            st = p.stat()
        except FileNotFoundError:  # cleared meanwhile
            continue
        try:
            meta = loads(p.with_suffix(".json").read_text())
        except (OSError, ValueError):
            meta = None
        out.append(CacheEntry(p.stem, p, st.st_size, st.st_mtime, meta))
    return sorted(out, key=lambda e: -e.modified)


def clear_cache(
    root: Path | None = None, keys: Iterable[str] = (), older_than_s: float | None = None
) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove entries: those whose key starts with one of `keys`, those older than `older_than_s`,
    or (neither given) all. An entry another process holds the lock of (it is being written) is
    left alone. Returns (removed, busy)."""
    keys = list(keys)
    now = time.time()
    removed, busy = [], []
    for e in cache_entries(root):
        if keys and not any(e.key.startswith(k) for k in keys):
            continue
        if older_than_s is not None and now - e.modified < older_than_s:
            continue
        lock = FileLock(str(e.path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            busy.append(e)
            continue
        try:
            for p in (e.path, e.path.with_suffix(".json"), *e.path.parent.glob(f".{e.key}.*.tmp")):
                p.unlink(missing_ok=True)
        finally:
            lock.release()
        Path(str(e.path) + ".lock").unlink(missing_ok=True)
        removed.append(e)
    return removed, busy
