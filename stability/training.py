"""The instrumented training loop.

The loop reads top to bottom: batch -> forward -> loss -> backward -> measure -> (one host
transfer) -> non-finite check -> clip -> step -> record. Everything measured in a step is
concatenated into one device vector and moved to the host once (`Stepper`); the step's record
goes to the run folder's writer (`stability.runwriter.RunWriter`), which owns every file, keeps
the epoch's aggregates as steps arrive and feeds the detectors (`stability.summarizer`). The
files and their fields are defined in `stability.runformat` and docs/run-format.md.

    summary = run(RunConfig(), Path("runs/example"), overrides=["norm=pre"])
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import platform
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from stability import detectors, health
from stability import runformat as rf
from stability.config import RunConfig
from stability.instrument import GradProbe, NonFiniteProbe, StageProbe
from stability.errors import StorageError
from stability.rundirs import RunLease
from stability.runformat import SCHEMA_VERSION
from stability.runwriter import RunWriter
from stability.storage import atomic_write_bytes
from stability.preflight import preflight
from stability.progress import phase
from stability.summarizer import Summarizer
from stability.trackers import open_trackers
from stability.workloads import build


class Callbacks:
    """Progress hooks for a front end; the base does nothing."""

    def start(self, epochs: int, batches: int) -> None: ...

    def step(self, epoch: int, batch: int, loss: float) -> None: ...

    def epoch(self, epoch: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def eager(work: Any) -> Iterator[None]:
    """Run probes on the uncompiled model: hooks added after `torch.compile` traced the forward
    do not fire inside the compiled graph, and its state_dict keys carry an `_orig_mod.` prefix."""
    compiled = work.model
    work.model = getattr(compiled, "_orig_mod", compiled)
    try:
        yield
    finally:
        work.model = compiled


class InjectedCrash(RuntimeError):
    """Raised by `fault.crash_at_step`: a job that crashes on purpose."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r}: CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


class NanInjector:
    """Multiplies one module group's output by NaN during the forward of one global step."""

    def __init__(self, modules: list[torch.nn.Module], step: int) -> None:
        self.step, self.current = step, -1
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if self.current == self.step and module.training:
            return out * float("nan")
        return None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _last_words(write: Any, *args: Any, **kwargs: Any) -> None:
    """The final state of a run that is ending badly: best effort, never hides the first error."""
    try:
        write(*args, **kwargs)
    except StorageError:
        pass


def run(cfg: RunConfig, run_dir: Path, overrides: Sequence[str] = (), callbacks: Callbacks | None = None,
        extra_status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one configuration into `run_dir`; returns the summary (also in summary.json).

    A crash writes status `failed` with the error and re-raises; Ctrl-C writes `interrupted`.
    An exploding or NaN run is a result, not a crash: it completes with that verdict.
    The run holds `run_dir`'s lease throughout: `LeaseBusy` if another live process writes there.
    """
    preflight(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = RunLease(run_dir, **{k: v for k, v in (extra_status or {}).items() if k == "owner"}).acquire()
    try:
        return _run(cfg, run_dir, overrides, callbacks or Callbacks(), extra_status)
    finally:
        lease.release()


def _run(cfg: RunConfig, run_dir: Path, overrides: Sequence[str], cb: Callbacks,
         extra_status: dict[str, Any] | None) -> dict[str, Any]:
    t_start = time.time()
    recorder, state = open_trackers(cfg, run_dir, overrides), "failed"  # no tracker: imports nothing
    writer = RunWriter(run_dir, recorder)
    writer.start(cfg.to_dict(), overrides, cfg.identity())
    writer.status(fresh=True, state="running", run_id=cfg.identity(), pid=os.getpid(), host=socket.gethostname(),
                  started=t_start, finished=None, error=None, **(extra_status or {}))
    try:
        summary = _train(cfg, writer, cb, t_start)
        state = "completed"
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "SIGINT"
        _last_words(writer.status, state="interrupted", finished=time.time(), error=f"interrupted ({how})")
        state = "interrupted"
        raise
    except BaseException as e:
        _last_words(writer.status, state="failed", finished=time.time(), error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
        _last_words(writer.summary, {"schema_version": SCHEMA_VERSION, "verdict": "failed",
                                     "evidence": f"{type(e).__name__}: {e}", "run_id": cfg.identity(),
                                     "wall_s": time.time() - t_start})
        raise
    finally:
        cb.close()
        recorder.close(state)
    writer.status(state="completed", finished=time.time(), verdict=summary["verdict"])
    return summary


def _train(cfg: RunConfig, writer: RunWriter, cb: Callbacks, t_start: float) -> dict[str, Any]:
    """The loop: batch -> step (`Stepper`) -> record (`RunWriter`) per step; evaluate per epoch;
    the summary from the writer's detectors at the end."""
    tc = cfg.train
    device = resolve_device(tc.device)
    parts = build(cfg, device)
    work, model, groups, names, opt, sched = parts.work, parts.model, parts.groups, parts.names, parts.opt, parts.sched
    run_dir = writer.dir
    writer.data(work.info)
    writer.status(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version())
    n_stages = parts.n_stages
    clamp = cfg.model.rms_clamp if n_stages and cfg.model.rms_match else None
    writer.open(names, n_stages, Summarizer(cfg.detect, tc.clip))
    injector = (NanInjector(groups[cfg.fault.nan_module], cfg.fault.nan_at_step)
                if cfg.fault.nan_at_step is not None else None)
    stepper = Stepper(work, opt, sched, parts.grad_probe, parts.stage_probe, tc.clip, tc.precision)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = max(1, work.n_train // tc.batch_size)  # drop the ragged last batch
    cb.start(tc.epochs, n_batches)
    first_nan: dict[str, Any] | None = None
    epoch_norms: list[float] = []  # total grad norm per epoch, for train.stop_early
    stopped = False
    step = 0

    model.train()
    try:
        for epoch in range(1, tc.epochs + 1):
            order = torch.randperm(work.n_train, generator=order_gen)
            for b in range(n_batches):
                t0 = time.perf_counter()
                if cfg.fault.crash_at_step == step:
                    raise InjectedCrash(f"fault.crash_at_step={step}: injected crash")
                if injector:
                    injector.current = step
                batch = work.batch(order[b * tc.batch_size:(b + 1) * tc.batch_size])
                spike = cfg.fault.spike_factor if cfg.fault.spike_at_step == step else None
                host, finite = stepper(batch, spike)
                if not finite:
                    if first_nan is None:
                        first_nan = _first_nan(writer, work, groups, opt, sched, batch,
                                               order[b * tc.batch_size:(b + 1) * tc.batch_size], host, epoch, b, step)
                    opt.zero_grad(set_to_none=True)  # the stepper did not step on them; drop them
                    stopped = tc.on_nan == "stop"
                rec = _step_record(host, names, n_stages, clamp, step, epoch, b)
                rec.update({rf.FINITE: finite,  # from each parameter's gradient, not from the (huge) total
                            rf.CLIPPED: bool(finite and tc.clip is not None and host[1] > tc.clip),
                            rf.LR: sched.get_last_lr()[0], rf.STEP_MS: 1000 * (time.perf_counter() - t0)})
                writer.step(rec)
                cb.step(epoch, b, rec[rf.LOSS])
                step += 1
                if stopped:
                    break
            erec = _end_epoch(writer, work, run_dir, epoch, stopped, cfg.detect.health)
            cb.epoch(epoch, erec)
            epoch_norms.append(erec["grad_norm_mean"])
            if stopped:
                break
            why = tc.stop_early and detectors.certainly_unstable(
                epoch_norms, first_nan, cfg.detect.explode_factor, cfg.detect.explode_window)
            if why:  # train.stop_early: the rest of the run cannot make it stable
                writer.event({"event": "stopped_early", "epoch": epoch, "step": step, "reason": why})
                stopped = True
                break
    except BaseException:  # Ctrl-C, SIGTERM, a crash: keep every step recorded so far
        writer.abort()
        raise
    if injector:
        injector.close()
    return writer.finish(injected_nan_step=cfg.fault.nan_at_step, run_id=cfg.identity(), steps=step,
                         stopped_early=stopped, codec=work.info.get("codec"), latent_scale=work.info.get("scale"),
                         device=str(device), wall_s=time.time() - t_start)


def _first_nan(writer: RunWriter, work: Any, groups: dict[str, list[torch.nn.Module]], opt: torch.optim.Optimizer,
               sched: Any, batch: Any, indices: torch.Tensor, host: np.ndarray, epoch: int, b: int,
               step: int) -> dict[str, Any]:
    """Name where the first non-finite value started, save what `stab replay` needs, record the event."""
    with eager(work):
        found = _locate_nan(work, batch, groups, host, writer.groups, epoch, b, step)
        found["forensics"] = save_forensics(writer.dir, work, opt, sched, batch, indices, found)
    writer.event({"event": "first_nan", **found})
    return found


def _end_epoch(writer: RunWriter, work: Any, run_dir: Path, epoch: int, stopped: bool,
               health_on: bool) -> dict[str, Any]:
    """The epoch's record: the writer's aggregates of its steps, then validation, the scream
    check, the health probe and any listening; written by the writer."""
    erec = writer.close_epoch()
    with eager(work), phase(f"evaluating epoch {epoch}", unit="epochs"):
        erec.update(_evaluate(work, stopped, health_on))
        erec.update(work.listen(epoch, run_dir))  # {"audio": [...]} at listen epochs
    writer.epoch(erec)
    return erec


class Stepper:
    """One instrumented optimisation step: forward -> loss -> backward -> measure -> one host
    transfer -> clip -> step. Returns the step's measurements on the host and whether they
    are finite; on a non-finite step it does not update (the caller decides what happens)."""

    def __init__(self, work: Any, opt: torch.optim.Optimizer, sched: Any, grad_probe: GradProbe,
                 stage_probe: StageProbe, clip: float | None, precision: str = "fp32") -> None:
        self.work, self.opt, self.sched = work, opt, sched
        self.grad_probe, self.stage_probe, self.clip = grad_probe, stage_probe, clip
        self.n_checked = 2 + len(grad_probe.names)  # loss, total norm, group norms
        device = next(work.model.parameters()).device
        bf16 = precision == "bf16"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, batch: Any, loss_scale: float | None = None) -> tuple[np.ndarray, bool]:
        with self.autocast():
            loss = self.work.loss(batch)
        if loss_scale is not None:  # fault.spike_at_step
            loss = loss * loss_scale
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        total, per_group, grads_finite = self.grad_probe.measure()
        stage = self.stage_probe.measure().double()
        vec = torch.cat([loss.detach().double().view(1), total.view(1), per_group, stage, grads_finite.view(1)])
        host = vec.cpu().numpy()  # the step's one CPU-GPU sync point (float64: norms of finite grads stay finite)
        if np.isinf(host[2:self.n_checked]).any():
            # A float32 per-parameter norm overflowed, or a gradient holds inf: only float64
            # norms tell which. A second sync, on such a step only.
            total, per_group, grads_finite = self.grad_probe.measure(exact=True)
            host = torch.cat([vec[:1], total.view(1), per_group, stage, grads_finite.view(1)]).cpu().numpy()
        host, grads_finite = host[:-1], bool(host[-1])
        # Non-finite = the loss or some parameter's gradient is; a huge but finite norm is not.
        finite = grads_finite and bool(np.isfinite(host[0]))
        if finite:
            self.grad_probe.clip_(total, self.clip)
            self.opt.step()
        self.sched.step()
        return host, finite


def _step_record(host: np.ndarray, names: list[str], n_stages: int, clamp: list[float] | None, step: int,
                 epoch: int, batch: int) -> dict[str, Any]:
    """The step record (`runformat.StepRecord`) from the Stepper's host vector: loss, total grad
    norm, G group norms, then per stage rms..., ratio..., scale... (the one place it is unpacked)."""
    G = len(names)
    values = host.tolist()  # Python floats, in one call
    rec: dict[str, Any] = {rf.STEP: step, rf.EPOCH: epoch, rf.BATCH: batch, rf.LOSS: values[0],
                           rf.GRAD_NORM: values[1]}
    rec.update(zip(_grad_keys(tuple(names)), values[2:2 + G]))
    stage = values[2 + G:]
    for i in range(n_stages):
        rms, ratio, scale = stage[i], stage[n_stages + i], stage[2 * n_stages + i]
        rec[rf.stage_key(i, "rms")] = rms
        rec[rf.stage_key(i, "ratio")] = ratio
        rec[rf.stage_key(i, "scale")] = scale
        rec[rf.stage_key(i, "clamped")] = clamp is not None and bool(ratio < clamp[0] or ratio > clamp[1])
    rec[rf.FINITE] = bool(np.isfinite(host[:2 + G]).all())
    return rec


@functools.lru_cache(maxsize=8)
def _grad_keys(names: tuple[str, ...]) -> list[str]:
    return [rf.grad_key(n) for n in names]


def _evaluate(work: Any, stopped: bool, health_on: bool) -> dict[str, Any]:
    """The epoch's evaluation: validation loss, scream check, and the health probe (skipped after
    a stop at a non-finite step: the weights are not worth measuring)."""
    ev = work.evaluate() if not stopped else {"val_loss": math.nan, "collapsed": None, "scores": {},
                                               "target_scores": work.target_scores, "codes_head": []}
    layers_of = work.health_layers() if health_on and not stopped else {}
    if layers_of:
        layers = health.measure(work.model, work.health_loss, layers_of)
        ev["health"], ev["health_summary"] = layers, health.summarize(layers)
    return ev


def save_forensics(run_dir: Path, work: Any, opt: torch.optim.Optimizer, sched: Any, batch: Any,
                   indices: torch.Tensor, where: dict[str, Any]) -> str:
    """Save what `stab replay` needs to re-run the first non-finite step: the batch (indices
    and tensors) and the model and optimizer state from before that step's update (the loop
    checks finiteness before `opt.step()`, so the weights here are the ones that went wrong)."""
    folder = run_dir / "forensics"
    folder.mkdir(exist_ok=True)
    tensors = [t.detach().cpu() for t in (batch if isinstance(batch, (tuple, list)) else (batch,))]
    blob = {"batch": tensors, "indices": indices.cpu(), "model": work.model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": where["step"], "epoch": where["epoch"], "batch_index": where["batch"]}
    buf = io.BytesIO()  # torch's file writer reports a full disk as "unexpected pos"; a plain write names it
    torch.save(blob, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())
    return "forensics/state.pt"


def _locate_nan(work: Any, batch: Any, groups: dict[str, list[torch.nn.Module]], host: np.ndarray,
                names: list[str], epoch: int, b: int, step: int) -> dict[str, Any]:
    """Re-run the offending step (same weights, same batch) with per-module checks to name the
    module group where the non-finite value started. Runs once per run, so its syncs are free."""
    kind = "loss" if not math.isfinite(host[0]) else "grad"
    probe = NonFiniteProbe(groups)
    try:
        work.model.zero_grad(set_to_none=True)
        work.loss(batch).backward()  # a non-finite loss still walks the backward for the grad hooks
    finally:
        probe.close()
        work.model.zero_grad(set_to_none=True)
    module, where = probe.first
    if module is None:  # not reproducible on re-run: fall back to the recorded per-group norms
        bad = [n for n, v in zip(names, host[2:2 + len(names)]) if not math.isfinite(v)]
        module, where = (bad[-1] if bad else "unknown"), "recorded grad norms"
    return {"epoch": epoch, "batch": b, "step": step, "kind": kind, "module": module, "where": where,
            "loss": float(host[0]), "grad_norm": float(host[1])}
