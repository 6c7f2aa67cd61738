"""The one observer protocol: whatever watches stab's work as it happens receives it through these.

Three kinds of watcher take the same calls, each overriding what it needs (every method of
`Observer` does nothing):

- the library's long phases (encoding latents, checking audio, drawing plots): `begin`,
  `advance`, `end`, sent by `stability.progress.phase` to the observer installed with
  `stability.progress.reporting` (the CLI's bars or log lines);
- one run's records, in the order the run folder's writer writes them: `start` (the loop's size),
  `step` (a `steplayout.StepRecord`), `event` (`records.Event`), `epoch` (`records.EpochRecord`),
  `summary` (`records.Summary`), `close` (the run's final state). The writer hands every record to
  its observer, the trackers (`stability.trackers.Recorder`); the training loop
  (`stability.training.run(..., observers=...)`) hands `start`, each step and epoch record and
  `close` to its observers, on rank 0 only (the CLI's training bars, `cli.progress.RichProgress`).
  `Observers` fans calls out to several;
- a sweep (`stability.sweep_engine`): `notice` (one line about the sweep: a damaged job found, a
  configuration trained once) and `jobs` (every job's progress, read from its folder twice a
  second while the jobs run: the CLI's live view).

`stability/` holds no front end: the CLI's observers live in `cli/` (Rich), the trackers' in
`stability/trackers.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class Observer:
    """Receives stab's work as it happens (see the module docstring); every method does nothing."""

    # --- a long phase of the library (`stability.progress.phase`); phases may nest ------------
    def begin(self, name: str, total: int | None, unit: str) -> None:
        """A phase starts: `total` items of `unit` (None: not counted), e.g. ("encoding latents", 72, "clips")."""

    def advance(self, n: int = 1) -> None:
        """`n` more items of the innermost phase are done."""

    def end(self) -> None:
        """The innermost phase ended."""

    # --- one run: the records its writer writes, in order -------------------------------------
    def start(self, epochs: int, batches: int) -> None:
        """The loop starts: `epochs` epochs of `batches` optimizer steps each."""

    def step(self, rec: Mapping[str, Any]) -> None:
        """One step's record (`steplayout.StepRecord`: step, epoch, batch, loss, grad norms, ...)."""

    def event(self, ev: Mapping[str, Any]) -> None:
        """One event (`records.Event`: first_nan, grad_spike, stopped_early, ...)."""

    def epoch(self, erec: Mapping[str, Any]) -> None:
        """One epoch's record (`records.EpochRecord`: aggregates of its steps and the evaluation)."""

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The run's summary (`records.Summary`: verdict, evidence, flags, ...)."""

    def close(self, state: str) -> None:
        """The run ended in `state` (completed, failed, interrupted); nothing more comes."""

    # --- a sweep (`stability.sweep_engine`) ---------------------------------------------------
    def notice(self, kind: str, text: str) -> None:
        """One line about the sweep as a whole: `kind` says what about (`sweep_engine.RESUMED`,
        `DAMAGED`, `DUPLICATE`, `WAITING`, `STARTING`), `text` the rest."""

    def jobs(self, jobs: Sequence[Any]) -> None:
        """Every job of this launch as read from its folder (`sweeps.JobProgress`), twice
        a second while the jobs run and once after they end."""


class Observers(Observer):
    """Hands every call to each of `observers`, in order (an observer that raises stops the
    call: the trackers' `Recorder` catches its trackers' errors itself)."""

    def __init__(self, observers: Iterable[Observer | None]) -> None:
        self.observers = [o for o in observers if o is not None]

    def begin(self, name: str, total: int | None, unit: str) -> None:
        """`Observer.begin`, to each observer in turn."""
        for o in self.observers:
            o.begin(name, total, unit)

    def advance(self, n: int = 1) -> None:
        """`Observer.advance`, to each observer in turn."""
        for o in self.observers:
            o.advance(n)

    def end(self) -> None:
        """`Observer.end`, to each observer in turn."""
        for o in self.observers:
            o.end()

    def start(self, epochs: int, batches: int) -> None:
        """`Observer.start`, to each observer in turn."""
        for o in self.observers:
            o.start(epochs, batches)

    def step(self, rec: Mapping[str, Any]) -> None:
        """`Observer.step`, to each observer in turn."""
        for o in self.observers:
            o.step(rec)

    def event(self, ev: Mapping[str, Any]) -> None:
        """`Observer.event`, to each observer in turn."""
        for o in self.observers:
            o.event(ev)

    def epoch(self, erec: Mapping[str, Any]) -> None:
        """`Observer.epoch`, to each observer in turn."""
        for o in self.observers:
            o.epoch(erec)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """`Observer.summary`, to each observer in turn."""
        for o in self.observers:
            o.summary(summary)

    def close(self, state: str) -> None:
        """`Observer.close`, to each observer in turn."""
        for o in self.observers:
            o.close(state)

    def notice(self, kind: str, text: str) -> None:
        """`Observer.notice`, to each observer in turn."""
        for o in self.observers:
            o.notice(kind, text)

    def jobs(self, jobs: Sequence[Any]) -> None:
        """`Observer.jobs`, to each observer in turn."""
        for o in self.observers:
            o.jobs(jobs)
