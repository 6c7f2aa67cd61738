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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stability import detectors, distributed, health
from stability import runformat as rf
from stability.config import RunConfig
from stability.errors import StorageError
from stability.instrument import GradProbe, NonFiniteProbe, StageProbe
from stability.preflight import preflight
from stability.progress import phase
from stability.rundirs import RunLease
from stability.runformat import SCHEMA_VERSION
from stability.runwriter import RunWriter
from stability.storage import atomic_write_bytes
from stability.summarizer import Summarizer
from stability.trackers import Recorder, open_trackers
from stability.workloads import build


class Callbacks:
    """Progress hooks for a front end; the base does nothing."""

    def start(self, epochs: int, batches: int) -> None: ...

    def step(self, epoch: int, batch: int, loss: float) -> None: ...

    def epoch(self, epoch: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def eager(work: Any) -> Iterator[None]:
    """Run probes on the uncompiled model outside DDP: hooks added after `torch.compile` traced
    the forward do not fire inside the compiled graph, its state_dict keys carry an `_orig_mod.`
    prefix, and DDP's a `module.` prefix and a collective in every training forward."""
    compiled = work.model
    inner = distributed.unwrap(compiled)
    work.model = getattr(inner, "_orig_mod", inner)
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
        extra_status: dict[str, Any] | None = None, world: distributed.World | None = None) -> dict[str, Any]:
    """Train one configuration into `run_dir`; returns the summary (also in summary.json).

    A crash writes status `failed` with the error and re-raises; Ctrl-C writes `interrupted`.
    An exploding or NaN run is a result, not a crash: it completes with that verdict.
    The run holds `run_dir`'s lease throughout: `LeaseBusy` if another live process writes there.

    `world`: this process's place in a data-parallel run whose process group the caller has
    joined (`stability.distributed`); every rank calls `run` with the same `run_dir`. Rank 0
    writes it; the other ranks compute the same records (the same weights, the same
    all-reduced measurements) with a writer that writes nothing, so every rank returns the same
    summary and reaches the same decisions (skip, stop) without a broadcast.
    """
    world = world or distributed.World()
    preflight(cfg)
    distributed.check_batch(cfg.train.batch_size, world.size)
    if world.distributed and cfg.train.threads is None:  # the node's cores, split between its ranks
        from stability.resources import available_cpus
        cfg.train.threads = distributed.threads(world, available_cpus())
    if not world.main:
        return _run(cfg, Path(run_dir), overrides, Callbacks(), extra_status, world)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = RunLease(run_dir, **{k: v for k, v in (extra_status or {}).items() if k == "owner"}).acquire()
    try:
        return _run(cfg, run_dir, overrides, callbacks or Callbacks(), extra_status, world)
    finally:
        lease.release()


def _run(cfg: RunConfig, run_dir: Path, overrides: Sequence[str], cb: Callbacks,
         extra_status: dict[str, Any] | None, world: distributed.World) -> dict[str, Any]:
    t_start = time.time()
    # no tracker: imports nothing; in a distributed run rank 0 alone has trackers and writes
    recorder, state = open_trackers(cfg, run_dir, overrides) if world.main else Recorder(), "failed"
    writer = RunWriter(run_dir, recorder, write=world.main)
    writer.start(cfg.to_dict(), overrides, cfg.identity())
    writer.status(fresh=True, state="running", run_id=cfg.identity(), pid=os.getpid(), host=socket.gethostname(),
                  started=t_start, finished=None, error=None, **(extra_status or {}))
    try:
        summary = _train(cfg, writer, cb, t_start, world)
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


def _train(cfg: RunConfig, writer: RunWriter, cb: Callbacks, t_start: float,
           world: distributed.World | None = None) -> dict[str, Any]:
    """The loop: batch -> step (`Stepper`, through a `Window` of train.sync_every steps) -> record
    (`RunWriter`) per step; evaluate per epoch; the summary from the writer's detectors at the end.
    In a distributed run each rank steps on its shard of the global batch in DDP."""
    tc = cfg.train
    world = world or distributed.World()
    device = distributed.device(world, tc.device) if world.distributed else resolve_device(tc.device)
    parts = build(cfg, device)
    work, model, groups, names, opt, sched = parts.work, parts.model, parts.groups, parts.names, parts.opt, parts.sched
    run_dir = writer.dir
    writer.data(work.info)
    writer.status(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version())
    n_stages = parts.n_stages
    clamp = cfg.model.rms_clamp if n_stages and cfg.model.rms_match else None
    writer.open(names, n_stages, Summarizer(cfg.detect, tc.clip))
    # DDP around the model; groups, probes, hooks and the workload's own methods see the inner module
    work.model = model = distributed.wrap(work.model, world, device)
    injector = (NanInjector(groups[cfg.fault.nan_module], cfg.fault.nan_at_step)
                if cfg.fault.nan_at_step is not None else None)
    stepper = Stepper(work, opt, sched, parts.grad_probe, parts.stage_probe, tc.clip, tc.precision, world.size)
    window = Window(stepper, tc.sync_every, lambda s: setattr(injector, "current", s) if injector else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = max(1, work.n_train // tc.batch_size)  # drop the ragged last batch
    cb.start(tc.epochs, n_batches)
    first_nan: dict[str, Any] | None = None
    epoch_norms: list[float] = []  # total grad norm per epoch, for train.stop_early
    stopped = False
    step = 0

    writer.event({"event": "init_eval", **_evaluate_init(work)})  # the start a diverged run is measured against
    model.train()
    try:
        for epoch in range(1, tc.epochs + 1):
            order = torch.randperm(work.n_train, generator=order_gen)
            for b in range(n_batches):
                if not window.pending:
                    t0 = time.perf_counter()
                if cfg.fault.crash_at_step == step:
                    raise InjectedCrash(f"fault.crash_at_step={step}: injected crash")
                idx = order[b * tc.batch_size:(b + 1) * tc.batch_size]  # the global batch; this rank's shard:
                window.add(StepContext(step, epoch, b, idx, work.batch(distributed.shard(idx, world)),
                                       cfg.fault.spike_factor if cfg.fault.spike_at_step == step else None,
                                       sched.state_dict() if tc.sync_every > 1 else {}, [g["lr"] for g in opt.param_groups]))
                step += 1
                if not (window.full or b == n_batches - 1):
                    continue  # measurements stay on the device
                n_window = len(window.pending)
                for ctx, host, finite in window.drain():
                    if not finite:
                        if first_nan is None:  # located on the global batch, on every rank alike
                            batch = work.batch(ctx.indices) if world.distributed else ctx.batch
                            first_nan = _first_nan(writer, work, groups, opt, sched, batch, ctx.indices, host,
                                                   ctx.epoch, ctx.batch_index, ctx.step)
                        opt.zero_grad(set_to_none=True)  # the stepper did not step on them; drop them
                        stopped = tc.on_nan == "stop"
                    rec = _step_record(host, names, n_stages, clamp, ctx.step, ctx.epoch, ctx.batch_index)
                    rec.update({rf.FINITE: finite,  # from each parameter's gradient, not from the (huge) total
                                rf.CLIPPED: bool(finite and tc.clip is not None and host[1] > tc.clip),
                                rf.LR: ctx.lrs[0],  # the learning rate this step used
                                rf.STEP_MS: 1000 * (time.perf_counter() - t0) / n_window})  # the window's mean
                    writer.step(rec)
                    cb.step(ctx.epoch, ctx.batch_index, rec[rf.LOSS])
                    if stopped:
                        step = ctx.step + 1
                        break
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
                         device=str(device), world_size=world.size, sync_every=tc.sync_every,
                         wall_s=time.time() - t_start)


def _first_nan(writer: RunWriter, work: Any, groups: dict[str, list[torch.nn.Module]], opt: torch.optim.Optimizer,
               sched: Any, batch: Any, indices: torch.Tensor, host: np.ndarray, epoch: int, b: int,
               step: int) -> dict[str, Any]:
    """Name where the first non-finite value started, save what `stab replay` needs, record the event."""
    with eager(work):
        found = _locate_nan(work, batch, groups, host, writer.groups, epoch, b, step)
        found["forensics"] = (save_forensics(writer.dir, work, opt, sched, batch, indices, found) if writer.writes
                              else "forensics/state.pt")  # rank 0 saves it
    writer.event({"event": "first_nan", **found})
    return found


def _end_epoch(writer: RunWriter, work: Any, run_dir: Path, epoch: int, stopped: bool,
               health_on: bool) -> dict[str, Any]:
    """The epoch's record: the writer's aggregates of its steps, then validation, the scream
    check, the health probe and any listening; written by the writer."""
    erec = writer.close_epoch()
    with eager(work), phase(f"evaluating epoch {epoch}", unit="epochs"):
        erec.update(_evaluate(work, stopped, health_on))
        if writer.writes:  # rank 0 alone writes audio
            erec.update(work.listen(epoch, run_dir))  # {"audio": [...]} at listen epochs
    writer.epoch(erec)
    return erec


class Stepper:
    """One instrumented optimisation step: forward -> loss -> backward -> measure -> clip -> step.

    Two ways to call it, with the same arithmetic:

    - `stepper(batch)` (train.sync_every=1): the step's measurements move to the host once, the
      host checks them and updates only on a finite step. Returns (host vector, finite).
    - `stepper.on_device(batch)` (sync_every=K>1): nothing leaves the device. The update is
      guarded by the fused AdamW's `found_inf` (the path torch.amp.GradScaler uses): a
      non-finite step leaves the weights, the moments and the step count as they were. The
      guard is sticky (`frozen`): after a non-finite step every later step of the window is
      skipped too, so when the host reads the window it finds the weights exactly as they were
      before the first non-finite step and re-runs from there (`Window`). Returns the step's
      device vector (loss, total norm, group norms, stage stats, finite flag), float64.

    In a distributed run the gradients are DDP's all-reduced ones (identical on every rank), and
    the loss and stage stats are averaged over the ranks in one device all-reduce, so a
    non-finite loss on any rank makes the step non-finite on every rank.
    """

    def __init__(self, work: Any, opt: torch.optim.Optimizer, sched: Any, grad_probe: GradProbe,
                 stage_probe: StageProbe, clip: float | None, precision: str = "fp32", world_size: int = 1) -> None:
        self.work, self.opt, self.sched = work, opt, sched
        self.grad_probe, self.stage_probe, self.clip = grad_probe, stage_probe, clip
        self.n_checked = 2 + len(grad_probe.names)  # loss, total norm, group norms
        self.world_size = world_size
        device = next(work.model.parameters()).device
        bf16 = precision == "bf16"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.frozen = torch.zeros((), device=device)  # 1.0 once a step of this window was non-finite

    def _forward_backward(self, batch: Any, loss_scale: float | None) -> tuple[torch.Tensor, ...]:
        """-> (loss, total, per_group, stage, grads_finite) on the device; loss and stage are
        averaged over the ranks of a distributed run."""
        with self.autocast(), distributed.synced_batch_stats():
            loss = self.work.loss(batch)
        if loss_scale is not None:  # fault.spike_at_step
            loss = loss * loss_scale
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        total, per_group, grads_finite = self.grad_probe.measure()
        shared = torch.cat([loss.detach().double().view(1), self.stage_probe.measure().double()])
        if self.world_size > 1:  # a device collective, no host sync
            shared = distributed.sum_(shared) / self.world_size
        return shared[:1], total, per_group, shared[1:], grads_finite

    def __call__(self, batch: Any, loss_scale: float | None = None) -> tuple[np.ndarray, bool]:
        loss, total, per_group, stage, grads_finite = self._forward_backward(batch, loss_scale)
        vec = torch.cat([loss, total.view(1), per_group, stage, grads_finite.view(1)])
        host = vec.cpu().numpy()  # the step's one CPU-GPU sync point (float64: norms of finite grads stay finite)
        if np.isinf(host[2:self.n_checked]).any():
            # A float32 per-parameter norm overflowed, or a gradient holds inf: only float64
            # norms tell which. A second sync, on such a step only.
            total, per_group, grads_finite = self.grad_probe.measure(exact=True)
            host = torch.cat([loss, total.view(1), per_group, stage, grads_finite.view(1)]).cpu().numpy()
        host, grads_finite = host[:-1], bool(host[-1])
        # Non-finite = the loss or some parameter's gradient is; a huge but finite norm is not.
        finite = grads_finite and bool(np.isfinite(host[0]))
        if finite:
            self.grad_probe.clip_(total, self.clip)
            self.opt.step()
        self.sched.step()
        return host, finite

    def on_device(self, batch: Any, loss_scale: float | None = None) -> torch.Tensor:
        loss, total, per_group, stage, grads_finite = self._forward_backward(batch, loss_scale)
        finite = grads_finite & torch.isfinite(loss[0])
        self.frozen = torch.maximum(self.frozen, (~finite).float())  # sticky until `thaw`
        self.grad_probe.clip_(total, self.clip)  # NaN coefficients on a non-finite step: not applied
        self.opt.found_inf = self.frozen  # read by the fused kernel on the device: 1 = skip the update
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf
        self.sched.step()
        return torch.cat([loss, total.view(1), per_group, stage, finite.double().view(1)])

    def thaw(self) -> None:
        """Clear the sticky guard (the host has read the window and rewound to its bad step)."""
        self.frozen = torch.zeros_like(self.frozen)


@dataclass
class StepContext:
    """What the host keeps of a step until its measurements arrive: where it is in the run,
    the global batch's example indices and this rank's batch (tensors on the device, held
    anyway by the step), and the learning-rate schedule before it (host floats)."""

    step: int
    epoch: int
    batch_index: int
    indices: torch.Tensor  # (B,) the global batch, this rank's shard being `batch`
    batch: Any
    spike: float | None
    sched_state: dict[str, Any]
    lrs: list[float]


class Window:
    """Runs steps on the device and hands their measurements to the host every `sync_every`
    steps (and at each epoch's end) in one transfer.

        window.add(ctx)                       # launches the step (sync_every > 1)
        for ctx, host, finite in window.drain():
            ...                               # one record per step, in order

    At sync_every=1 a step runs on the host path when drained (`Stepper.__call__`). At K > 1,
    when the transfer shows a non-finite step, the window is rewound to it: the sticky device
    guard left the weights and optimizer state as they were before that step, the schedule is
    restored from the host, and the steps from there are run again one by one on the host path,
    so the run reports the exact step, can locate its module from the weights that produced
    it, and continues (on_nan=skip) exactly as at sync_every=1. Buffers that a forward updates
    (spectral norm's power-iteration vectors) are not rewound.
    """

    def __init__(self, stepper: Stepper, sync_every: int, before_step: Any = None) -> None:
        self.stepper, self.k = stepper, sync_every
        self.before_step = before_step or (lambda step: None)  # e.g. the NaN injector's step
        self.pending: list[tuple[StepContext, torch.Tensor | None]] = []

    def add(self, ctx: StepContext) -> None:
        self.before_step(ctx.step)
        vec = self.stepper.on_device(ctx.batch, ctx.spike) if self.k > 1 else None
        self.pending.append((ctx, vec))

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.k

    def drain(self) -> Iterator[tuple[StepContext, np.ndarray, bool]]:
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.k == 1:
            for ctx, _ in pending:
                self.before_step(ctx.step)
                yield (ctx, *self.stepper(ctx.batch, ctx.spike))
            return
        host = torch.stack([v for _, v in pending]).cpu().numpy()  # the window's one CPU-GPU sync point
        bad = next((i for i, row in enumerate(host) if not row[-1]), None)
        for (ctx, _), row in zip(pending[:bad], host[:bad]):
            yield ctx, row[:-1], True
        if bad is None:
            return
        self.stepper.thaw()  # weights and optimizer state: as before step `bad`, skipped on the device
        first = pending[bad][0]
        self.stepper.sched.load_state_dict(first.sched_state)
        for group, lr in zip(self.stepper.opt.param_groups, first.lrs):
            group["lr"] = lr
        for ctx, _ in pending[bad:]:  # at sync_every=1's pace, so each is checked before the next
            self.before_step(ctx.step)
            yield (ctx, *self.stepper(ctx.batch, ctx.spike))

    def discard(self) -> list[tuple[StepContext, np.ndarray, bool]]:
        """The measured steps still pending (the run is ending early: a crash, Ctrl-C), read
        without rewinding; steps not yet run on the host path are dropped."""
        pending, self.pending = self.pending, []
        done = [(ctx, v) for ctx, v in pending if v is not None]
        if not done:
            return []
        host = torch.stack([v for _, v in done]).cpu().numpy()
        return [(ctx, row[:-1], bool(row[-1])) for (ctx, _), row in zip(done, host)]


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


def _evaluate_init(work: Any) -> dict[str, Any]:
    """The evaluation before the first step: the validation loss at initialisation (what
    `diverged` and the LR sensitivity's cap compare the final validation loss with: validation
    against validation, not the first training batch), the scream scores of the untrained model,
    and the workload's no-learning baseline (`info["baseline_loss"]`, e.g. the unigram entropy of
    the text), where it has one."""
    with eager(work), phase("evaluating at initialisation", unit="evals"):
        ev = work.evaluate()
    return {"val_loss": ev.get("val_loss", math.nan), "collapsed": ev.get("collapsed"), "scores": ev.get("scores") or {},
            "baseline_loss": work.info.get("baseline_loss", math.nan), "baseline": work.info.get("baseline")}


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
