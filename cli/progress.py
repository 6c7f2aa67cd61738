"""Progress on the terminal, and in logs when there is none: two `stability.observe.Observer`s.

`RichProgress` follows one run's training (bars over epochs and batches, with ETA; the observer
`stab run` gives `stability.training.run`); `reporter` renders the library's phases
(`stability.progress`: encoding latents, calibrating codebooks, checking audio, evaluating,
drawing plots). On a terminal both are Rich bars with rate and ETA; when stdout is not a terminal
(a CI log, a pipe) they print one plain line per phase and per epoch instead, so a long job is
never silent."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cli.common import fmt, seconds, styled
from stability.observe import Observer

PLAIN_MIN_S = 2.0  # a phase without a total gets its plain line only if it took this long


class RateColumn(ProgressColumn):
    """Items per second in the task's own unit (`fields['unit']`)."""

    def render(self, task: Task) -> Text:
        """The task's rate, e.g. "4.2 clips/s"; empty before it has one."""
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.3g} {task.fields.get('unit', 'it')}/s" if speed else "", style="cyan")


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class TerminalReporter(Observer):
    """The library's phases as Rich bars (a spinner-less bar for phases without a total)."""

    def __init__(self, console: Console) -> None:
        self.progress = _bar(console)
        self.tasks: list[Any] = []

    def begin(self, name: str, total: int | None, unit: str) -> None:
        """A bar for the phase (the display starts with the first one)."""
        if not self.tasks:
            self.progress.start()
        self.tasks.append(self.progress.add_task(name, total=total, unit=unit, info=""))

    def advance(self, n: int = 1) -> None:
        """Advance the innermost phase's bar by `n`."""
        if self.tasks:
            self.progress.advance(self.tasks[-1], n)

    def end(self) -> None:
        """Remove the innermost bar (the display stops with the last one)."""
        self.progress.remove_task(self.tasks.pop())
        if not self.tasks:
            self.progress.stop()


class PlainReporter(Observer):
    """A line when a counted phase starts and one when any phase ends (with its rate), for logs."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.stack: list[dict[str, Any]] = []

    def begin(self, name: str, total: int | None, unit: str) -> None:
        """A counted phase prints "NAME: TOTAL UNIT ..." now; every phase is timed."""
        self.stack.append({"name": name, "total": total, "unit": unit, "done": 0, "t0": self.clock()})
        if total is not None:
            self.console.print(f"{name}: {total} {unit} ...", highlight=False)

    def advance(self, n: int = 1) -> None:
        """Count `n` more items of the innermost phase."""
        if self.stack:
            self.stack[-1]["done"] += n

    def end(self) -> None:
        """Print "NAME: N UNIT done in T (R UNIT/s)"; an uncounted phase only if it took PLAIN_MIN_S or more."""
        p = self.stack.pop()
        took = self.clock() - p["t0"]
        if p["total"] is None and took < PLAIN_MIN_S:
            return
        rate = f" ({p['done'] / took:.3g} {p['unit']}/s)" if p["total"] is not None and took > 0 else ""
        count = f"{p['done']} {p['unit']} " if p["total"] is not None else ""
        self.console.print(f"{p['name']}: {count}done in {seconds(took)}{rate}", highlight=False)


def reporter(console: Console) -> Observer:
    """The phase observer for `console`: Rich bars on a terminal, plain lines elsewhere."""
    return TerminalReporter(console) if console.is_terminal else PlainReporter(console)


class RichProgress(Observer):
    """One run's training, an observer of `stability.training.run`: bars over epochs (with ETA)
    and batches on a terminal; on every output, a line per epoch with its loss, grad norm,
    elapsed time and ETA."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.progress = _bar(console)
        self.epochs = self.batches = TaskID(-1)  # set by start()
        self.n_epochs, self.t0 = 0, 0.0

    def start(self, epochs: int, batches: int) -> None:
        """Bars over the `epochs` epochs and each epoch's `batches` steps."""
        self.n_epochs, self.t0 = epochs, self.clock()
        self.progress.start()
        self.epochs = self.progress.add_task("epochs", total=epochs, info="", unit="epochs")
        self.batches = self.progress.add_task("batches", total=batches, info="", unit="steps")

    def step(self, rec: Mapping[str, Any]) -> None:
        """Advance the batch bar to the step's batch (`StepRecord`: 0-based); show its training loss."""
        self.progress.update(self.batches, completed=rec["batch"] + 1, info=f"loss {fmt(rec['loss'])}")

    def epoch(self, erec: Mapping[str, Any]) -> None:
        """Advance the epoch bar and print the epoch's line (`EpochRecord`): loss, val loss, grad
        norm mean and max, stage RMS (cascade), output collapse, elapsed and ETA."""
        epoch = erec["epoch"]
        self.progress.update(
            self.epochs,
            completed=epoch,
            info=f"grad norm {fmt(erec['grad_norm_mean'])}  val {fmt(erec['val_loss'])}",
        )
        self.progress.reset(self.batches)
        elapsed = self.clock() - self.t0
        eta = elapsed / epoch * (self.n_epochs - epoch) if epoch else None
        scream = ("  output collapsed", "magenta") if erec["collapsed"] else ""
        bad = erec.get("nonfinite") or 0
        skipped = f" ({bad} non-finite step{'s' if bad != 1 else ''} not stepped, not in it)" if bad else ""
        stages = f"  stage RMS {' / '.join(fmt(v) for v in erec['stage_rms'])}" if erec.get("stage_rms") else ""
        self.console.print(
            styled(
                f"epoch {epoch}/{self.n_epochs}: loss {fmt(erec['loss'])}{skipped}  val {fmt(erec['val_loss'])}  "
                f"grad norm mean {fmt(erec['grad_norm_mean'])} max {fmt(erec['grad_norm_max'])}"
                f"{stages}",
                scream,
                f"  elapsed {seconds(elapsed)}, ETA {seconds(eta)}",
            )
        )

    def close(self, state: str) -> None:
        """Stop the bars, whatever the run's end (`state`)."""
        self.progress.stop()
