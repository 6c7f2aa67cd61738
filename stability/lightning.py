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

import logging
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from stability.config import RunConfig
from stability.monitor import Monitor
from stability.monitor_bench import bench_setup, sync


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
        """Open the run: a `Monitor` on the module and its one optimizer (ValueError for several)."""
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
        """Keep the batch, to locate a first NaN on it and save it for `stab replay`."""
        self._batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Note the micro-batch's loss (Lightning's, undivided by the accumulation)."""
        if self.monitor is not None and not self.monitor.busy:
            self.monitor.micro_batch(loss * self._scale, self._batch)  # Lightning's loss is divided by N

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Measure, check, clip and record the step's gradients; a non-finite step's are dropped."""
        monitor = self._monitor()
        if not monitor.before_optimizer_step():
            optimizer.zero_grad(set_to_none=True)  # no gradients: the step leaves the weights as they were
            trainer.should_stop = trainer.should_stop or monitor.should_stop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the epoch (`Monitor.end_epoch`)."""
        self._monitor().end_epoch()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the summary and the final status (`Monitor.close`)."""
        self._monitor().close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """The fit raised: status `failed` (or `interrupted`), every step recorded so far kept."""
        if self.monitor is not None and self.monitor.summary is None:
            self.monitor.fail(exception)


class _Timer(pl.Callback):
    """Times a fit's steps from the start of batch `warm` to the end of its last batch (the
    fit's start-up, its first `warm` steps and its teardown are not timed)."""

    def __init__(self, warm: int, device: torch.device) -> None:
        self.warm, self.device = warm, device
        self.t0 = self.t1 = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if i == self.warm:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if i >= self.warm:
            sync(self.device)
            self.t1, self.steps = time.perf_counter(), self.steps + 1


def bench(cfg: RunConfig, steps: int = 60, rounds: int = 4, warm: int = 2) -> dict[str, Any]:
    """What the callback costs: the configured model (`stab bench --monitor OVERRIDES`) in a
    LightningModule (its loss, 8 fixed batches, AdamW as stab's), trained by `pl.Trainer` without
    and with `StabCallback`, from the same init. Clipping at `train.clip` is Lightning's
    `gradient_clip_val` in the plain arm and the callback's in the other (Lightning's would
    clip a second time). The arms alternate over `rounds` fits of steps / rounds timed steps
    each; a fit's start-up, its first `warm` steps, its epoch end and its teardown are not timed.
    Returns steps/s of each and their ratio; the callback's run folders go to a temporary folder."""
    import tempfile

    from stability.workloads import make_optimizer

    tc = cfg.train
    copies, batches, device, n_groups = bench_setup(cfg, ("bare", "callback"))

    class Lit(pl.LightningModule):
        def __init__(self, work: Any) -> None:
            super().__init__()
            self.work, self.net = work, work.model

        def training_step(self, i: Any, batch_idx: int) -> torch.Tensor:
            return self.work.loss(batches[batch_idx % len(batches)])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.net, tc)[0]

    lits = {arm: Lit(w) for arm, w in copies.items()}
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # its start-up notes, each fit
        logging.getLogger(name).setLevel(logging.WARNING)
    per_fit = max(1, steps // rounds)
    steps_data = torch.utils.data.TensorDataset(torch.arange(per_fit + warm))
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(steps_data, batch_size=None)
    spent, done = dict.fromkeys(lits, 0.0), dict.fromkeys(lits, 0)
    with tempfile.TemporaryDirectory(prefix="stab-bench-lightning-") as tmp:
        for r in range(rounds):
            for arm in ("bare", "callback") if r % 2 == 0 else ("callback", "bare"):  # who goes first alternates
                lit = lits[arm]
                timer = _Timer(warm, device)
                callbacks: list[pl.Callback] = [timer]
                if arm == "callback":
                    callbacks.append(StabCallback(tmp, clip=tc.clip))
                trainer = pl.Trainer(
                    max_epochs=1,
                    accelerator="gpu" if device.type == "cuda" else "cpu",
                    devices=1,
                    gradient_clip_val=tc.clip if arm == "bare" else None,
                    callbacks=callbacks,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                )
                with warnings.catch_warnings():  # Lightning's own deprecation notes, not the user's
                    warnings.simplefilter("ignore")
                    trainer.fit(lit, loader)
                spent[arm] += timer.t1 - timer.t0
                done[arm] += timer.steps
    bare_sps, cb_sps = done["bare"] / spent["bare"], done["callback"] / spent["callback"]
    return {
        "bare_sps": bare_sps,
        "callback_sps": cb_sps,
        "ratio": cb_sps / bare_sps,
        "steps": done["callback"],
        "fits": rounds,
        "groups": n_groups,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
