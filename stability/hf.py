"""stab's monitor as a transformers `TrainerCallback` (optional: `pip install -e '.[transformers]'`).

    from stability.hf import StabTrainerCallback
    with StabTrainerCallback("runs", factory="my_pkg.build", config={"n_layer": 2}) as stab:
        trainer = Trainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=2),
                          train_dataset=ds, callbacks=[stab])
        trainer.train()                  # a run folder under runs/own/; stab report, show, replay run

It drives a `stability.monitor.Monitor`, so the records, the first-NaN attribution and the run
lifecycle are stab's own. The Trainer hands a callback neither the loss nor the batch, so the
callback reads both from the model's forward (a forward hook, training forwards only): the
inputs the Trainer passed (`input_ids`, `attention_mask`, `labels`, ...) are the batch, kept for
locating the first NaN and for `stab replay`, and the output's `loss` is the micro-batch's loss.
When the gradients of an optimizer step are complete (`on_pre_optimizer_step`) they are measured,
checked, clipped and recorded; a non-finite step's gradients are dropped (the optimizer skips it)
and with on_nan="stop" training stops.

- Clipping: the Trainer clips *before* `on_pre_optimizer_step`, so measured norms would be the
  clipped ones. The callback therefore takes over `max_grad_norm`: it sets the Trainer's to 0 and
  clips with the same rule (total L2 norm) at the same threshold after measuring (status.json
  and data.json say so). `clip=` sets it instead.
- Gradient accumulation (`gradient_accumulation_steps=N`): one record per optimizer step; its
  loss is the step's mean loss. When the Trainer passes `num_items_in_batch` (each micro-batch's
  loss is then its summed token loss over the step's label count), it is the mean token loss over
  the tokens the model's loss averages (`labels[..., 1:]` for a causal LM); the Trainer counts
  labels before the shift when the model's `loss_type` is not `ForCausalLM` (GPT2LMHeadModel's),
  and its gradients and logged loss are then (T-1)/T of that mean for sequences of T tokens: a
  `loss_normalisation` event gives both counts. Otherwise it is the mean of the micro-batch
  losses. A step with fewer micro-batches (an epoch's last) is said in an `accumulation_mismatch`
  event.
- The model must return its loss (`labels` in the batch): a model output without `loss` stops
  the run with a one-line error at the first step.
- A crash or Ctrl-C inside `trainer.train()`: the Trainer has no exception event, so use the
  callback as a context manager (above); the run then ends `failed` or `interrupted`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from stability.config import RunConfig
from stability.monitor import Monitor
from stability.monitor_bench import bench_setup, sync

NOT_INPUTS = ("num_items_in_batch", "return_dict", "use_cache", "output_attentions", "output_hidden_states")


def output_loss(out: Any) -> torch.Tensor | None:
    """The loss of a model output: `ModelOutput.loss`, a dict's "loss", or None."""
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return out.get("loss")
    return getattr(out, "loss", None)


def hf_loss(output: Any, batch: Any) -> torch.Tensor:
    """A factory's `loss` for a model that computes its own (labels in the batch): `output.loss`."""
    loss = output_loss(output)
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch (or give loss=)")
    return loss


def shifts_labels(model: Any) -> bool:
    """Whether the model's loss is transformers' causal-LM loss, which predicts `labels[..., 1:]`
    (position 0 is never a target), as `model.loss_function` says (GPT-2's defaults to it)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return getattr(model, "loss_function", None) is ForCausalLMLoss and not encoder_decoder


def predicted_tokens(inputs: dict[str, Any], shifts: bool) -> torch.Tensor | None:
    """The label positions a micro-batch's loss averages over (0-dim tensor, on the labels'
    device, no host sync): `shift_labels` when given, else `labels` (without position 0 when the
    loss `shifts`), not counting -100; None without labels."""
    labels = inputs.get("shift_labels")
    if not isinstance(labels, torch.Tensor):
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            return None
        if shifts:
            labels = labels[..., 1:]
    return labels.ne(-100).sum().double()


class StabTrainerCallback(TrainerCallback):
    """Keyword arguments are `Monitor`'s (clip, on_nan, config, factory, groups, val, loss, log, ...);
    `accumulate`, `epochs` and the optimizer come from the Trainer."""

    def __init__(self, runs: str = "runs", **monitor_kwargs: Any) -> None:
        self.runs, self.kwargs = runs, monitor_kwargs
        self.monitor: Monitor | None = None
        self._hook: Any = None
        self._model: Any = None
        self._said = False
        self._shifts = False  # the model's loss shifts its labels (a causal LM's)
        self._counts: list[tuple[torch.Tensor, torch.Tensor]] = []  # the first step's (counted, predicted)

    def _monitor(self) -> Monitor:
        """The run's monitor, from `on_train_begin` on.

        Raises:
            RuntimeError: the Trainer called a step event before `on_train_begin`.
        """
        if self.monitor is None:
            raise RuntimeError("StabTrainerCallback: the training did not start (on_train_begin was not called)")
        return self.monitor

    # --- the run ------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        """Open the run: a `Monitor` on the Trainer's model and optimizer, its clip taking over
        `max_grad_norm` (set to 0), and the forward hook that reads each micro-batch's loss."""
        kw = dict(self.kwargs)
        info: dict[str, Any] = {
            "trainer": {
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "max_grad_norm": args.max_grad_norm,
            }
        }
        if "clip" not in kw and args.max_grad_norm and args.max_grad_norm > 0:
            kw["clip"] = float(args.max_grad_norm)
            info["trainer"]["clip"] = (
                f"stab clips at max_grad_norm={args.max_grad_norm} after measuring; the "
                f"Trainer's own clip is set to 0 so the recorded norms are before clipping"
            )
        if kw.get("clip") is not None:
            args.max_grad_norm = 0.0
        kw.setdefault("loss", hf_loss)
        kw.setdefault("tokens", None)  # a ModelOutput is not a tensor of scores: no scream check unless given
        kw.setdefault("batch_loss", lambda batch: hf_loss(model(**batch), batch))
        self._model = model
        self._shifts = shifts_labels(model)
        self.monitor = Monitor(
            model,
            optimizer,
            self.runs,
            accumulate=args.gradient_accumulation_steps,
            epochs=max(1, int(args.num_train_epochs)),
            batch_size=args.per_device_train_batch_size,
            recorded_by="stability.hf.StabTrainerCallback",
            info=info,
            **kw,
        )
        self._hook = model.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        monitor = self.monitor
        if monitor is None or monitor.busy or not module.training or not torch.is_grad_enabled():
            return
        loss = output_loss(out)
        if loss is None:
            raise ValueError(
                "StabTrainerCallback: the model's output has no loss; stab records the loss the model "
                "computes from `labels` in the batch (give the Trainer labeled data)"
            )
        batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in NOT_INPUTS}
        if args:
            batch.update({f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)})
        items = kwargs.get("num_items_in_batch")
        if items is None:  # the model's own mean over this micro-batch
            monitor.micro_batch(loss, batch)
            return
        # The loss is this micro-batch's summed token loss over the step's label count as the Trainer
        # counted it (`counted`); the step's loss is the mean over the tokens the model's loss averages.
        counted = torch.as_tensor(items, device=loss.device).double().sum()
        predicted = predicted_tokens(kwargs, self._shifts)
        if predicted is None:  # no labels among the inputs: the Trainer's count is all there is
            predicted = counted / monitor.accumulate
        monitor.micro_batch(loss.double() * counted / predicted.clamp(min=1), batch, items=predicted)
        if not self._said:
            self._counts.append((counted, predicted))

    # --- per optimizer step -------------------------------------------------------------------
    def _say_normalisation(self) -> None:
        """The first step with num_items_in_batch: how the Trainer normalised its loss, against the
        tokens the model's loss averages (one host read, once)."""
        counted = int(self._counts[0][0])
        predicted = int(sum(int(p) for _, p in self._counts))
        self._said, self._counts = True, []
        monitor = self.monitor
        if monitor is None:
            return
        note = (
            f"the Trainer passes num_items_in_batch={counted}: each micro-batch's loss is its summed token loss "
            f"over that count; stab records the step's mean token loss (over the {predicted} tokens the model's "
            f"loss averages)"
        )
        if predicted != counted:
            note += (
                f". The two counts differ (the Trainer counts labels before a causal LM's shift when the model's "
                f"loss_type is not ForCausalLM): the gradients and the Trainer's logged loss are "
                f"{predicted}/{counted} of the mean"
            )
        monitor.writer.event(
            {
                "event": "loss_normalisation",
                "step": monitor.global_step,
                "num_items_in_batch": counted,
                "predicted_tokens": predicted,
                "note": note,
            }
        )

    # --- per optimizer step -------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """The step's gradients are complete: measure, check, clip and record them; a non-finite
        step's gradients are dropped, and with on_nan="stop" training stops."""
        monitor = self._monitor()
        if self._counts:
            self._say_normalisation()
        if not monitor.before_optimizer_step():
            (optimizer or monitor.opt).zero_grad(set_to_none=True)  # no gradients: the step leaves the weights
            if monitor.should_stop:
                control.should_training_stop = True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the epoch: its record, validation, scream check and health (`Monitor.end_epoch`)."""
        if self.monitor is not None:
            self.monitor.end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the forward hook; write the summary and the final status."""
        self._remove_hook()
        if self.monitor is not None and self.monitor.summary is None:
            self.monitor.close()

    # --- a crash ------------------------------------------------------------------------------
    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> StabTrainerCallback:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self._remove_hook()
        if self.monitor is not None and self.monitor.summary is None:
            if error is None:
                self.monitor.close()
            else:
                self.monitor.fail(error)


class _Timer(TrainerCallback):
    """Times a `train()`'s optimizer steps from the start of step `warm` to the end of its last
    (start-up, the first `warm` steps and teardown are not timed)."""

    def __init__(self, warm: int, device: torch.device) -> None:
        self.warm, self.device = warm, device
        self.t0 = self.t1 = 0.0
        self.steps = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warm:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > self.warm:
            sync(self.device)
            self.t1, self.steps = time.perf_counter(), self.steps + 1


class _WithLoss(torch.nn.Module):
    """The configured workload as a model the Trainer can train: `forward(step)` returns
    `{"loss": ...}` of the next of the fixed batches (the Trainer's batch is only a counter)."""

    def __init__(self, work: Any, batches: list[Any]) -> None:
        super().__init__()
        self.work, self.net, self.batches, self.calls = work, work.model, batches, 0

    def forward(self, step: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return {"loss": self.work.loss(batch)}


def bench(cfg: RunConfig, steps: int = 60, rounds: int = 4, warm: int = 2) -> dict[str, Any]:
    """What the callback costs: the configured model (`stab bench --monitor OVERRIDES`) returning
    its loss as a transformers model does (8 fixed batches, AdamW as stab's, a constant lr),
    trained by the `Trainer` without and with `StabTrainerCallback`, from the same init. Clipping
    at `train.clip` is the Trainer's `max_grad_norm` in both arms (the callback takes it over).
    The arms alternate over `rounds` `train()` calls of steps / rounds timed optimizer steps each;
    start-up, the first `warm` steps and teardown are not timed. Needs `accelerate`. Returns
    steps/s of each and their ratio; the run folders go to a temporary folder."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from stability.workloads import make_optimizer

    tc = cfg.train
    copies, batches, device, n_groups = bench_setup(cfg, ("bare", "callback"))
    models = {arm: _WithLoss(w, batches) for arm, w in copies.items()}
    per_fit = max(1, steps // rounds)
    data = [{"step": i} for i in range(per_fit + warm)]
    spent, done = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0)
    with tempfile.TemporaryDirectory(prefix="stab-bench-trainer-") as tmp:
        for r in range(rounds):
            for arm in ("bare", "callback") if r % 2 == 0 else ("callback", "bare"):  # who goes first alternates
                model = models[arm]
                model.calls = 0
                args = TrainingArguments(
                    output_dir=str(Path(tmp) / "out"),
                    per_device_train_batch_size=1,
                    max_steps=per_fit + warm,
                    max_grad_norm=tc.clip or 0.0,
                    report_to=[],
                    save_strategy="no",
                    logging_strategy="no",
                    use_cpu=device.type == "cpu",
                    dataloader_num_workers=0,
                    disable_tqdm=True,
                )
                opt = make_optimizer(model.net, tc)[0]
                timer = _Timer(warm, device)
                cb = StabTrainerCallback(tmp) if arm == "callback" else None
                trainer = Trainer(
                    model=model,
                    args=args,
                    train_dataset=data,
                    optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                    callbacks=[timer, *([cb] if cb else [])],
                )
                trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, each fit
                trainer.train()
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
