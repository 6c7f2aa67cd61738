"""The instrumented training loop and the run folder it writes.

The loop reads top to bottom: batch -> forward -> loss -> backward -> measure -> (one host
transfer) -> non-finite check -> clip -> step -> record. Everything measured in a step is
concatenated into one device vector and moved to the host once; per-step records are
appended to `metrics.jsonl` in batches, per-epoch tables are rewritten atomically.

    summary = run(RunConfig(), Path("runs/example"), overrides=["norm=pre"])

Run folder (anyone can `ls` it; `stab report` needs nothing else):
    config.yaml      resolved configuration        overrides.json   what the user changed
    status.json      running/completed/failed/interrupted, pid, error
    metrics.jsonl    one record per step            epochs.jsonl     one record per epoch
    grad_norms.csv   module group x epoch (mean, max)
    events.jsonl     first NaN, spikes, clamp saturation, scream onset
    summary.json     verdict, first_nan, scream_epoch, grad_norm_by_epoch, final_loss, ...
    samples.txt      text workloads: each epoch's greedy generations (also in epochs.jsonl)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from stability import detectors, distributed, health
from stability.config import RunConfig
from stability.instrument import GradProbe, NonFiniteProbe, StageProbe
from stability.errors import StorageError
from stability.rundirs import RunLease
from stability.storage import (append_jsonl, atomic_write_bytes, atomic_write_text, read_json, write_json, write_status,
                               write_yaml)
from stability.preflight import preflight
from stability.progress import phase
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


def _epoch_grad_table(records: list[dict[str, Any]], groups: Sequence[str]) -> pd.DataFrame:
    """Rows: 'total' then module groups; columns: e{N}_mean, e{N}_max. NaN stays NaN."""
    df = pd.DataFrame(records)
    cols: dict[str, pd.Series] = {}
    keys = ["grad/norm"] + [f"grad/{g}" for g in groups]
    for epoch, part in df.groupby("epoch", sort=True):
        vals = part[keys].to_numpy(dtype=float)
        # np.mean/np.max propagate NaN: an epoch with a non-finite step shows as NaN.
        cols[f"e{epoch}_mean"] = pd.Series(vals.mean(0), index=["total", *groups])
        cols[f"e{epoch}_max"] = pd.Series(vals.max(0), index=["total", *groups])
    table = pd.DataFrame(cols)
    table.index.name = "group"
    return table


def _write_grad_table(run_dir: Path, steps: list[dict[str, Any]], names: list[str]) -> None:
    atomic_write_text(run_dir / "grad_norms.csv", _epoch_grad_table(steps, names).to_csv(float_format="%.6g"))


def _write_status(run_dir: Path, fresh: bool = False, **fields: Any) -> None:
    path = run_dir / "status.json"
    status = read_json(path) if path.exists() and not fresh else {}
    status.update(fields, updated=time.time())
    write_status(path, status)  # padded, and written in place if the disk is full


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
    all-reduced measurements) into a scratch folder that is deleted at the end, so every rank
    returns the same summary and reaches the same decisions (skip, stop) without a broadcast.
    """
    world = world or distributed.World()
    preflight(cfg)
    distributed.check_batch(cfg.train.batch_size, world.size)
    if world.distributed and cfg.train.threads is None:  # the node's cores, split between its ranks
        from stability.resources import available_cpus
        cfg.train.threads = distributed.threads(world, available_cpus())
    if not world.main:
        scratch = Path(tempfile.mkdtemp(prefix=f"stab-rank{world.rank}-"))
        try:
            return _run(cfg, scratch, overrides, Callbacks(), extra_status, world)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lease = RunLease(run_dir, **{k: v for k, v in (extra_status or {}).items() if k == "owner"}).acquire()
    try:
        return _run(cfg, run_dir, overrides, callbacks or Callbacks(), extra_status, world)
    finally:
        lease.release()


def _run(cfg: RunConfig, run_dir: Path, overrides: Sequence[str], cb: Callbacks,
         extra_status: dict[str, Any] | None, world: distributed.World) -> dict[str, Any]:
    for stale in ("metrics.jsonl", "epochs.jsonl", "events.jsonl", "summary.json", "grad_norms.csv", "samples.txt"):
        (run_dir / stale).unlink(missing_ok=True)  # a re-run starts its streams afresh
    shutil.rmtree(run_dir / "forensics", ignore_errors=True)  # an earlier attempt's NaN is not this run's
    write_yaml(run_dir / "config.yaml", cfg.to_dict())
    write_json(run_dir / "overrides.json", {"overrides": list(overrides), "run_id": cfg.identity()})
    t_start = time.time()
    _write_status(run_dir, fresh=True, state="running", run_id=cfg.identity(), pid=os.getpid(), host=socket.gethostname(),
                  started=t_start, finished=None, error=None, **(extra_status or {}))
    # no tracker: imports nothing; in a distributed run, rank 0's only
    recorder, state = open_trackers(cfg, run_dir, overrides) if world.main else Recorder(), "failed"
    try:
        summary = _train(cfg, run_dir, cb, t_start, recorder, world)
        state = "completed"
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "SIGINT"
        _last_words(_write_status, run_dir, state="interrupted", finished=time.time(), error=f"interrupted ({how})")
        state = "interrupted"
        raise
    except BaseException as e:
        _last_words(_write_status, run_dir, state="failed", finished=time.time(), error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
        failed = {"verdict": "failed", "evidence": f"{type(e).__name__}: {e}", "run_id": cfg.identity(),
                  "wall_s": time.time() - t_start}
        _last_words(write_json, run_dir / "summary.json", failed)
        recorder.summary(failed)
        raise
    finally:
        cb.close()
        recorder.close(state)
    _write_status(run_dir, state="completed", finished=time.time(), verdict=summary["verdict"])
    return summary


def _train(cfg: RunConfig, run_dir: Path, cb: Callbacks, t_start: float,
           recorder: Recorder | None = None, world: distributed.World | None = None) -> dict[str, Any]:
    tc = cfg.train
    world = world or distributed.World()
    device = distributed.device(world, tc.device) if world.distributed else resolve_device(tc.device)
    parts = build(cfg, device)
    work, model, groups, names, opt, sched = parts.work, parts.model, parts.groups, parts.names, parts.opt, parts.sched
    write_json(run_dir / "data.json", work.info)
    _write_status(run_dir, device=str(device), threads=torch.get_num_threads(),
                  torch=torch.__version__, python=platform.python_version())

    n_stages = parts.n_stages
    # DDP around the model; groups, probes, hooks and the workload's own methods see the inner module
    work.model = model = distributed.wrap(work.model, world, device)
    injector = (NanInjector(groups[cfg.fault.nan_module], cfg.fault.nan_at_step)
                if cfg.fault.nan_at_step is not None else None)
    stepper = Stepper(work, opt, sched, parts.grad_probe, parts.stage_probe, tc.clip, tc.precision, world.size)
    window = Window(stepper, tc.sync_every, lambda s: setattr(injector, "current", s) if injector else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = max(1, work.n_train // tc.batch_size)  # drop the ragged last batch
    cb.start(tc.epochs, n_batches)

    steps: list[dict[str, Any]] = []  # every step's record (host floats), for the epoch tables
    pending: list[dict[str, Any]] = []  # not yet appended to metrics.jsonl
    epochs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    first_nan: dict[str, Any] | None = None
    clamp_seen = [False] * n_stages
    stopped = False
    step = 0
    recorder = recorder or Recorder()  # the trackers get every record the run folder gets

    def event(name: str, **fields: Any) -> None:
        rec = {"event": name, **fields}
        events.append(rec)
        append_jsonl(run_dir / "events.jsonl", [rec])
        recorder.event(rec)

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
                    epoch_, b_, step_ = ctx.epoch, ctx.batch_index, ctx.step
                    if not finite:
                        if first_nan is None:  # located on the global batch, on every rank alike
                            global_batch = work.batch(ctx.indices) if world.distributed else ctx.batch
                            with eager(work):
                                first_nan = _locate_nan(work, global_batch, groups, host, names, epoch_, b_, step_)
                                first_nan["forensics"] = save_forensics(run_dir, work, opt, sched, global_batch,
                                                                        ctx.indices, first_nan)
                            event("first_nan", **first_nan)
                        opt.zero_grad(set_to_none=True)  # the stepper did not step on them; drop them
                        if tc.on_nan == "stop":
                            stopped = True
                    rec = _step_record(host, names, n_stages,
                                       cfg.model.rms_clamp if n_stages and cfg.model.rms_match else None, step_, epoch_, b_)
                    rec["finite"] = finite  # from each parameter's gradient, not from the (huge) total
                    rec["grad/clipped"] = bool(finite and tc.clip is not None and host[1] > tc.clip)
                    rec["lr"] = ctx.lrs[0]
                    rec["time/step_ms"] = 1000 * (time.perf_counter() - t0) / n_window  # the window's mean
                    for i in range(n_stages):
                        if rec[f"stage{i}/clamped"] and not clamp_seen[i]:
                            clamp_seen[i] = True
                            event("clamp_saturation", stage=i, step=step_, epoch=epoch_, batch=b_,
                                  ratio=rec[f"stage{i}/ratio"], scale=rec[f"stage{i}/scale"])
                    steps.append(rec)
                    pending.append(rec)
                    recorder.step(rec)
                    cb.step(epoch_, b_, rec["loss"])
                    if stopped:
                        step = step_ + 1
                        break
                if stopped:
                    break
            append_jsonl(run_dir / "metrics.jsonl", pending)
            pending.clear()
            with eager(work), phase(f"evaluating epoch {epoch}", unit="epochs"):  # validation, scream check, health
                erec = _epoch_record(work, steps, epoch, names, n_stages, stopped, cfg.detect.health)
                erec.update(work.listen(epoch, run_dir))  # {"audio": [...]} at listen epochs
            epochs.append(erec)
            append_jsonl(run_dir / "epochs.jsonl", [erec])
            recorder.epoch(erec)
            if erec.get("samples"):  # a text workload's greedy generations, readable with `cat`
                with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.writelines(f"=== epoch {epoch}, prompt {i}: {s['prompt']!r}\n{s['output']}\n"
                                 for i, s in enumerate(erec["samples"]))
            _write_grad_table(run_dir, steps, names)
            cb.epoch(epoch, erec)
            if stopped:
                break

    except BaseException:  # Ctrl-C, SIGTERM, a crash: keep every step recorded so far
        append_jsonl(run_dir / "metrics.jsonl", pending)
        if steps:
            _write_grad_table(run_dir, steps, names)
        raise

    if injector:
        injector.close()
    dc = cfg.detect
    huge = detectors.peak_norm([r["grad/norm"] for r in steps], dc.explode_step_factor)
    peak = None
    if huge is not None:
        i, ratio = huge
        peak = {"value": steps[i]["grad/norm"], "ratio": ratio, **{k: steps[i][k] for k in ("step", "epoch", "batch")}}
        event("grad_explosion", **peak)
    diag = detectors.diagnose(epochs, first_nan, tc.clip, dc.explode_factor, dc.explode_window,
                              dc.scream.min_epochs, dc.scream.learning, dc.clamp_warn, dc.logit_growth, peak)
    if diag["verdict"] == "nan" and cfg.fault.nan_at_step is not None:  # say so: this NaN was put there on purpose
        diag["evidence"] += f" (injected: fault.nan_at_step={cfg.fault.nan_at_step})"
    scream_epoch = diag["scream_epoch"]
    if scream_epoch is not None:
        onset = next(e for e in epochs if e["epoch"] == scream_epoch)
        event("scream", epoch=scream_epoch, scores=onset["scores"], target_scores=onset["target_scores"])
    norms = [e["grad_norm_mean"] for e in epochs]
    spikes = detectors.detect_spikes([r["grad/norm"] for r in steps], dc.spike_window, dc.spike_z, dc.spike_warmup,
                                     dc.spike_ratio)
    loss_spikes = detectors.detect_spikes([r["loss"] for r in steps], dc.spike_window, dc.spike_z, dc.spike_warmup,
                                          dc.spike_ratio)
    for kind, found, key in (("grad_spike", spikes, "grad/norm"), ("loss_spike", loss_spikes, "loss")):
        for i in found[:20]:  # the first few; the count is in the summary
            event(kind, step=steps[i]["step"], epoch=steps[i]["epoch"], batch=steps[i]["batch"], value=steps[i][key])
    first_spike = min([steps[found[0]]["step"] for found in (spikes, loss_spikes) if found], default=None)
    losses = [r["loss"] for r in steps]
    summary = {
        "verdict": diag["verdict"], "evidence": diag["evidence"], "run_id": cfg.identity(),
        "flags": diag["flags"], "warnings": diag["warnings"],
        "first_nan": first_nan, "scream_epoch": scream_epoch, "grad_explosion": peak,
        "grad_norm_by_epoch": norms, "grad_norm_max_by_epoch": [e["grad_norm_max"] for e in epochs],
        "loss_by_epoch": [e["loss"] for e in epochs], "val_loss_by_epoch": [e["val_loss"] for e in epochs],
        "final_loss": losses[-1] if losses else math.nan,
        "final_val_loss": epochs[-1]["val_loss"] if epochs else math.nan,
        "growth_per_epoch": detectors.growth_per_epoch(norms),
        "first_spike_step": first_spike, "n_grad_spikes": len(spikes), "n_loss_spikes": len(loss_spikes),
        # how many steps the first spike came before the event (the first NaN, else for an exploding
        # run its largest grad norm): the warning time a user had
        "spike_lead_steps": detectors.spike_lead(first_spike, first_nan, diag["verdict"],
                                                 [r["grad/norm"] for r in steps]),
        "clip_rate": float(np.mean([r["grad/clipped"] for r in steps])) if steps else math.nan,
        "nonfinite_steps": sum(1 for r in steps if not r["finite"]),
        "epochs_run": len(epochs), "steps": step, "stopped_early": stopped,
        "stage_rms_last_epoch": epochs[-1]["stage_rms"] if epochs else None,
        "stage_scale_last_epoch": epochs[-1]["stage_scale"] if epochs else None,
        "codec": work.info.get("codec"), "latent_scale": work.info.get("scale"),
        "device": str(device), "world_size": world.size, "sync_every": tc.sync_every,
        "wall_s": time.time() - t_start,
    }
    write_json(run_dir / "summary.json", summary)
    recorder.summary(summary)
    return summary


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
    G = len(names)
    rec: dict[str, Any] = {"step": step, "epoch": epoch, "batch": batch, "loss": float(host[0]),
                           "grad/norm": float(host[1])}
    rec.update({f"grad/{n}": float(v) for n, v in zip(names, host[2:2 + G])})
    stage = host[2 + G:]
    for i in range(n_stages):
        rms, ratio, scale = stage[i], stage[n_stages + i], stage[2 * n_stages + i]
        rec[f"stage{i}/rms"] = float(rms)
        rec[f"stage{i}/ratio"] = float(ratio)
        rec[f"stage{i}/scale"] = float(scale)
        rec[f"stage{i}/clamped"] = clamp is not None and bool(ratio < clamp[0] or ratio > clamp[1])
    rec["finite"] = bool(np.isfinite(host[:2 + G]).all())
    return rec


def _epoch_record(work: Any, steps: list[dict[str, Any]], epoch: int, names: list[str],
                  n_stages: int, stopped: bool, health_on: bool) -> dict[str, Any]:
    mine = [r for r in steps if r["epoch"] == epoch]
    g = np.array([r["grad/norm"] for r in mine])
    ev = work.evaluate() if not stopped else {"val_loss": math.nan, "collapsed": None, "scores": {},
                                               "target_scores": work.target_scores, "codes_head": []}
    layers_of = work.health_layers() if health_on and not stopped else {}
    if layers_of:
        layers = health.measure(work.model, work.health_loss, layers_of)
        ev["health"], ev["health_summary"] = layers, health.summarize(layers)
    return {
        "epoch": epoch, "steps": len(mine),
        "loss": float(np.mean([r["loss"] for r in mine])),
        "grad_norm_mean": float(g.mean()), "grad_norm_max": float(g.max()),
        "clip_rate": float(np.mean([r["grad/clipped"] for r in mine])),
        "stage_rms": [float(np.mean([r[f"stage{i}/rms"] for r in mine])) for i in range(n_stages)],
        "stage_ratio": [float(np.mean([r[f"stage{i}/ratio"] for r in mine])) for i in range(n_stages)],
        "stage_scale": [float(np.mean([r[f"stage{i}/scale"] for r in mine])) for i in range(n_stages)],
        "stage_clamp_rate": [float(np.mean([r[f"stage{i}/clamped"] for r in mine])) for i in range(n_stages)],
        **ev,
    }


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
