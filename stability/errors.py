"""Errors that mean bad input, not a bug: the CLI prints their message and exits with status 2.

They live here, apart from the torch code that raises them, so the CLI can catch them without
importing torch (`stab --help` and a sweep's own process stay light).
"""

from __future__ import annotations


class DataError(ValueError):
    """The data folder, or a file in it, cannot be used. The message names the file."""


class CodecError(RuntimeError):
    """The requested EnCodec weights cannot be had."""
