"""The instrumented training loop.

The loop reads top to bottom: batch -> forward -> loss -> backward -> measure -> (one host
transfer) -> non-finite check -> clip -> step -> record. Everything measured in a step is
packed into one device vector by the run's `StepLayout` and moved to the host once
(`stability.step.Stepper`, every `train.sync_every` steps through `Window`); the step's record
goes to the run folder's writer (`stability.record.writer.RunWriter`), which owns every file, keeps
the epoch's aggregates as steps arrive and feeds the detectors (`stability.record.summarizer`). The
files and their fields are defined in `stability.record.format` and docs/run-format.md.

    summary = run(RunConfig(), Path("runs/example"), overrides=["norm=pre"])
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stability import detectors, distributed, health, snapshots
from stability.config import RunConfig
from stability.errors import StorageError
from stability.instrument import NonFiniteProbe
from stability.preflight import preflight
from stability.progress import phase
from stability.record import format as rf
from stability.record.format import SCHEMA_VERSION
from stability.record.summarizer import Summarizer
from stability.record.writer import RunWriter
from stability.rundirs import RunLease
from stability.step import StepContext, Stepper, Window
from stability.steplayout import StepLayout
from stability.storage import atomic_write_bytes, read_jsonl
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
    writer.open(names, n_stages, Summarizer(cfg.detect, tc.clip))
    # DDP around the model; groups, probes, hooks and the workload's own methods see the inner module
    work.model = model = distributed.wrap(work.model, world, device)
    injector = (NanInjector(groups[cfg.fault.nan_module], cfg.fault.nan_at_step)
                if cfg.fault.nan_at_step is not None else None)
    ins = parts.instruments(cfg, world.size)
    layout = ins.layout
    stepper = Stepper(work, opt, sched, ins, tc.precision)
    window = Window(stepper, tc.sync_every, lambda s: setattr(injector, "current", s) if injector else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = max(1, work.n_train // tc.batch_size)  # drop the ragged last batch
    cb.start(tc.epochs, n_batches)
    first_nan: dict[str, Any] | None = None
    epoch_norms: list[float] = []  # total grad norm per epoch, for train.stop_early
    stopped = False
    step = 0

    writer.event({"event": "init_eval", **_evaluate_init(work)})  # the start a diverged run is measured against
    ring = snapshots.SnapshotRing(run_dir / snapshots.FOLDER, tc.snapshot_every, tc.snapshot_keep, write=writer.writes)
    first_epoch, first_batch = 1, 0
    if tc.rewind_from:  # continue from a snapshot (stab doctor --try): its run's records up to there are this run's
        snap = _rewind(Path(tc.rewind_from), writer, distributed.unwrap(model), opt, sched, ins.recovery, epoch_norms)
        step, first_epoch, first_batch = int(snap["step"]), int(snap["epoch"]), int(snap["batch"])
        order_gen.set_state(snap["order_state"])
        writer.event({"event": "rewound", "step": step, "epoch": first_epoch, "batch": first_batch,
                      "snapshot": str(tc.rewind_from)})

    model.train()
    try:
        for epoch in range(first_epoch, tc.epochs + 1):
            order_state = order_gen.get_state()  # the data order, as a snapshot keeps it
            order = torch.randperm(work.n_train, generator=order_gen)
            for b in range(first_batch if epoch == first_epoch else 0, n_batches):
                if not window.pending and ring.due(step):  # at a host transfer: no step in flight
                    ring.save(step, snapshots.capture(distributed.unwrap(model), opt, sched, order_state, epoch, b,
                                                      {"recovery": ins.recovery.state_dict() if ins.recovery else None}))
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
                                                   layout, ctx.epoch, ctx.batch_index, ctx.step)
                        opt.zero_grad(set_to_none=True)  # the stepper did not step on them; drop them
                        stopped = tc.on_nan == "stop"
                    # finite: from each parameter's gradient, not from the (huge) total; lr: the one this step used;
                    # step_ms: the window's mean
                    rec = layout.record(host, step=ctx.step, epoch=ctx.epoch, batch=ctx.batch_index, lr=ctx.lrs[0],
                                        step_ms=1000 * (time.perf_counter() - t0) / n_window, clip=tc.clip,
                                        finite=finite)
                    writer.step(rec)
                    cb.step(ctx.epoch, ctx.batch_index, rec.loss)
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


def _rewind(path: Path, writer: RunWriter, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
            recovery: Any, epoch_norms: list[float]) -> dict[str, Any]:
    """Load a snapshot into the run (`snapshots.restore`) and feed the writer the snapshot's run's
    records before it: its steps (so the epoch aggregates and detectors see the whole run) and
    the evaluations of its finished epochs. Raises ConfigError naming train.rewind_from when the
    file is not a snapshot, its run folder has no records, or its weights do not fit the model."""
    from stability.config import ConfigError

    try:
        snap = snapshots.load(path)
        snapshots.restore(snap, model, opt, sched)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.rewind_from={str(path)!r}: {e}") from None
    if recovery is not None:
        recovery.load_state_dict((snap.get("extra") or {}).get("recovery") or {})
    parent = path.parent.parent
    steps, _ = read_jsonl(parent / rf.METRICS)
    epochs = {int(e["epoch"]): e for e in read_jsonl(parent / rf.EPOCHS)[0] if "epoch" in e}
    k, epoch = int(snap["step"]), int(snap["epoch"])
    before = [r for r in steps if int(r.get(rf.STEP, -1)) < k]
    if len(before) < k:
        raise ConfigError(f"train.rewind_from={str(path)!r}: its run folder {parent} holds {len(before)} step "
                          f"records before step {k}; a rewind needs them all")
    for r in before:
        if writer.stats is not None and int(r[rf.EPOCH]) != writer.stats.epoch:
            _replay_epoch(writer, epochs, writer.stats.epoch, epoch_norms)
        writer.step(r)
    if writer.stats is not None and writer.stats.epoch < epoch:
        _replay_epoch(writer, epochs, writer.stats.epoch, epoch_norms)
    return snap


def _replay_epoch(writer: RunWriter, epochs: dict[int, dict[str, Any]], epoch: int, epoch_norms: list[float]) -> None:
    """Close a replayed epoch: the writer's aggregates with the snapshot's run's evaluation of it."""
    erec = {**epochs.get(epoch, {"epoch": epoch}), **writer.close_epoch()}
    writer.epoch(erec)
    epoch_norms.append(erec["grad_norm_mean"])


def _first_nan(writer: RunWriter, work: Any, groups: dict[str, list[torch.nn.Module]], opt: torch.optim.Optimizer,
               sched: Any, batch: Any, indices: torch.Tensor, host: np.ndarray, layout: StepLayout, epoch: int, b: int,
               step: int) -> dict[str, Any]:
    """Name where the first non-finite value started, save what `stab replay` needs, record the event."""
    with eager(work):
        found = _locate_nan(work, batch, groups, host, layout, epoch, b, step)
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
                layout: StepLayout, epoch: int, b: int, step: int) -> dict[str, Any]:
    """Re-run the offending step (same weights, same batch) with per-module checks to name the
    module group where the non-finite value started. Runs once per run, so its syncs are free."""
    loss, total = float(layout.take(host, "loss")[0]), float(layout.take(host, "grad_norm")[0])
    kind = "loss" if not math.isfinite(loss) else "grad"
    probe = NonFiniteProbe(groups)
    try:
        work.model.zero_grad(set_to_none=True)
        work.loss(batch).backward()  # a non-finite loss still walks the backward for the grad hooks
    finally:
        probe.close()
        work.model.zero_grad(set_to_none=True)
    module, where = probe.first
    if module is None:  # not reproducible on re-run: fall back to the recorded per-group norms
        bad = layout.nonfinite_groups(host)
        module, where = (bad[-1] if bad else "unknown"), "recorded grad norms"
    return {"epoch": epoch, "batch": b, "step": step, "kind": kind, "module": module, "where": where,
            "loss": loss, "grad_norm": total}
