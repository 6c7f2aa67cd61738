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

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stability import distributed, forensics, snapshots
from stability.config import RunConfig
from stability.detectors.series import certainly_unstable
from stability.devices import resolve_device
from stability.forensics import NanInjector
from stability.observe import Observer, Observers
from stability.preflight import preflight
from stability.record import format as rf
from stability.record.records import Summary
from stability.record.writer import RunWriter
from stability.session import RunSession
from stability.step import StepContext, Stepper, Window
from stability.storage import read_jsonl
from stability.workloads import build


class InjectedCrash(RuntimeError):
    """Raised by `fault.crash_at_step`: a job that crashes on purpose."""


def run(
    cfg: RunConfig,
    run_dir: Path,
    overrides: Sequence[str] = (),
    observers: Sequence[Observer] = (),
    extra_status: dict[str, Any] | None = None,
    world: distributed.World | None = None,
) -> Mapping[str, Any]:
    """Train one configuration into `run_dir`; returns the summary (also in summary.json).

    The folder's lifecycle is a `stability.session.RunSession`: a crash writes status `failed`
    with the error and re-raises; Ctrl-C writes `interrupted`. An exploding or NaN run is a
    result, not a crash: it completes with that verdict. The run holds `run_dir`'s lease
    throughout: `LeaseBusy` if another live process writes there.

    `world`: this process's place in a data-parallel run whose process group the caller has
    joined (`stability.distributed`); every rank calls `run` with the same `run_dir`. Rank 0
    writes it; the other ranks compute the same records (the same weights, the same
    all-reduced measurements) with a writer that writes nothing, so every rank returns the same
    summary and reaches the same decisions (skip, stop) without a broadcast.

    `observers` (`stability.observe.Observer`; `stab run`'s progress bars) follow the loop on
    rank 0 only: `start(epochs, batches)`, each step's record (`steplayout.StepRecord`) and each
    epoch's (`records.EpochRecord`) once the writer has it, and `close(state)` however the run
    ends (completed, failed, interrupted). A rewind's replayed records (`train.rewind_from`) go to
    the writer and its trackers only.
    """
    world = world or distributed.World()
    preflight(cfg)
    distributed.check_batch(cfg.train.batch_size, world.size)
    if world.distributed and cfg.train.threads is None:  # the node's cores, split between its ranks
        from stability.resources import available_cpus

        cfg = cfg.resolve(threads=distributed.threads(world, available_cpus()))
    obs = Observers(observers if world.main else ())
    session = RunSession(cfg, run_dir, overrides, status=extra_status, world=world)
    try:
        with session:
            summary = _train(cfg, session, obs, world)
            session.complete(summary)
    finally:
        obs.close(session.state if session.state != "new" else "failed")
    return summary


def _train(cfg: RunConfig, session: RunSession, obs: Observer, world: distributed.World | None = None) -> Summary:
    """The loop: batch -> step (`Stepper`, through a `Window` of train.sync_every steps) -> record
    (`RunWriter`) per step; evaluate per epoch; the summary from the writer's detectors at the end.
    In a distributed run each rank steps on its shard of the global batch in DDP."""
    tc = cfg.train
    world = world or distributed.World()
    device = resolve_device(tc.device, world)
    parts = build(cfg, device)
    work, model, groups, opt, sched = parts.work, parts.model, parts.groups, parts.opt, parts.sched
    writer = session.writer
    session.describe(device, work.info)
    # DDP around the model; groups, probes, hooks and the workload's own methods see the inner module
    work.model = model = distributed.wrap(work.model, world, device)
    injector = (
        NanInjector(groups[cfg.fault.nan_module], cfg.fault.nan_at_step) if cfg.fault.nan_at_step is not None else None
    )
    ins = parts.instruments(cfg, world.size)
    layout = ins.layout
    session.open_steps(layout)
    stepper = Stepper(work, opt, sched, ins, tc.precision)
    window = Window(stepper, tc.sync_every, lambda s: setattr(injector, "current", s) if injector else None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = max(1, work.n_train // tc.batch_size)  # drop the ragged last batch
    obs.start(tc.epochs, n_batches)
    first_nan: dict[str, Any] | None = None
    epoch_norms: list[float] = []  # total grad norm per epoch, for train.stop_early
    stopped = False
    step = 0

    session.evaluate_init(work)  # the start a diverged run is measured against
    ring = snapshots.SnapshotRing(
        writer.dir / snapshots.FOLDER, tc.snapshot_every, tc.snapshot_keep, write=writer.writes
    )
    first_epoch, first_batch = 1, 0
    if tc.rewind_from:  # continue from a snapshot (stab doctor --try): its run's records up to there are this run's
        snap = _rewind(Path(tc.rewind_from), writer, distributed.unwrap(model), opt, sched, ins.recovery, epoch_norms)
        step, first_epoch, first_batch = int(snap["step"]), int(snap["epoch"]), int(snap["batch"])
        order_gen.set_state(snap["order_state"])
        writer.event(
            {
                "event": "rewound",
                "step": step,
                "epoch": first_epoch,
                "batch": first_batch,
                "snapshot": str(tc.rewind_from),
            }
        )

    model.train()
    try:
        for epoch in range(first_epoch, tc.epochs + 1):
            order_state = order_gen.get_state()  # the data order, as a snapshot keeps it
            order = torch.randperm(work.n_train, generator=order_gen)
            for b in range(first_batch if epoch == first_epoch else 0, n_batches):
                if not window.pending and ring.due(step):  # at a host transfer: no step in flight
                    ring.save(
                        step,
                        snapshots.capture(
                            distributed.unwrap(model),
                            opt,
                            sched,
                            order_state,
                            epoch,
                            b,
                            {"recovery": ins.recovery.state_dict() if ins.recovery else None},
                        ),
                    )
                if not window.pending:
                    t0 = time.perf_counter()
                if cfg.fault.crash_at_step == step:
                    raise InjectedCrash(f"fault.crash_at_step={step}: injected crash")
                idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]  # the global batch; this rank's shard:
                window.add(
                    StepContext(
                        step,
                        epoch,
                        b,
                        idx,
                        work.batch(distributed.shard(idx, world)),
                        cfg.fault.spike_factor if cfg.fault.spike_at_step == step else None,
                        sched.state_dict() if tc.sync_every > 1 else {},
                        [g["lr"] for g in opt.param_groups],
                    )
                )
                step += 1
                if not (window.full or b == n_batches - 1):
                    continue  # measurements stay on the device
                n_window = len(window.pending)
                for ctx, host, finite in window.drain():
                    if not finite:
                        if first_nan is None:  # located on the global batch, on every rank alike
                            batch = work.batch(ctx.indices) if world.distributed else ctx.batch
                            first_nan = forensics.first_nan(
                                writer,
                                work,
                                groups,
                                opt,
                                sched,
                                [batch],
                                ctx.indices,
                                host,
                                layout,
                                ctx.epoch,
                                ctx.batch_index,
                                ctx.step,
                            )
                        opt.zero_grad(set_to_none=True)  # the stepper did not step on them; drop them
                        stopped = tc.on_nan == "stop"
                    # finite: from each parameter's gradient, not from the (huge) total; lr: the one this step used;
                    # step_ms: the window's mean
                    rec = layout.record(
                        host,
                        step=ctx.step,
                        epoch=ctx.epoch,
                        batch=ctx.batch_index,
                        lr=ctx.lrs[0],
                        step_ms=1000 * (time.perf_counter() - t0) / n_window,
                        clip=tc.clip,
                        finite=finite,
                    )
                    writer.step(rec)
                    obs.step(rec)
                    if stopped:
                        step = ctx.step + 1
                        break
                if stopped:
                    break
            erec = session.end_epoch(work, epoch)
            obs.epoch(erec)
            epoch_norms.append(erec["grad_norm_mean"])
            if stopped:
                break
            why = tc.stop_early and certainly_unstable(
                epoch_norms, first_nan, cfg.detect.explode_factor, cfg.detect.explode_window
            )
            if why:  # train.stop_early: the rest of the run cannot make it stable
                writer.event({"event": "stopped_early", "epoch": epoch, "step": step, "reason": why})
                stopped = True
                break
    finally:
        if injector:
            injector.close()
    return writer.finish(
        injected_nan_step=cfg.fault.nan_at_step,
        run_id=cfg.identity(),
        steps=step,
        stopped_early=stopped,
        codec=work.info.get("codec"),
        latent_scale=work.info.get("scale"),
        device=str(device),
        world_size=world.size,
        sync_every=tc.sync_every,
        wall_s=time.time() - session.t_start,
    )


def _rewind(
    path: Path,
    writer: RunWriter,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    recovery: Any,
    epoch_norms: list[float],
) -> dict[str, Any]:
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
        raise ConfigError(
            f"train.rewind_from={str(path)!r}: its run folder {parent} holds {len(before)} step "
            f"records before step {k}; a rewind needs them all"
        )
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
