"""stab's monitor as a PyTorch Lightning callback (optional: `pip install -e '.[lightning]'`).

    from stability.lightning import StabCallback
    trainer = pl.Trainer(max_epochs=5, callbacks=[StabCallback("runs", loss=loss_fn, val=(x_val, y_val))])
    trainer.fit(module, loader)          # a run folder under runs/own/; stab report runs

The same records as `stability.monitor.Monitor` (which it drives): the loss from
`on_before_backward`, the gradients measured, checked and clipped in `on_before_optimizer_step`
(a non-finite step's gradients are dropped, so the optimizer skips it, and with on_nan="stop" the
trainer stops), the epoch's validation, scream check and health at each training epoch's end.
One optimizer and one step per batch (no gradient accumulation).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from stability.monitor import Monitor


class StabCallback(pl.Callback):
    """Keyword arguments are `Monitor`'s (loss, val, clip, on_nan, config, factory, groups, ...)."""

    def __init__(self, runs: str = "runs", **monitor_kwargs: Any) -> None:
        self.runs, self.kwargs = runs, monitor_kwargs
        self.monitor: Monitor | None = None
        self._loss: torch.Tensor | None = None

    def _monitor(self) -> Monitor:
        if self.monitor is None:
            raise RuntimeError("StabCallback: the training did not start (on_train_start was not called)")
        return self.monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor = Monitor(pl_module, trainer.optimizers[0], self.runs, epochs=max(1, trainer.max_epochs or 1),
                               **self.kwargs)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        monitor = self._monitor()
        if self._loss is None:
            raise RuntimeError("StabCallback: no loss reached on_before_backward before the optimizer step")
        if not monitor.after_backward(self._loss):
            optimizer.zero_grad(set_to_none=True)  # no gradients: the step leaves the weights as they were
            trainer.should_stop = trainer.should_stop or monitor.should_stop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor().end_epoch()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor().close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None and self.monitor.summary is None:
            self.monitor.fail(exception)
