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
    In a distributed run each rank steps on its shard of the global batch in DDP. The steps, in
    order: set up (`_Loop`), evaluate at initialisation and rewind (`start`), the epochs
    (`run`), the summary (`finish`)."""
    loop = _Loop(cfg, session, obs, world or distributed.World())
    first_epoch, first_batch = loop.start()
    loop.run(first_epoch, first_batch)
    return loop.finish()


class _Loop:
    """One run's training loop and what it carries from step to step: the built workload, model
    and optimizer, the step window, the data order's generator, the global step, the first
    non-finite step's event, the epochs' grad norms (for train.stop_early) and whether it stopped."""

    def __init__(self, cfg: RunConfig, session: RunSession, obs: Observer, world: distributed.World) -> None:
        self.cfg, self.tc, self.session, self.obs, self.world = cfg, cfg.train, session, obs, world
        self.device = resolve_device(self.tc.device, world)
        parts = build(cfg, self.device)
        self.work, self.groups, self.opt, self.sched = parts.work, parts.groups, parts.opt, parts.sched
        self.writer = session.writer
        session.describe(self.device, self.work.info)
        # DDP around the model; groups, probes, hooks and the workload's own methods see the inner module
        self.work.model = self.model = distributed.wrap(self.work.model, world, self.device)
        fault = cfg.fault
        self.injector = (
            NanInjector(self.groups[fault.nan_module], fault.nan_at_step) if fault.nan_at_step is not None else None
        )
        self.ins = parts.instruments(cfg, world.size)
        self.layout = self.ins.layout
        session.open_steps(self.layout)
        stepper = Stepper(self.work, self.opt, self.sched, self.ins, self.tc.precision)
        self.window = Window(stepper, self.tc.sync_every, self._before_step)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.n_batches = max(1, self.work.n_train // self.tc.batch_size)  # drop the ragged last batch
        obs.start(self.tc.epochs, self.n_batches)
        self.first_nan: dict[str, Any] | None = None
        self.epoch_norms: list[float] = []  # total grad norm per epoch, for train.stop_early
        self.stopped = False
        self.step = 0
        self.t0 = 0.0  # when the window's first step was added: its steps' step_ms

    def _before_step(self, step: int) -> None:
        """The NaN injector learns the step about to run (`fault.nan_at_step`)."""
        if self.injector:
            self.injector.current = step

    def start(self) -> tuple[int, int]:
        """The evaluation at initialisation (the start a diverged run is measured against), the
        snapshot ring, and a rewind (`train.rewind_from`: continue from a snapshot, for `stab
        doctor --try`; its run's records up to there are this run's). Returns the (epoch, batch)
        the loop starts at."""
        tc, writer = self.tc, self.writer
        self.session.evaluate_init(self.work)
        self.ring = snapshots.SnapshotRing(
            writer.dir / snapshots.FOLDER, tc.snapshot_every, tc.snapshot_keep, write=writer.writes
        )
        if not tc.rewind_from:
            return 1, 0
        unwrapped = distributed.unwrap(self.model)
        snap = _rewind(
            Path(tc.rewind_from), writer, unwrapped, self.opt, self.sched, self.ins.recovery, self.epoch_norms
        )
        self.step, first_epoch, first_batch = int(snap["step"]), int(snap["epoch"]), int(snap["batch"])
        self.order_gen.set_state(snap["order_state"])
        writer.event(
            {
                "event": "rewound",
                "step": self.step,
                "epoch": first_epoch,
                "batch": first_batch,
                "snapshot": str(tc.rewind_from),
            }
        )
        return first_epoch, first_batch

    def run(self, first_epoch: int, first_batch: int) -> None:
        """The epochs from `first_epoch` (its batches from `first_batch`) to train.epochs, or to a
        stop; the NaN injector's hooks are removed however the loop ends."""
        self.model.train()
        try:
            for epoch in range(first_epoch, self.tc.epochs + 1):
                self._epoch(epoch, first_batch if epoch == first_epoch else 0)
                if self._end_epoch(epoch):
                    break
        finally:
            if self.injector:
                self.injector.close()

    def _epoch(self, epoch: int, first_batch: int) -> None:
        """One epoch's batches from `first_batch`, in the epoch's data order: a snapshot where due,
        each step added to the window, the window's records written when it is full, at the
        epoch's last batch, or not at all after a stop."""
        order_state = self.order_gen.get_state()  # the data order, as a snapshot keeps it
        order = torch.randperm(self.work.n_train, generator=self.order_gen)
        for b in range(first_batch, self.n_batches):
            if not self.window.pending and self.ring.due(self.step):  # at a host transfer: no step in flight
                self._snapshot(order_state, epoch, b)
            if not self.window.pending:
                self.t0 = time.perf_counter()
            if self.cfg.fault.crash_at_step == self.step:
                raise InjectedCrash(f"fault.crash_at_step={self.step}: injected crash")
            self._add(order, epoch, b)
            self.step += 1
            if not (self.window.full or b == self.n_batches - 1):
                continue  # measurements stay on the device
            self._drain()
            if self.stopped:
                break

    def _snapshot(self, order_state: torch.Tensor, epoch: int, b: int) -> None:
        """A snapshot before step `self.step` (batch `b` of `epoch`): model, optimizer, schedule,
        the data order and the recovery policies' state (`snapshots.capture`)."""
        extra = {"recovery": self.ins.recovery.state_dict() if self.ins.recovery else None}
        state = snapshots.capture(distributed.unwrap(self.model), self.opt, self.sched, order_state, epoch, b, extra)
        self.ring.save(self.step, state)

    def _add(self, order: torch.Tensor, epoch: int, b: int) -> None:
        """Put step `self.step` (batch `b` of the epoch's `order`) into the window: the global
        batch's indices, this rank's shard of it, the injected spike, the schedule, the lrs."""
        tc, fault, step = self.tc, self.cfg.fault, self.step
        idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]  # the global batch; this rank's shard:
        self.window.add(
            StepContext(
                step,
                epoch,
                b,
                idx,
                self.work.batch(distributed.shard(idx, self.world)),
                fault.spike_factor if fault.spike_at_step == step else None,
                self.sched.state_dict() if tc.sync_every > 1 else {},
                [g["lr"] for g in self.opt.param_groups],
            )
        )

    def _drain(self) -> None:
        """The window's steps to the host, one record each to the writer and the observers, in
        order; a non-finite step is located (`_non_finite`), and at on_nan=stop ends the run there."""
        n_window = len(self.window.pending)
        for ctx, host, finite in self.window.drain():
            if not finite:
                self._non_finite(ctx, host)
            # finite: from each parameter's gradient, not from the (huge) total; lr: the one this step used;
            # step_ms: the window's mean
            rec = self.layout.record(
                host,
                step=ctx.step,
                epoch=ctx.epoch,
                batch=ctx.batch_index,
                lr=ctx.lrs[0],
                step_ms=1000 * (time.perf_counter() - self.t0) / n_window,
                clip=self.tc.clip,
                finite=finite,
            )
            self.writer.step(rec)
            self.obs.step(rec)
            if self.stopped:
                self.step = ctx.step + 1
                break

    def _non_finite(self, ctx: StepContext, host: Any) -> None:
        """A step with a non-finite gradient: the first one located (`forensics.first_nan`, on the
        global batch, on every rank alike), its gradients dropped (the stepper did not step on
        them), and the run stopped at train.on_nan=stop."""
        if self.first_nan is None:
            batch = self.work.batch(ctx.indices) if self.world.distributed else ctx.batch
            self.first_nan = forensics.first_nan(
                self.writer,
                self.work,
                self.groups,
                self.opt,
                self.sched,
                [batch],
                ctx.indices,
                host,
                self.layout,
                ctx.epoch,
                ctx.batch_index,
                ctx.step,
            )
        self.opt.zero_grad(set_to_none=True)
        self.stopped = self.tc.on_nan == "stop"

    def _end_epoch(self, epoch: int) -> bool:
        """The epoch's record (`RunSession.end_epoch`: its aggregates and evaluation) to the
        observers; whether the run ends here: a stop at a non-finite step, or train.stop_early
        with the run certain to end unstable (`certainly_unstable`, a `stopped_early` event)."""
        erec = self.session.end_epoch(self.work, epoch)
        self.obs.epoch(erec)
        self.epoch_norms.append(erec["grad_norm_mean"])
        if self.stopped:
            return True
        dc = self.cfg.detect
        why = self.tc.stop_early and certainly_unstable(
            self.epoch_norms, self.first_nan, dc.explode_factor, dc.explode_window
        )
        if why:  # train.stop_early: the rest of the run cannot make it stable
            self.writer.event({"event": "stopped_early", "epoch": epoch, "step": self.step, "reason": why})
            self.stopped = True
            return True
        return False

    def finish(self) -> Summary:
        """The run's summary (`RunWriter.finish`: the detectors' findings, summary.json), with
        the facts of how it ran."""
        cfg, info = self.cfg, self.work.info
        return self.writer.finish(
            injected_nan_step=cfg.fault.nan_at_step,
            run_id=cfg.identity(),
            steps=self.step,
            stopped_early=self.stopped,
            codec=info.get("codec"),
            latent_scale=info.get("scale"),
            device=str(self.device),
            world_size=self.world.size,
            sync_every=self.tc.sync_every,
            wall_s=time.time() - self.session.t_start,
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
