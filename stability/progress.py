"""Progress of the library's long phases, reported to whoever listens, with no front end here.

Encoding latents, calibrating codebooks, checking audio files and drawing report plots can take
seconds to minutes. They report through `phase`; the CLI installs a `Reporter` with `reporting`
(a Rich bar with rate and ETA on a terminal, a line per phase in a CI log). With none installed,
reporting costs a function call. `stability/` imports no Rich: this is the whole protocol.

    with phase("encoding latents", total=72, unit="clips") as p:
        for chunk in chunks:
            ...
            p.advance(len(chunk))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Reporter:
    """Receives one phase at a time (phases may nest: a reporter keeps a stack); does nothing."""

    def begin(self, name: str, total: int | None, unit: str) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def end(self) -> None: ...


class Phase:
    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter

    def advance(self, n: int = 1) -> None:
        self._reporter.advance(n)


_reporters: list[Reporter] = [Reporter()]


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send the phases started inside this block to `reporter`."""
    _reporters.append(reporter)
    try:
        yield reporter
    finally:
        _reporters.remove(reporter)


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Phase]:
    reporter = _reporters[-1]
    reporter.begin(name, total, unit)
    try:
        yield Phase(reporter)
    finally:
        reporter.end()
