"""stab's instrumentation in your own training loop: the same run folder, verdict and events.

For people who keep their loop. `Monitor.step(loss)` replaces `loss.backward(); optimizer.step()`:
it backpropagates, measures the total and per-group gradient norms (one `torch._foreach_norm`,
`stability.instrument.GradProbe`), checks that every gradient is finite, clips (optionally), steps
the optimizer only on a finite step, and records the step. `Monitor.end_epoch()` runs the
validation loss, the scream check and the attention health on your validation data (as
`model=custom` does). The run folder is written by stab's own writer (`stability.record.writer`), so
`stab report`, `stab show` and `stab replay` read it like any run; the verdict and events are
available live (`monitor.verdict`, `monitor.events`).

    from stability.monitor import Monitor

    with Monitor(model, opt, runs="runs", loss=loss_fn, val=(x_val, y_val), config={"lr": 3e-3}) as monitor:
        for epoch in range(epochs):
            for x, y in loader:
                loss = loss_fn(model(x), y)
                monitor.step(loss, batch=(x, y))   # backward, measure, clip, optimizer.step
                if monitor.should_stop:            # a non-finite step under on_nan="stop"
                    break
            monitor.end_epoch()                    # validation, scream check, health
            print(monitor.verdict, monitor.events[-1:])
    print(monitor.summary["verdict"])

With `factory="my_pkg.build"` (a `model=custom` factory, called with `config`), `stab replay`
can rebuild the model and re-run the first non-finite step from the saved batch.

The monitor is stab's own step and run lifecycle, not a copy: the measurements are
`stability.step.Instruments` with the run's `StepLayout` (as in `stab run`), the first NaN is
`stability.forensics.first_nan`, the folder's lease, trackers and final status are a
`stability.session.RunSession` (Ctrl-C inside `with Monitor(...)` records `interrupted`).
Hooks for frameworks that own the backward and the step (`stability.lightning.StabCallback`,
`stability.hf.StabTrainerCallback`): `micro_batch(loss, batch)` after each backward,
`before_optimizer_step()` when the (accumulated) gradients are complete: it measures, clips and
records without stepping, and returns False for a step the framework must skip.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stability import forensics
from stability.config import (
    OWN_LOOP,
    ConfigError,
    CustomModelConfig,
    DetectConfig,
    NoDataConfig,
    RunConfig,
    TrainConfig,
)
from stability.instrument import GradProbe
from stability.rundirs import create_unique
from stability.session import RunSession
from stability.step import Instruments
from stability.workloads.custom import CustomWorkload, Task, locate

ON_NAN = ("stop", "skip")


def _check_arguments(model: nn.Module, loss: Any, val: Any, on_nan: str, accumulate: int) -> None:
    """Monitor's own arguments, before anything is built: ConfigError for validation data without a
    loss, an unknown on_nan, an accumulate that is not an integer >= 1, a model with nothing to train."""
    if val is not None and loss is None:
        raise ConfigError(
            "Monitor(val=...) needs loss=loss(output, target): the validation loss, scream check and health run it"
        )
    if on_nan not in ON_NAN:
        raise ConfigError(f"Monitor(on_nan={on_nan!r}) is not allowed: expected one of {', '.join(ON_NAN)}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(
            f"Monitor(accumulate={accumulate!r}) is not allowed: expected an integer >= 1 "
            f"(micro-batches per optimizer step)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "Monitor(model=...): the model has no trainable parameters (every parameter has "
            "requires_grad=False), so there is no gradient to measure"
        )


def _run_config(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int | None,
    clip: float | None,
    on_nan: str,
    config: dict[str, Any] | None,
    factory: str | None,
    detect: DetectConfig | None,
    log: Sequence[str],
) -> RunConfig:
    """The run's config.yaml: a `model=custom` config of `config` (or your own loop's), no data,
    the planned training (the optimizer's lr and weight decay, no warmup), the detectors, the
    trackers. ConfigError for a learning rate that is not > 0 or a bad value of the rest."""
    pgroups = optimizer.param_groups
    # the planned lr: a scheduler's `initial_lr` (a warmup has already set `lr` to its first, often 0, value)
    lr = float(pgroups[0].get("initial_lr", pgroups[0].get("lr", 1e-3)))
    if not lr > 0:
        raise ConfigError(
            f"Monitor(optimizer=...): parameter group 0 has lr={lr!r} and no scheduler's initial_lr; "
            f"expected a learning rate > 0"
        )
    train = TrainConfig(
        epochs=epochs,
        batch_size=batch_size or TrainConfig.model_fields["batch_size"].default,
        lr=lr,
        clip="none" if clip is None else clip,
        on_nan=on_nan,
        warmup=0,
        weight_decay=float(pgroups[0].get("weight_decay", 0.0)),
    )
    return RunConfig(
        model=CustomModelConfig(target=factory or OWN_LOOP, params=dict(config or {})),
        data=NoDataConfig(),
        train=train,
        detect=detect or DetectConfig(),
        log=list(log),
    )


def _new_run_dir(runs: Path, name: str) -> Path:
    """A new run folder runs/own/<time>_<name> (made unique)."""
    runs.mkdir(parents=True, exist_ok=True)
    return create_unique(runs / "own", f"{time.strftime('%Y%m%d-%H%M%S')}_{name}")


class Monitor:
    """stab's measurements around an existing model and optimizer (see the module docstring).

    Args:
        model, optimizer: yours; the optimizer steps only on finite steps.
        runs: the folder the run folder is created in (`runs/own/<time>_<name>`), or run_dir: the
            run folder itself.
        loss: loss(output, target), needed for validation, health and locating the first NaN.
        val: validation data (tensors (x, y), a Dataset): validation loss, scream check, health.
        scheduler: stepped after every optimizer step (a per-step schedule), or None.
        clip: total gradient-norm clipping threshold, or None.
        on_nan: "stop" (`should_stop` turns true at the first non-finite step) or "skip".
        accumulate: micro-batches per optimizer step (gradient accumulation): `step(loss)` is
            called once per micro-batch with its own (mean) loss; stab backpropagates loss /
            accumulate and steps every `accumulate` calls. Records are per optimizer step.
        config: your hyperparameters, recorded as `model.*` in config.yaml (factors of `stab
            report`) and passed to `factory` by `stab replay`.
        factory: the dotted path of a `model=custom` factory that rebuilds model and data;
            `config` must fit its parameters (checked here, not at replay time).
        groups, layers, tokens: as a factory's (docs/your-model.md): grad-norm groups, the layer
            pattern, how outputs become tokens for the scream check.
        epochs, batch_size: what the run plans (the progress view's ETA, the validation batch size).
        detect: the detectors' thresholds (stability.config.DetectConfig); log: trackers.
        batch_loss: how to recompute the loss of a recorded batch (for locating the first NaN);
            default: loss(model(*inputs), target). The Lightning and transformers callbacks
            pass their framework's own.
    Raises:
        ConfigError for a bad value (a clip <= 0, an unknown tracker, a layer pattern that matches
        nothing, config keys the factory does not take, a model with no trainable parameter),
        before anything is written.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        runs: str | Path = "runs",
        *,
        run_dir: str | Path | None = None,
        name: str = "run",
        loss: Any = None,
        val: Any = None,
        scheduler: Any = None,
        clip: float | None = None,
        on_nan: str = "stop",
        accumulate: int = 1,
        config: dict[str, Any] | None = None,
        factory: str | None = None,
        groups: dict[str, Any] | None = None,
        layers: str | None = None,
        tokens: Any = "auto",
        epochs: int = 1,
        batch_size: int | None = None,
        detect: DetectConfig | None = None,
        log: Sequence[str] = (),
        batch_loss: Callable[[Any], torch.Tensor] | None = None,
        recorded_by: str = "stability.monitor.Monitor",
        info: dict[str, Any] | None = None,
    ) -> None:
        _check_arguments(model, loss, val, on_nan, accumulate)
        if factory is not None:
            _check_factory(factory, dict(config or {}))
        self.cfg = _run_config(optimizer, epochs, batch_size, clip, on_nan, config, factory, detect, log)
        device = next(model.parameters()).device
        task = Task(
            model=model,
            train=None,
            loss=loss if loss is not None else _no_loss,
            val=val,
            layers=layers,
            groups=groups,
            tokens=tokens if val is not None else None,
        )
        self.work = CustomWorkload(self.cfg, device, task=task, batch_loss=batch_loss)
        self.can_rerun = loss is not None or batch_loss is not None
        self.model, self.opt, self.sched = model, optimizer, scheduler
        self.groups = self.work.module_groups()
        self.names = list(self.groups)
        self.ins = Instruments(self.names, GradProbe(self.groups), clip=self.cfg.train.clip)
        self.layout = self.ins.layout
        self.accumulate = accumulate
        self.dir = Path(run_dir) if run_dir is not None else _new_run_dir(Path(runs), name)
        self.session = RunSession(self.cfg, self.dir, status={"recorded_by": recorded_by}).open()
        self.writer = self.session.writer
        self.session.describe(device, {**self.work.info, "optimizer": optimizer_info(optimizer), **(info or {})})
        self.session.open_steps(self.layout)
        self._start_state()
        if val is not None:
            self._evaluate_init()

    def _evaluate_init(self) -> None:
        """The evaluation before the first step: the start a diverged run is measured against, as
        stab's own loop has it (stab runs the model: `busy`)."""
        self.busy = True
        try:
            self.session.evaluate_init(self.work)
        finally:
            self.busy = False

    def _start_state(self) -> None:
        """Where the run stands before its first step: epoch 1, batch 0, no NaN, no summary."""
        self.epoch, self.batch, self.global_step = 1, 0, 0
        self.first_nan: dict[str, Any] | None = None
        self.should_stop = False
        self.summary: Mapping[str, Any] | None = None
        self.busy = False  # True while stab itself runs the model (locating, evaluating): not a training forward
        self._t_last = time.perf_counter()
        self._loss_sum: torch.Tensor | None = None  # the optimizer step's micro-batch losses (x items), on the device
        self._items: torch.Tensor | None = None  # ... and their items, when the loop counts them
        self._micro = 0
        self._batches: list[Any] = []
        self._mismatches = 0

    # --- per micro-batch and per optimizer step -------------------------------------------------
    def step(self, loss: torch.Tensor, batch: Any = None, indices: torch.Tensor | None = None) -> bool:
        """Your loop's step: backward, and on the last micro-batch of an optimizer step (every
        call, unless `accumulate` > 1) measure, clip, `optimizer.step()` (finite steps only),
        scheduler step, record. `batch` (what the model and loss were given, (inputs..., target))
        lets the first non-finite step be located module by module and saved for `stab replay`.
        Returns whether the step was finite (True for a micro-batch that does not step)."""
        if self._micro == 0:
            self.opt.zero_grad(set_to_none=True)
        (loss / self.accumulate if self.accumulate > 1 else loss).backward()
        self.micro_batch(loss, batch)
        if self._micro < self.accumulate:
            return True
        return self._optimizer_step(indices)

    def _optimizer_step(self, indices: torch.Tensor | None = None) -> bool:
        finite = self.before_optimizer_step(indices)
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # stepped on, or not stepped on and dropped
        if self.sched is not None:
            self.sched.step()
        return finite

    def micro_batch(self, loss: torch.Tensor, batch: Any = None, items: torch.Tensor | int | None = None) -> None:
        """Note one micro-batch of the coming optimizer step (no host sync): its own mean loss
        and the batch it came from. With `items` (the tokens or examples its mean is over), the
        step's loss is the items-weighted mean of its micro-batches' losses (the mean over all
        the step's items); without, the plain mean of the micro-batch losses."""
        value = loss.detach().double().reshape(())
        if items is not None:
            n = torch.as_tensor(items, device=value.device).double().reshape(())
            value = value * n
            self._items = n if self._items is None else self._items + n
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro += 1
        if batch is not None:
            self._batches.append(batch)

    def before_optimizer_step(self, indices: torch.Tensor | None = None) -> bool:
        """The gradients of an optimizer step are complete: measure them (one host transfer),
        check, clip, and record the step; does not step. The step's loss is the mean of its
        micro-batches' losses (items-weighted where `micro_batch` was given items). Returns whether the loss and every
        gradient were finite; on False the caller must not step (`step` does not)."""
        loss_sum = self._loss_sum  # set by micro_batch with _micro
        if self._micro == 0 or loss_sum is None:
            raise RuntimeError(
                "Monitor: no loss for this optimizer step: call monitor.step(loss) or "
                "monitor.micro_batch(loss) after each backward, before the optimizer step"
            )
        n = self._micro
        loss = loss_sum / (self._items if self._items is not None else n)
        try:
            values = self.ins.measure(loss)
        except RuntimeError:  # no gradients (called before any backward): this step's notes are void
            self._loss_sum, self._items, self._micro, self._batches = None, None, 0, []
            raise
        host, finite = self.ins.read(values)  # the step's one CPU-GPU sync point
        if finite:
            self.ins.clip_(values)
        elif self.first_nan is None:
            self.first_nan = self._locate(indices, host)
        if not finite and self.cfg.train.on_nan == "stop":
            self.should_stop = True
        if n != self.accumulate:
            self._mismatch(n)
        now = time.perf_counter()
        rec = self.layout.record(
            host,
            step=self.global_step,
            epoch=self.epoch,
            batch=self.batch,
            lr=float(self.opt.param_groups[0].get("lr", math.nan)),
            step_ms=1000 * (now - self._t_last),  # since the previous step: your forward included
            clip=self.cfg.train.clip,
            finite=finite,
        )
        self._t_last = now
        self.writer.step(rec)
        self.batch += 1
        self.global_step += 1
        self._loss_sum, self._items, self._micro, self._batches = None, None, 0, []
        return finite

    def after_backward(self, loss: torch.Tensor, batch: Any = None, indices: torch.Tensor | None = None) -> bool:
        """One micro-batch that is the whole step: `micro_batch(loss, batch)` then
        `before_optimizer_step()`. Returns whether the step was finite."""
        self.micro_batch(loss, batch)
        return self.before_optimizer_step(indices)

    def _mismatch(self, n: int) -> None:
        """An optimizer step that accumulated a different number of micro-batches than planned:
        said in an event (the first one; the count is in the summary)."""
        self._mismatches += 1
        if self._mismatches == 1:
            self.writer.event(
                {
                    "event": "accumulation_mismatch",
                    "step": self.global_step,
                    "epoch": self.epoch,
                    "batch": self.batch,
                    "micro_batches": n,
                    "expected": self.accumulate,
                    "note": f"this optimizer step accumulated {n} micro-batches, not {self.accumulate}; "
                    f"its loss is the mean over the {n}",
                }
            )

    def _locate(self, indices: torch.Tensor | None, host: Any) -> dict[str, Any]:
        """The first non-finite step: re-run module by module on this step's micro-batches (and
        save one for replay) when there are batches and a loss; else ranked candidates."""
        self.busy = True
        try:
            return forensics.first_nan(
                self.writer,
                self.work,
                self.groups,
                self.opt,
                self.sched,
                self._batches,
                indices,
                host,
                self.layout,
                self.epoch,
                self.batch,
                self.global_step,
                rerun=self.can_rerun,
            )
        finally:
            self.busy = False

    # --- per epoch, live, at the end -----------------------------------------------------------
    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch: an optimizer step for micro-batches still accumulated (said as a
        mismatch), its aggregates, then validation loss, scream check and health on `val`;
        written to epochs.jsonl and grad_norms.csv. Returns the epoch record."""
        if self._micro:
            self._optimizer_step()
        self.busy = True
        try:
            erec = self.session.end_epoch(self.work, self.epoch)
        finally:
            self.busy = False
        self.epoch += 1
        self.batch = 0
        return erec

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event written so far (first_nan, clamp saturation, ...; spikes and the scream at close)."""
        return self.session.events

    @property
    def verdict(self) -> str:
        """The verdict so far (`stable`, `exploding`, `nan`, `scream`) from the epochs closed so far:
        `nan` from the first non-finite step on; `running` before the first epoch ends."""
        if self.summary is not None:
            return self.summary["verdict"]
        summarizer = self.writer._summarizer()
        if self.first_nan is None and not summarizer.epochs:
            return "running"
        return summarizer.finish()[0]["verdict"]

    def close(self) -> Mapping[str, Any]:
        """Close an unfinished epoch, write the summary (verdict, flags, spikes, ...) and the final
        status; returns the summary. Called by `with Monitor(...)` on exit."""
        if self.summary is not None:
            return self.summary
        try:
            if self.batch or self._micro:  # steps since the last end_epoch
                self.end_epoch()
            summary = self.writer.finish(
                run_id=self.cfg.identity(),
                steps=self.global_step,
                stopped_early=self.should_stop,
                device=str(self.work.device),
                accumulate=self.accumulate,
                accumulation_mismatches=self._mismatches,
                wall_s=time.time() - self.session.t_start,
            )
        except BaseException as e:
            self.fail(e)
            raise
        self.summary = summary
        self.session.complete(summary)
        return summary

    def fail(self, error: BaseException) -> None:
        """The loop stopped on `error`: keep what was recorded, status `interrupted` (Ctrl-C) or
        `failed` with the error."""
        self.session.end(error)
        self.summary = {"verdict": self.session.state}

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is None:
            self.close()
        elif self.summary is None:
            self.fail(error)


def optimizer_info(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer as data.json records it: its class and every parameter group's settings
    (learning rate, weight decay, betas, eps, ... and its parameter count), as they are."""
    groups = []
    for g in opt.param_groups:
        settings = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in g.items()
            if k != "params" and isinstance(v, (int, float, str, bool, tuple, type(None)))
        }
        groups.append({**settings, "n_params": sum(p.numel() for p in g["params"])})
    return {"class": type(opt).__name__, "param_groups": groups}


def _check_factory(factory: str, config: dict[str, Any]) -> None:
    """`config` must be keyword arguments the factory takes (what `stab replay` will call it with)."""
    fn = locate(factory)
    if not callable(fn):
        raise ConfigError(f"Monitor(factory={factory!r}): {type(fn).__name__} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**config)
    except TypeError as e:
        have = ", ".join(sig.parameters) or "none"
        raise ConfigError(
            f"Monitor(factory={factory!r}, config=...): the factory cannot take {sorted(config)}: {e} "
            f"(its parameters: {have})"
        ) from None


def _no_loss(output: Any, target: Any) -> torch.Tensor:
    raise TypeError("Monitor(loss=...) is needed for validation, health and locating the first NaN")
