"""Errors that mean bad input, not a bug: the CLI prints their message and exits with status 2.

They live here, apart from the torch code that raises them, so the CLI can catch them without
importing torch (`stab --help` and a sweep's own process stay light).
"""

from __future__ import annotations

import errno


class DataError(ValueError):
    """The data folder, or a file in it, cannot be used. The message names the file."""


class CodecError(RuntimeError):
    """The requested EnCodec weights cannot be had."""


class StorageError(OSError):
    """A file could not be written (a full disk, a read-only or vanished folder). The message
    names the path and the cause in one line: `cannot write runs/x/status.json: no space left on
    device`. The CLI prints it and exits with status 1."""

    def __init__(self, path: object, cause: OSError) -> None:
        reason = (cause.strerror or str(cause)).lower() if isinstance(cause, OSError) else str(cause)
        super().__init__(getattr(cause, "errno", None), f"cannot write {path}: {reason}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror or ""


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # the disk, not the code


def storage_error(e: BaseException) -> StorageError | None:
    """`e` as a StorageError if it is a failed write (full disk, quota, read-only), else None."""
    if isinstance(e, StorageError):
        return e
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return StorageError(e.filename or "?", e)
    return None
