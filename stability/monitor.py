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
Hooks for frameworks that own the backward and the step (a Lightning callback:
`stability.lightning`): `after_backward(loss)` measures, clips and records without stepping.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

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
from stability.record import format as rf
from stability.record.summarizer import Summarizer
from stability.record.writer import RunWriter
from stability.rundirs import RunLease, create_unique
from stability.step import Instruments
from stability.trackers import open_trackers
from stability.training import _end_epoch, _first_nan
from stability.workloads.custom import CustomWorkload, Task


class _Writer(RunWriter):
    """stab's writer, keeping the events it writes for `Monitor.events`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, Any]] = []

    def event(self, ev: dict[str, Any]) -> None:
        self.seen.append(ev)
        super().event(ev)


class Monitor:
    """stab's measurements around an existing model and optimizer (see the module docstring).

    Args:
        model, optimizer: yours; the optimizer steps only on finite steps.
        runs: the folder the run folder is created in (`runs/own/<time>_<name>`), or run_dir: the
            run folder itself.
        loss: loss(output, target), needed for validation, health and locating the first NaN.
        val: validation data (tensors (x, y), a Dataset): validation loss, scream check, health.
        scheduler: stepped after every step (a per-step schedule), or None.
        clip: total gradient-norm clipping threshold, or None.
        on_nan: "stop" (`should_stop` turns true at the first non-finite step) or "skip".
        config: your hyperparameters, recorded as `model.*` in config.yaml (factors of `stab
            report`) and passed to `factory` by `stab replay`.
        factory: the dotted path of a `model=custom` factory that rebuilds model and data.
        groups, layers, tokens: as a factory's (docs/your-model.md): grad-norm groups, the layer
            pattern, how outputs become tokens for the scream check.
        epochs, batch_size: what the run plans (the progress view's ETA, the validation batch size).
        detect: the detectors' thresholds (stability.config.DetectConfig); log: trackers.
    Raises:
        ConfigError for a bad value (a clip <= 0, an unknown tracker, a layer pattern that matches
        nothing), before anything is written.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runs: str | Path = "runs", *,
                 run_dir: str | Path | None = None, name: str = "run", loss: Any = None, val: Any = None,
                 scheduler: Any = None, clip: float | None = None, on_nan: str = "stop",
                 config: dict[str, Any] | None = None, factory: str | None = None, groups: dict[str, Any] | None = None,
                 layers: str | None = None, tokens: Any = "auto", epochs: int = 1, batch_size: int | None = None,
                 detect: DetectConfig | None = None, log: Sequence[str] = ()) -> None:
        if val is not None and loss is None:
            raise ConfigError("Monitor(val=...) needs loss=loss(output, target): the validation loss, scream check "
                              "and health run it")
        lr = optimizer.param_groups[0].get("lr", 1e-3)
        train = TrainConfig(epochs=epochs, batch_size=batch_size or TrainConfig.batch_size, lr=float(lr),
                            clip="none" if clip is None else clip, on_nan=on_nan, warmup=0,
                            weight_decay=float(optimizer.param_groups[0].get("weight_decay", 0.0)))
        self.cfg = RunConfig(model=CustomModelConfig(target=factory or OWN_LOOP, params=dict(config or {})),
                             data=NoDataConfig(), train=train, detect=detect or DetectConfig(), log=list(log))
        device = next(model.parameters()).device
        task = Task(model=model, train=None, loss=loss if loss is not None else _no_loss, val=val, layers=layers,
                    groups=groups, tokens=tokens if val is not None else None)
        self.work = CustomWorkload(self.cfg, device, task=task)
        self.model, self.opt, self.sched = model, optimizer, scheduler
        self.groups = self.work.module_groups()
        self.names = list(self.groups)
        self.probe = GradProbe(self.groups)
        self.ins = Instruments(self.names, self.probe, clip=self.cfg.train.clip)
        self.layout = self.ins.layout
        self.has_loss = loss is not None

        if run_dir is None:
            Path(runs).mkdir(parents=True, exist_ok=True)
            run_dir = create_unique(Path(runs) / "own", f"{time.strftime('%Y%m%d-%H%M%S')}_{name}")
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease = RunLease(self.dir).acquire()
        self.t_start = time.time()
        self.recorder = open_trackers(self.cfg, self.dir, [])
        self.writer = _Writer(self.dir, self.recorder)
        self.writer.start(self.cfg.to_dict(), [], self.cfg.identity())
        self.writer.status(fresh=True, state="running", run_id=self.cfg.identity(), pid=os.getpid(),
                           host=socket.gethostname(), started=self.t_start, finished=None, error=None,
                           device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                           python=platform.python_version(), recorded_by="stability.monitor.Monitor")
        self.writer.data(self.work.info)
        self.writer.open(self.names, 0, Summarizer(self.cfg.detect, self.cfg.train.clip))
        self.epoch, self.batch, self.global_step = 1, 0, 0
        self.first_nan: dict[str, Any] | None = None
        self.should_stop = False
        self.summary: dict[str, Any] | None = None
        self._t_last = time.perf_counter()

    # --- per step -------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor, batch: Any = None, indices: torch.Tensor | None = None) -> bool:
        """Backward, measure, clip, `optimizer.step()` (finite steps only), scheduler step, record.
        `batch` (what the model and loss were given, (inputs..., target)) lets the first non-finite
        step be located module by module and saved for `stab replay`. Returns whether it was finite."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        finite = self.after_backward(loss, batch, indices)
        if finite:
            self.opt.step()
        else:
            self.opt.zero_grad(set_to_none=True)  # not stepped on; dropped
        if self.sched is not None:
            self.sched.step()
        return finite

    def after_backward(self, loss: torch.Tensor, batch: Any = None, indices: torch.Tensor | None = None) -> bool:
        """Measure the gradients already computed (one host transfer), clip them, record the step;
        does not step. Returns whether the loss and every gradient were finite."""
        values = self.ins.measure(loss)
        host, finite = self.ins.read(values)  # the step's one CPU-GPU sync point
        if finite:
            self.ins.clip_(values)
        elif self.first_nan is None:
            self.first_nan = self._locate(batch, indices, host)
        if not finite and self.cfg.train.on_nan == "stop":
            self.should_stop = True
        now = time.perf_counter()
        rec = self.layout.record(host, step=self.global_step, epoch=self.epoch, batch=self.batch,
                                 lr=float(self.opt.param_groups[0].get("lr", math.nan)),
                                 step_ms=1000 * (now - self._t_last),  # since the previous step: your forward included
                                 clip=self.cfg.train.clip, finite=finite)
        self._t_last = now
        self.writer.step(rec)
        self.batch += 1
        self.global_step += 1
        return finite

    def _locate(self, batch: Any, indices: torch.Tensor | None, host: np.ndarray) -> dict[str, Any]:
        """The first non-finite step: re-run module by module on `batch` (and save it for replay)
        when there is one and a loss; else the last group whose recorded norm is not finite."""
        if batch is not None and self.has_loss:
            idx = indices if indices is not None else torch.zeros(0, dtype=torch.long)
            return _first_nan(self.writer, self.work, self.groups, self.opt, self.sched or _NoSchedule(), batch,
                              idx, host, self.layout, self.epoch, self.batch, self.global_step)
        bad = self.layout.nonfinite_groups(host)
        loss = float(self.layout.take(host, "loss")[0])
        found = {"epoch": self.epoch, "batch": self.batch, "step": self.global_step,
                 "kind": "loss" if not math.isfinite(loss) else "grad", "module": bad[-1] if bad else "unknown",
                 "where": "recorded grad norms", "loss": loss, "grad_norm": float(self.layout.take(host, "grad_norm")[0])}
        self.writer.event({"event": "first_nan", **found})
        return found

    # --- per epoch, live, at the end -----------------------------------------------------------
    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch: its aggregates, then validation loss, scream check and health on `val`;
        written to epochs.jsonl and grad_norms.csv. Returns the epoch record."""
        erec = _end_epoch(self.writer, self.work, self.dir, self.epoch, self.should_stop, self.cfg.detect.health)
        self.epoch += 1
        self.batch = 0
        return erec

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event written so far (first_nan, clamp saturation, ...; spikes and the scream at close)."""
        return list(self.writer.seen)

    @property
    def verdict(self) -> str:
        """The verdict so far (`stable`, `exploding`, `nan`, `scream`) from the epochs closed so far:
        `nan` from the first non-finite step on; `running` before the first epoch ends."""
        if self.summary is not None:
            return self.summary["verdict"]
        if self.first_nan is None and not self.writer.summarizer.epochs:
            return "running"
        return self.writer.summarizer.finish()[0]["verdict"]

    def close(self) -> dict[str, Any]:
        """Close an unfinished epoch, write the summary (verdict, flags, spikes, ...) and the final
        status; returns the summary. Called by `with Monitor(...)` on exit."""
        if self.summary is not None:
            return self.summary
        if self.batch:  # steps since the last end_epoch
            self.end_epoch()
        self.summary = self.writer.finish(run_id=self.cfg.identity(), steps=self.global_step,
                                          stopped_early=self.should_stop, device=str(self.work.device),
                                          wall_s=time.time() - self.t_start)
        self.writer.status(state="completed", finished=time.time(), verdict=self.summary["verdict"])
        self.recorder.close("completed")
        self.lease.release()
        return self.summary

    def fail(self, error: BaseException) -> None:
        """The loop crashed: keep what was recorded, status `failed` with the error."""
        self.writer.abort()
        self.writer.status(state="failed", finished=time.time(), error=f"{type(error).__name__}: {error}")
        self.writer.summary({"schema_version": rf.SCHEMA_VERSION, "verdict": "failed",
                             "evidence": f"{type(error).__name__}: {error}", "run_id": self.cfg.identity(),
                             "wall_s": time.time() - self.t_start})
        self.recorder.close("failed")
        self.lease.release()
        self.summary = {"verdict": "failed"}

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is None:
            self.close()
        elif self.summary is None:
            self.fail(error)


class _NoSchedule:
    """What `save_forensics` stores when you have no scheduler."""

    def state_dict(self) -> dict[str, Any]:
        return {}


def _no_loss(output: Any, target: Any) -> torch.Tensor:
    raise TypeError("Monitor(loss=...) is needed for validation, health and locating the first NaN")


def bench(cfg: RunConfig, steps: int = 60, block: int = 5) -> dict[str, float]:
    """What the monitor costs in a plain loop: the same model (two copies, same init and batches),
    stepped by a bare loop (forward, loss, backward, clip, AdamW step) and by the same loop with
    `Monitor.step` in place of backward/clip/step, in alternating blocks of `block` steps in this
    process (a machine that slows down slows both alike). Returns steps/s of each and their ratio;
    the monitor's run folder goes to a temporary folder."""
    import copy
    import tempfile

    from stability.bench import interleave
    from stability.training import resolve_device
    from stability.workloads import build, make_optimizer

    device = resolve_device(cfg.train.device)
    parts = build(cfg, device, compile=False)
    work, tc = parts.work, cfg.train
    g = torch.Generator().manual_seed(cfg.seed)
    batches = [work.batch(torch.randperm(work.n_train, generator=g)[:tc.batch_size]) for _ in range(8)]
    copies = {arm: copy.copy(work) for arm in ("bare", "monitor")}
    for w in copies.values():
        w.model = copy.deepcopy(work.model)
    opts = {arm: make_optimizer(w.model, tc)[0] for arm, w in copies.items()}
    with tempfile.TemporaryDirectory(prefix="stab-bench-monitor-") as tmp:
        monitor = Monitor(copies["monitor"].model, opts["monitor"], run_dir=Path(tmp) / "run", clip=tc.clip)

        def bare_step(i: int) -> None:
            w, opt = copies["bare"], opts["bare"]
            loss = w.loss(batches[i % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip is not None:
                torch.nn.utils.clip_grad_norm_(w.model.parameters(), tc.clip)
            opt.step()

        def monitor_step(i: int) -> None:
            monitor.step(copies["monitor"].loss(batches[i % len(batches)]))

        arms = {"bare": bare_step, "monitor": monitor_step}
        spent, done = interleave(arms, steps, block, device)
        monitor.close()
    bare_sps, mon_sps = done / spent["bare"], done / spent["monitor"]
    return {"bare_sps": bare_sps, "monitor_sps": mon_sps, "ratio": mon_sps / bare_sps, "steps": done,
            "groups": len(parts.groups), "threads": torch.get_num_threads(), "device": str(device)}

