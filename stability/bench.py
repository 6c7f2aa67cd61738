"""What instrumentation costs: stab's step against a bare PyTorch step, interleaved in one process.

Both loops train their own copy of the same model (same init, same batches). Blocks of steps
alternate between them, so a machine that slows down mid-benchmark slows both alike and the
ratio holds on a noisy machine. The bare loop is forward, loss, backward, clip, step; stab's
adds the per-group gradient norms, the stage probes, the one host transfer, the finiteness
check and building the step's record. Per-epoch extras (validation, scream check, health probe)
are timed separately and reported as a share of an epoch. With trackers (`log=tensorboard`), a
third loop runs stab's step and hands each record to them, and `log_ratio` is its rate over
stab's without them: what the trackers cost per step. With the optimizer-state signals on
(`detect.opt_state`, `stability.optstate`), another loop runs stab's step without them on a
third copy of the model, and `signals_ratio` is stab's rate with them over that: what the signals
cost. The snapshot ring's cost (`stability.snapshots`: capture and write one snapshot of the
model, optimizer, schedule and RNG) is timed after the loops: `snapshot_ms`, `snapshot_bytes`,
and `snapshot_share(every)` its share of the steps between two snapshots.

The machine's matmul rate comes from a large fp32 matrix product timed in the same process; the
model's FLOPs per step from `torch.utils.flop_counter` on one forward+backward.

    result = bench(cfg, steps=60)   # BenchResult(bare_sps=..., stab_sps=..., ratio=..., ...)
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from stability.config import CustomModelConfig, ModelConfig, RunConfig
from stability.devices import resolve_device
from stability.forensics import eager
from stability.step import StepContext, Stepper, Window
from stability.trackers import open_trackers
from stability.workloads import build, make_optimizer


@dataclass
class BenchResult:
    """`stab bench`: steps per second of a bare loop and of stab's, their ratio, and FLOP use."""

    bare_sps: float  # steps per second
    stab_sps: float
    ratio: float  # stab / bare
    flops_per_step: float
    machine_flops: float  # measured matmul FLOP/s
    bare_util: float  # achieved model FLOP/s over machine FLOP/s
    stab_util: float
    epoch_extras_s: float  # validation + scream check + health probe, once per epoch
    epoch_steps_s: float  # an epoch's steps at stab's rate
    steps: int
    device: str
    threads: int
    log_sps: float | None = None  # stab's step with the trackers of `log` fed every record
    log_ratio: float | None = None  # log_sps / stab_sps
    sync_sps: float | None = None  # CUDA only: stab's step at train.sync_every=SYNC_K (one transfer per K steps)
    sync_ratio: float | None = None  # sync_sps / stab_sps (stab_sps: a transfer every step)
    plain_sps: float | None = None  # detect.opt_state on: stab's step without the optimizer-state signals
    signals_ratio: float | None = None  # stab_sps / plain_sps: the signals' own cost
    snapshot_ms: float = 0.0  # one snapshot captured and written (stability.snapshots), mean of SNAPSHOTS
    snapshot_bytes: int = 0  # its size on disk
    cpu_ratio: float = math.nan  # `ratio` by CPU time of this process (bare CPU s / stab CPU s)
    signals_cpu_ratio: float | None = None  # `signals_ratio` by CPU time

    def snapshot_share(self, every: int) -> float:
        """The snapshot's cost as a share of the `every` steps between two snapshots at stab's rate."""
        return self.snapshot_ms / 1000 / (every / self.stab_sps + self.snapshot_ms / 1000)


SYNC_K = 8  # the sync_every compared with 1 on a GPU
SNAPSHOTS = 3  # snapshots timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n fp32 matrix product on this device (best of `reps`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(work: Any, batch: Any) -> float:
    """FLOPs of one forward + backward of the model on `batch`."""
    with FlopCounterMode(display=False) as counter:
        work.loss(batch).backward()
    work.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def interleave(
    arms: dict[str, Any], steps: int, block: int, device: torch.device, cpu: dict[str, float] | None = None
) -> tuple[dict[str, float], int]:
    """Time step functions `arm(i)` side by side: one untimed warm-up block each, then alternating
    blocks of `block` steps until `steps` are done (a machine that slows down slows every arm
    alike). Returns (wall seconds spent per arm, steps done per arm); `cpu`, when given, is
    filled with the CPU seconds of this process per arm (`time.process_time`, all its threads):
    on a machine shared with other jobs, time spent waiting for a core is in the wall time only."""
    for i in range(block):  # warm-up, not timed
        for fn in arms.values():
            fn(i)
    _sync(device)
    spent = dict.fromkeys(arms, 0.0)
    if cpu is not None:
        cpu.update(dict.fromkeys(arms, 0.0))
    done = 0
    while done < steps:
        for arm, fn in arms.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(done, done + block):
                fn(i)
            _sync(device)
            spent[arm] += time.perf_counter() - t0
            if cpu is not None:
                cpu[arm] += time.process_time() - c0
        done += block
    return spent, done


def bench(cfg: RunConfig, steps: int = 60, block: int = 5) -> BenchResult:
    """Time `steps` training steps of `cfg`'s model in a bare loop and in stab's instrumented
    step, alternating blocks of `block` steps in this process (a slowdown of the machine hits
    both alike); the trackers of `cfg.log` receive the records, into a folder thrown away."""
    with tempfile.TemporaryDirectory(prefix="stab-bench-") as tmp:  # the trackers' files, thrown away
        recorder = open_trackers(cfg, Path(tmp) / "bench" / "job")
        try:
            return _bench(cfg, steps, block, recorder)
        finally:
            recorder.close("completed")


def _bench(cfg: RunConfig, steps: int, block: int, recorder: Any) -> BenchResult:
    device = resolve_device(cfg.train.device)
    parts = build(cfg, device, compile=False)  # stab's copy: exactly what a run trains
    work, tc = parts.work, cfg.train
    bare = copy.deepcopy(work.model)  # the bare loop's copy: same init
    if tc.compile:
        # OptimizedModules (modules), typed by torch as callables
        work.model, bare = cast(nn.Module, torch.compile(work.model)), cast(nn.Module, torch.compile(bare))
    g = torch.Generator().manual_seed(cfg.seed)
    batches = [work.batch(torch.randperm(work.n_train, generator=g)[: tc.batch_size]) for _ in range(8)]
    opt_b, sched_b = make_optimizer(bare, tc)
    stepper = Stepper(work, parts.opt, parts.sched, parts.instruments(cfg), tc.precision)
    layout = stepper.layout
    loss_fn = type(work).loss
    bare_work = copy.copy(work)
    bare_work.model = bare
    records: list[Any] = []

    def stab_step(i: int) -> None:
        host, finite = stepper(batches[i % len(batches)])
        records.append(
            layout.record(host, step=i, epoch=1, batch=i, lr=tc.lr, step_ms=0.0, clip=tc.clip, finite=finite)
        )

    def logged_step(i: int) -> None:  # the same, and the record goes to the trackers
        stab_step(i)
        recorder.step(records[-1])

    bf16 = tc.precision == "bf16"

    def bare_step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(bare_work, batches[i % len(batches)])
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip is not None:
            torch.nn.utils.clip_grad_norm_(bare.parameters(), tc.clip)
        opt_b.step()
        sched_b.step()

    if device.type == "cuda":
        block = max(block, SYNC_K)  # a timed block ends with a device sync: at most one per window
    arms = {"bare": bare_step, "stab": stab_step, **({"log": logged_step} if recorder else {})}
    if device.type == "cuda":  # where a host sync stalls the device: the same step at sync_every=SYNC_K
        arms["sync"] = _sync_every_arm(cfg, device, batches)
    if cfg.detect.opt_state:  # the same step without the optimizer-state signals: what they cost
        arms["plain"] = _plain_arm(cfg, device, batches)
    cpu: dict[str, float] = {}
    spent, done = interleave(arms, steps, block, device, cpu)
    t_stab, t_bare = spent["stab"], spent["bare"]

    t0 = time.perf_counter()
    with eager(work):  # as in the loop: per-epoch probes run on the uncompiled model
        work.evaluate()
        if cfg.detect.health and work.health_layers():
            from stability import health

            health.measure(work.model, work.health_loss, work.health_layers())
    extras = time.perf_counter() - t0
    snap_ms, snap_bytes = _snapshot_cost(parts, stepper)

    flops = step_flops(work, batches[0])
    machine = matmul_flops(device)
    bare_sps, stab_sps = done / t_bare, done / t_stab
    n_batches = max(1, work.n_train // tc.batch_size)
    log_sps = done / spent["log"] if "log" in spent else None
    sync_sps = done / spent["sync"] if "sync" in spent else None
    plain_sps = done / spent["plain"] if "plain" in spent else None
    return BenchResult(
        bare_sps,
        stab_sps,
        stab_sps / bare_sps,
        flops,
        machine,
        bare_sps * flops / machine,
        stab_sps * flops / machine,
        extras,
        n_batches / stab_sps,
        done,
        str(device),
        torch.get_num_threads(),
        log_sps,
        log_sps / stab_sps if log_sps else None,
        sync_sps,
        sync_sps / stab_sps if sync_sps else None,
        plain_sps,
        stab_sps / plain_sps if plain_sps else None,
        snap_ms,
        snap_bytes,
        cpu["bare"] / cpu["stab"] if cpu["stab"] > 0 else math.nan,
        cpu["plain"] / cpu["stab"] if "plain" in cpu and cpu["stab"] > 0 else None,
    )


def _plain_arm(cfg: RunConfig, device: torch.device, batches: list[Any]) -> Any:
    """Another copy of the run's model and optimizer (same init), stepped by stab's step with
    `detect.opt_state=false`: the loop the signals are measured against."""
    plain = cfg.replace(detect=cfg.detect.replace(opt_state=False))  # a validated config is frozen
    parts = build(plain, device, compile=False)
    stepper = Stepper(parts.work, parts.opt, parts.sched, parts.instruments(plain), plain.train.precision)

    def step(i: int) -> None:
        stepper(batches[i % len(batches)])

    return step


def _snapshot_cost(parts: Any, stepper: Stepper) -> tuple[float, int]:
    """(ms, bytes) of one snapshot of the trained model, optimizer, schedule and recovery state,
    captured and written by the run's `SnapshotRing` into a temporary folder, mean of SNAPSHOTS."""
    from stability import snapshots

    with tempfile.TemporaryDirectory(prefix="stab-bench-snap-") as tmp:
        ring = snapshots.SnapshotRing(Path(tmp), every=1, keep=SNAPSHOTS)
        order = torch.Generator().manual_seed(0).get_state()
        rec = stepper.recovery
        t0 = time.perf_counter()
        for i in range(SNAPSHOTS):
            extra = {"recovery": rec.state_dict() if rec else None}
            ring.save(i, snapshots.capture(parts.model, parts.opt, parts.sched, order, 1, i, extra))
        ms = 1000 * (time.perf_counter() - t0) / SNAPSHOTS
        return ms, max(ring.bytes.values())


def _sync_every_arm(cfg: RunConfig, device: torch.device, batches: list[Any]) -> Any:
    """A third copy of the run's model, optimizer and probes stepped through `Window` at
    sync_every=SYNC_K: measurements stay on the device, one transfer per SYNC_K steps (timed
    blocks are SYNC_K steps on CUDA, so each block ends with its window's transfer)."""
    parts = build(cfg, device, compile=False)
    tc = cfg.train
    stepper = Stepper(parts.work, parts.opt, parts.sched, parts.instruments(cfg), tc.precision)
    window = Window(stepper, SYNC_K)
    idx = torch.arange(tc.batch_size)

    def step(i: int) -> None:
        window.add(
            StepContext(
                i,
                1,
                i,
                idx,
                batches[i % len(batches)],
                None,
                parts.sched.state_dict(),
                [g["lr"] for g in parts.opt.param_groups],
            )
        )
        if window.full:
            for _ in window.drain():
                pass

    return step


# ----------------------------------------------------------------------------------------------
# Bookkeeping: the run folder's writer alone, on synthetic steps


@dataclass
class BookkeepingResult:
    """`stab bench --bookkeeping`: what recording costs per step with no model (time, memory, bytes)."""

    steps: int
    groups: int  # module groups per step record
    us_per_step: float  # microseconds per step: building the record, the writer, the detectors, epoch ends
    rss_growth_mb: float  # resident memory after the steps minus before (MB = 2**20 bytes)
    epoch_steps: int  # steps per epoch
    bytes_written: int  # size of the run folder at the end


def _rss() -> int:
    """This process's resident set size in bytes (Linux /proc), after a garbage collection."""
    import gc
    import resource

    gc.collect()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current: an upper bound


def bookkeeping(cfg: RunConfig, n_steps: int, epoch_steps: int = 500, seed: int = 0) -> BookkeepingResult:
    """Feed `n_steps` synthetic steps of `cfg`'s model (its module groups and stages; no model is
    trained) through the real `RunWriter` into a temporary folder, in epochs of `epoch_steps`
    steps, and time it all: building each step record from a host vector, the writer (aggregates,
    metrics.jsonl, grad table, epochs.jsonl), the detectors, and the summary at the end."""
    from types import SimpleNamespace

    import numpy as np

    from stability.record.summarizer import Summarizer
    from stability.record.writer import RunWriter
    from stability.steplayout import STAGE, StepLayout
    from stability.workloads import build_model

    if isinstance(cfg.model, CustomModelConfig):  # its factory builds the model with its data
        from stability.workloads.custom import CustomWorkload

        names, n_stages, clamp = list(CustomWorkload(cfg, torch.device("cpu")).module_groups()), 0, None
    else:
        from stability.models.cascade import Cascade

        model = build_model(cfg.model)
        names = list(model.module_groups())
        n_stages = len(model.rms_matchers()) if isinstance(model, Cascade) else 0
        clamp = cfg.model.rms_clamp if n_stages and isinstance(cfg.model, ModelConfig) else None
        del model
    layout = StepLayout(names, n_stages, [SimpleNamespace(metrics=STAGE)] if n_stages else [], clamp)
    rng = np.random.default_rng(seed)
    pool = np.abs(rng.lognormal(0.0, 0.5, size=(64, layout.width)))  # host rows: loss, norms, stage stats
    pool[:, layout.slices["grads_finite"]] = 1.0
    evaluation = {"val_loss": 1.0, "collapsed": False, "scores": {"dominant": 0.1}, "target_scores": {"dominant": 0.1}}
    with tempfile.TemporaryDirectory(prefix="stab-bookkeeping-") as tmp:
        run_dir = Path(tmp)
        before = _rss()
        t0 = time.perf_counter()
        writer = RunWriter(run_dir)
        writer.open(names, n_stages, Summarizer(cfg.detect, cfg.train.clip))
        for step in range(n_steps):
            epoch, b = step // epoch_steps + 1, step % epoch_steps
            host = pool[step % len(pool)]
            rec = layout.record(host, step=step, epoch=epoch, batch=b, lr=1e-3, step_ms=1.0, clip=10.0)
            writer.step(rec)
            if b == epoch_steps - 1 or step == n_steps - 1:
                writer.epoch({**writer.close_epoch(), **evaluation})
        writer.finish(run_id="bench", steps=n_steps)
        elapsed = time.perf_counter() - t0
        growth = _rss() - before
        written = sum(p.stat().st_size for p in run_dir.iterdir())
        del writer
    return BookkeepingResult(n_steps, len(names), 1e6 * elapsed / n_steps, growth / 2**20, epoch_steps, written)
