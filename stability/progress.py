"""Progress of the library's long phases, reported to whoever listens, with no front end here.

Encoding latents, calibrating codebooks, checking audio files and drawing report plots can take
seconds to minutes. They report through `phase` to the `stability.observe.Observer` that the CLI
installs with `reporting` (a Rich bar with rate and ETA on a terminal, a line per phase in a CI
log): its `begin`, `advance` and `end`. With none installed, reporting costs a function call.
`stability/` imports no Rich.

    with phase("encoding latents", total=72, unit="clips") as p:
        for chunk in chunks:
            ...
            p.advance(len(chunk))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from stability.observe import Observer


class Phase:
    """The handle `phase` yields: `advance(n)` reports `n` more items done."""

    def __init__(self, reporter: Observer) -> None:
        self._reporter = reporter

    def advance(self, n: int = 1) -> None:
        """`n` more items of this phase are done."""
        self._reporter.advance(n)


_reporters: list[Observer] = [Observer()]


@contextlib.contextmanager
def reporting(reporter: Observer) -> Iterator[Observer]:
    """Send the phases started inside this block to `reporter` (phases may nest: it keeps a stack)."""
    _reporters.append(reporter)
    try:
        yield reporter
    finally:
        _reporters.remove(reporter)


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Phase]:
    """A long phase of the library: `total` items of `unit` (None: not counted), reported to
    the observer installed with `reporting`."""
    reporter = _reporters[-1]
    reporter.begin(name, total, unit)
    try:
        yield Phase(reporter)
    finally:
        reporter.end()
