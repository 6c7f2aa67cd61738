"""stab's monitor as a PyTorch Lightning callback (optional: `pip install -e '.[lightning]'`).

    from stability.lightning import StabCallback
    trainer = pl.Trainer(max_epochs=5, accumulate_grad_batches=2,
                         callbacks=[StabCallback("runs", loss=loss_fn, val=(x_val, y_val))])
    trainer.fit(module, loader)          # a run folder under runs/own/; stab report runs

It drives a `stability.monitor.Monitor`, so the records, the first-NaN attribution and the run
lifecycle are stab's own: each training batch is kept (`on_train_batch_start`) with its loss
(`on_before_backward`), and when the (accumulated) gradients are complete
(`on_before_optimizer_step`, before Lightning's own clipping) they are measured, checked, clipped
(`clip=`) and recorded as one optimizer step. A non-finite step's gradients are dropped, so the
optimizer skips it, and with on_nan="stop" the trainer stops; the step's batches are re-run to
locate the first non-finite module and one is saved for `stab replay`.

Gradient accumulation (`accumulate_grad_batches=N`): Lightning backpropagates loss / N; stab
records the optimizer step's loss as the mean of its micro-batches' own losses (the loss Lightning
was given times N), once per optimizer step. A step with fewer micro-batches (an epoch's last) is
said in an `accumulation_mismatch` event. Locating re-runs a batch with `loss=` (loss(module(x),
y)) when given, else with the module's own `training_step`. A crash or Ctrl-C inside `fit` ends
the run `failed` or `interrupted` (`on_exception`).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from stability.monitor import Monitor


def _loss_of(out: Any) -> torch.Tensor:
    """The loss of a `training_step`'s return value (a tensor, or a dict with "loss")."""
    return out["loss"] if isinstance(out, dict) else out


class StabCallback(pl.Callback):
    """Keyword arguments are `Monitor`'s (loss, val, clip, on_nan, config, factory, groups, ...);
    `accumulate` and `epochs` come from the trainer."""

    def __init__(self, runs: str = "runs", **monitor_kwargs: Any) -> None:
        self.runs, self.kwargs = runs, monitor_kwargs
        self.monitor: Monitor | None = None
        self._batch: Any = None
        self._scale = 1

    def _monitor(self) -> Monitor:
        if self.monitor is None:
            raise RuntimeError("StabCallback: the training did not start (on_train_start was not called)")
        return self.monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"StabCallback: the module has {len(trainer.optimizers)} optimizers; stab records one "
                f"optimizer step per batch and supports exactly one"
            )
        self._scale = trainer.accumulate_grad_batches
        kwargs = dict(self.kwargs)
        if kwargs.get("loss") is None:  # locate by the module's own training_step
            kwargs["batch_loss"] = lambda batch: _loss_of(pl_module.training_step(batch, 0))
        self.monitor = Monitor(
            pl_module,
            trainer.optimizers[0],
            self.runs,
            epochs=max(1, trainer.max_epochs or 1),
            accumulate=self._scale,
            recorded_by="stability.lightning.StabCallback",
            **kwargs,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.monitor is not None and not self.monitor.busy:
            self.monitor.micro_batch(loss * self._scale, self._batch)  # Lightning's loss is divided by N

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        monitor = self._monitor()
        if not monitor.before_optimizer_step():
            optimizer.zero_grad(set_to_none=True)  # no gradients: the step leaves the weights as they were
            trainer.should_stop = trainer.should_stop or monitor.should_stop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor().end_epoch()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor().close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None and self.monitor.summary is None:
            self.monitor.fail(exception)
