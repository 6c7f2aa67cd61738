"""Rich progress for one run: a bar over epochs and one over the epoch's batches."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import fmt, styled
from stability.training import Callbacks


class RichProgress(Callbacks):
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.epochs = self.batches = None

    def start(self, epochs: int, batches: int) -> None:
        self.progress.start()
        self.epochs = self.progress.add_task("epochs", total=epochs, info="")
        self.batches = self.progress.add_task("batches", total=batches, info="")

    def step(self, epoch: int, batch: int, loss: float) -> None:
        self.progress.update(self.batches, completed=batch + 1, info=f"loss {fmt(loss)}")

    def epoch(self, epoch: int, record: dict[str, Any]) -> None:
        self.progress.update(self.epochs, completed=epoch,
                             info=f"grad norm {fmt(record['grad_norm_mean'])}  val {fmt(record['val_loss'])}")
        self.progress.reset(self.batches)
        scream = ("  output collapsed", "magenta") if record["collapsed"] else ""
        self.console.print(styled(f"epoch {epoch}: loss {fmt(record['loss'])}  val {fmt(record['val_loss'])}  "
                           f"grad norm mean {fmt(record['grad_norm_mean'])} max {fmt(record['grad_norm_max'])}  "
                           f"stage RMS {' / '.join(fmt(v) for v in record['stage_rms'])}", scream))

    def close(self) -> None:
        self.progress.stop()
