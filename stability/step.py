"""The one instrumented step: measure -> one host transfer -> non-finite check -> clip.

Every loop that stab instruments goes through `Instruments` once its gradients exist: stab's own
loop (`Stepper`, which also runs the forward, backward and optimizer step), `stability.monitor.
Monitor` in your loop, and through it the Lightning and transformers callbacks. It asks the
gradient probe and the step probes for device tensors, packs them with the run's `StepLayout`
(`stability.steplayout`, the only code that knows offsets), moves them to the host once, decides
whether the step is finite, clips, and after the optimizer step measures the "update"-phase
probes. A metric added to the layout is therefore measured, checked and recorded in every loop.

    ins = Instruments(groups, GradProbe(groups), probes=[StageProbe(...)], clip=1.0)
    loss.backward()
    values = ins.measure(loss)          # device tensors by metric name, no host sync
    row, finite = ins.read(values)      # the one transfer
    if finite:
        ins.clip_(values); opt.step()
    row = ins.after_update(row)         # "update" probes (a second transfer only if there are any)
    rec = ins.layout.record(row, step=..., epoch=..., batch=..., lr=..., step_ms=..., clip=ins.clip)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stability import distributed
from stability.instrument import GradProbe
from stability.steplayout import StepLayout


class Instruments:
    """A run's step measurements: the gradient probe, the step probes and their layout.

    Args:
        groups: module group name -> modules (the gradient probe's groups), in order.
        grad_probe: total and per-group gradient norms (`instrument.GradProbe`).
        probes: step probes (`steplayout.StepProbe`): the cascade's `StageProbe`, optimizer-state probes.
        clip: total gradient-norm clipping threshold, or None.
        n_stages, clamp: the cascade's stages and RMS clamp (0, None elsewhere).
        world_size: ranks of a data-parallel run; the loss and the "grads" probes' values are
            averaged over them on the device (the gradients already are, by DDP).
    """

    def __init__(
        self,
        groups: Sequence[str],
        grad_probe: GradProbe,
        probes: Sequence[Any] = (),
        clip: float | None = None,
        n_stages: int = 0,
        clamp: Sequence[float] | None = None,
        world_size: int = 1,
    ) -> None:
        self.probes = [p for p in probes if p.metrics]
        self.recovery: Any = None  # stability.recovery.Recovery of the run, set by RunParts.instruments
        self.opt_probe: Any = None  # stability.optstate.OptStateProbe, likewise
        self.layout = StepLayout(groups, n_stages, self.probes, clamp)
        self.grad_probe, self.clip, self.world_size = grad_probe, clip, world_size
        self.grads_probes = [p for p in self.probes if p.phase == "grads"]
        self.update_probes = [p for p in self.probes if p.phase == "update"]
        self._shared = ["loss", *(m.name for p in self.grads_probes for m in p.metrics)]

    def measure(self, loss: torch.Tensor, exact: bool = False) -> dict[str, torch.Tensor]:
        """The "grads"-phase values of a step whose gradients are computed, on the device:
        loss (the scalar given), gradient norms and finiteness, the grads probes' metrics."""
        total, per_group, grads_finite = self.grad_probe.measure(exact)
        values = {
            "loss": loss.detach().double().reshape(1),
            "grad_norm": total,
            "grad": per_group,
            "grads_finite": grads_finite,
        }
        for p in self.grads_probes:
            values.update(p.measure())
        if self.world_size > 1:  # one device collective, no host sync
            parts = [values[n].reshape(-1).double() for n in self._shared]
            mean = distributed.sum_(torch.cat(parts)) / self.world_size
            for n, piece in zip(self._shared, mean.split([len(p) for p in parts])):
                values[n] = piece
        return values

    def finite_on_device(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """0-dim bool on the device: every gradient and the loss are finite (`StepLayout.finite`'s rule)."""
        return values["grads_finite"] & torch.isfinite(values["loss"]).all()

    def read(self, values: dict[str, torch.Tensor]) -> tuple[np.ndarray, bool]:
        """(host row of the "grads" metrics, finite) in one transfer. When a float32 norm is inf
        (a gradient holds inf, or its squares overflowed float32) the norms are measured again
        in float64, on such a step only, so finiteness is the gradients' own."""
        layout = self.layout
        host = layout.pack(values, "grads").cpu().numpy()  # the step's one CPU-GPU sync point
        if np.isinf(layout.take(host, "grad_norm")).any() or np.isinf(layout.take(host, "grad")).any():
            total, per_group, grads_finite = self.grad_probe.measure(exact=True)
            values.update(grad_norm=total, grad=per_group, grads_finite=grads_finite)
            host = layout.pack(values, "grads").cpu().numpy()
        return host, layout.finite(host)

    def clip_(self, values: dict[str, torch.Tensor]) -> None:
        """Clip the gradients to `clip` with the norm already measured (no second pass)."""
        self.grad_probe.clip_(values["grad_norm"], self.clip)

    def update_values(self) -> dict[str, torch.Tensor]:
        """The "update" probes' values, after the optimizer step (device tensors)."""
        values: dict[str, torch.Tensor] = {}
        for p in self.update_probes:
            values.update(p.measure())
        return values

    def after_update(self, row: np.ndarray) -> np.ndarray:
        """`row` followed by the "update" probes' values: a second transfer, only when there are
        such probes (none: `row` itself)."""
        if not self.update_probes:
            return row
        return np.concatenate([row, self.layout.pack(self.update_values(), "update").cpu().numpy()])


class Stepper:
    """stab's own optimisation step: forward -> loss -> backward -> `Instruments` -> clip -> step.

    Two ways to call it, with the same arithmetic:

    - `stepper(batch)` (train.sync_every=1): the step's measurements move to the host once, the
      host checks them and updates only on a finite step. Returns (host row, finite).
    - `stepper.on_device(batch)` (sync_every=K>1): nothing leaves the device. The update is
      guarded by the fused AdamW's `found_inf` (the path torch.amp.GradScaler uses): a
      non-finite step leaves the weights, the moments and the step count as they were. The
      guard is sticky (`frozen`): after a non-finite step every later step of the window is
      skipped too, so when the host reads the window it finds the weights exactly as they were
      before the first non-finite step and re-runs from there (`Window`). Returns the step's
      device vector (`StepLayout.pack`), float64.

    In a distributed run the gradients are DDP's all-reduced ones (identical on every rank), and
    the loss and probe values are averaged over the ranks in one device all-reduce, so a
    non-finite loss on any rank makes the step non-finite on every rank.
    """

    def __init__(
        self, work: Any, opt: torch.optim.Optimizer, sched: Any, instruments: Instruments, precision: str = "fp32"
    ) -> None:
        self.work, self.opt, self.sched, self.ins = work, opt, sched, instruments
        self.layout = instruments.layout
        device = next(work.model.parameters()).device
        bf16 = precision == "bf16"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.frozen = torch.zeros((), device=device)  # 1.0 once a step of this window was non-finite
        # train.on_spike / train.update_clip (stability.recovery) and the optimizer-state probe, if the run has them
        self.recovery = getattr(instruments, "recovery", None)
        self.opt_probe = getattr(instruments, "opt_probe", None)

    def _forward_backward(self, batch: Any, loss_scale: float | None) -> dict[str, torch.Tensor]:
        with self.autocast(), distributed.synced_batch_stats():
            loss = self.work.loss(batch)
        if loss_scale is not None:  # fault.spike_at_step
            loss = loss * loss_scale
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        return self.ins.measure(loss)

    def __call__(self, batch: Any, loss_scale: float | None = None) -> tuple[np.ndarray, bool]:
        """One optimizer step with a host read (K = 1): forward, backward, measure, clip, recovery, update. Returns the step vector on the host and whether the loss and every gradient were finite (a non-finite step does not update)."""
        values = self._forward_backward(batch, loss_scale)
        host, finite = self.ins.read(values)
        rec, skip = self.recovery, None
        if finite:  # a huge but finite norm is finite: only the loss and each gradient decide
            self.ins.clip_(values)
            skip = rec.before(values["loss"], values["grad_norm"]) if rec else None
            self._step(skip)
            if rec:
                rec.after()
        elif rec:
            rec.idle()
        if self.opt_probe is not None:  # no update on a non-finite step: its relative update is 0
            self.opt_probe.skipped = skip if finite else torch.ones((), device=self.frozen.device)
        self.sched.step()
        return self.ins.after_update(host), finite

    def _step(self, skip: torch.Tensor | None) -> None:
        """The optimizer step; `skip` (0-dim, 1.0 = skip) goes through the fused AdamW's found_inf."""
        if skip is None:
            self.opt.step()
            return
        self.opt.found_inf = skip  # type: ignore[attr-defined]  # the fused kernel reads it: 1 = skip the update
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf  # type: ignore[attr-defined]

    def on_device(self, batch: Any, loss_scale: float | None = None) -> torch.Tensor:
        """One optimizer step with no host sync (K > 1): the fused optimizer skips the update through `found_inf` once a step was non-finite (sticky until `thaw`) or a spike is skipped; returns the step vector, still on the device."""
        values = self._forward_backward(batch, loss_scale)
        finite = self.ins.finite_on_device(values)
        self.frozen = torch.maximum(self.frozen, (~finite).float())  # sticky until `thaw`
        self.ins.clip_(values)  # NaN coefficients on a non-finite step: not applied
        rec = self.recovery
        skip = self.frozen
        if rec:  # a spike skipped by train.on_spike=skip, decided on the device too
            skip = torch.maximum(skip, rec.before(values["loss"], values["grad_norm"]))
        self.opt.found_inf = skip  # type: ignore[attr-defined]  # the fused kernel reads it: 1 = skip the update
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf  # type: ignore[attr-defined]
        if rec:
            rec.after()
        if self.opt_probe is not None:
            self.opt_probe.skipped = skip
        self.sched.step()
        values.update(self.ins.update_values())
        return self.layout.pack(values)

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
    it, and continues (on_nan=skip) exactly as at sync_every=1. The recovery policies' device
    state (the spike window, the lr multiplier: `recovery.Recovery.state_dict`, a few hundred
    numbers) is kept before each step of the window and put back at the rewound step, so the
    steps run again count once. Buffers that a forward updates (spectral norm's power-iteration
    vectors) are not rewound.
    """

    def __init__(self, stepper: Stepper, sync_every: int, before_step: Any = None) -> None:
        self.stepper, self.k = stepper, sync_every
        self.before_step = before_step or (lambda step: None)  # e.g. the NaN injector's step
        self.pending: list[tuple[StepContext, torch.Tensor | None]] = []
        self.held: list[Any] = []  # K > 1 with recovery policies: their state before each pending step

    def add(self, ctx: StepContext) -> None:
        """Queue one step: run it on the device now when K > 1 (keeping the recovery state before it), or later in `drain` when K = 1."""
        self.before_step(ctx.step)
        rec = self.stepper.recovery
        if self.k > 1 and rec is not None:
            self.held.append(rec.state_dict())  # device copies, no sync
        vec = self.stepper.on_device(ctx.batch, ctx.spike) if self.k > 1 else None
        self.pending.append((ctx, vec))

    @property
    def full(self) -> bool:
        """K steps are pending: time to `drain`."""
        return len(self.pending) >= self.k

    def drain(self) -> Iterator[tuple[StepContext, np.ndarray, bool]]:
        """The pending steps as (context, host step vector, finite), in order, with one host read for the window."""
        pending, self.pending = self.pending, []
        held, self.held = self.held, []
        if not pending:
            return
        if self.k == 1:
            for ctx, _ in pending:
                self.before_step(ctx.step)
                yield (ctx, *self.stepper(ctx.batch, ctx.spike))
            return
        layout = self.stepper.layout
        host = (
            torch.stack([v for _, v in pending if v is not None]).cpu().numpy()
        )  # the window's one CPU-GPU sync point
        bad = next((i for i, row in enumerate(host) if not layout.finite(row)), None)
        for (ctx, _), row in zip(pending[:bad], host[:bad]):
            yield ctx, row, True
        if bad is None:
            return
        self.stepper.thaw()  # weights and optimizer state: as before step `bad`, skipped on the device
        # the steps from `bad` on entered the spike window and grew the lr multiplier: undo that
        # (`held` is filled only where there are recovery policies, see `add`)
        rec = self.stepper.recovery
        if held and rec is not None:
            rec.load_state_dict(held[bad])
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
        self.held = []
        done = [(ctx, v) for ctx, v in pending if v is not None]
        if not done:
            return []
        layout = self.stepper.layout
        host = torch.stack([v for _, v in done]).cpu().numpy()
        return [(ctx, row, layout.finite(row)) for (ctx, _), row in zip(done, host)]
