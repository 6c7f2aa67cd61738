"""What one training step measures on the device, packed into one vector and unpacked into a record.

`StepLayout` is the only code that knows where a measurement sits in the step's device vector.
Every instrumented loop (stab's own, `Monitor`, the Lightning and transformers callbacks) asks
its probes for device tensors by name, `layout.pack`s them into one float64 vector, moves that
to the host once (or once per `train.sync_every` steps), and `layout.record`s each host row into a
typed `StepRecord`, whose flat keys are metrics.jsonl's (`stability.record.format`,
docs/run-format.md).

    layout = StepLayout(groups=["tok_emb", "blocks.0.attn"], probes=[stage_probe])
    vec = layout.pack({"loss": loss, "grad_norm": total, "grad": per_group, "grads_finite": ok,
                       **stage_probe.measure()})                      # (layout.width,) on the device
    row = vec.cpu().numpy()                                           # the one transfer
    rec = layout.record(row, step=3, epoch=1, batch=3, lr=1e-3, step_ms=12.0, clip=1.0)
    rec.loss, rec["grad/blocks.0.attn"], rec.per_group("grad")

Adding a step metric
--------------------
A metric is one `Metric` declaration plus the code that measures it on the device; nothing else
changes (the layout, the record, metrics.jsonl, the trackers and `stab show`'s step columns take it
from the declaration). Put both in a probe, an object with

    metrics: tuple[Metric, ...]           # what it measures, in the order it is packed
    def measure(self) -> dict[str, torch.Tensor]:   # {metric name: device tensor}, no host sync

and hand the probe to the layout (`StepLayout(groups, probes=[...])`) and to the step
(`stability.step`), which calls `measure()` at the probe's `phase`: "grads" (after backward,
before clipping: gradient statistics) or "update" (after the optimizer step: update and
optimizer-state statistics). Example, the relative update per module group:

    class UpdateProbe:
        phase = "update"
        metrics = (Metric("update_rms", "update/{group}", "RMS of the step's update over RMS of the "
                          "parameters, per module group (unitless)"),)
        def measure(self) -> dict[str, torch.Tensor]:
            return {"update_rms": per_group_ratio}     # (G,) on the device

A key template with `{group}` has one value per module group, `{stage}` one per cascade stage, and
none a single value. `checked=True` makes a non-finite value mark the step non-finite (the loss
is); `written=False` keeps a value out of the record (the gradient finiteness flag, folded into
`finite`). At train.sync_every=1 "update" metrics cost a second host transfer per step (the
first decides whether to step); at K > 1 they travel in the same one transfer per K steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch

from stability.record import format as rf

Phase = Literal["grads", "update"]


@dataclass(frozen=True)
class Metric:
    """One measurement of a step: `name` is what the measuring code packs it under; `key` the
    record key (a template: `{group}` for one value per module group, `{stage}` per stage)."""

    name: str
    key: str
    doc: str
    phase: Phase = "grads"  # set from the probe that measures it
    checked: bool = False  # a non-finite value makes the step non-finite
    written: bool = True  # False: used by the step, not recorded

    def keys(self, groups: Sequence[str], n_stages: int) -> list[str]:
        """The record keys of this metric in a run with `groups` and `n_stages`, in packing order."""
        if "{group}" in self.key:
            return [self.key.format(group=g) for g in groups]
        if "{stage}" in self.key:
            return [self.key.format(stage=i) for i in range(n_stages)]
        return [self.key]


class StepProbe(Protocol):
    """What measures metrics of a step on the device (see the module docstring)."""

    phase: Phase
    metrics: tuple[Metric, ...]

    def measure(self) -> dict[str, torch.Tensor]:
        """{metric name: device tensor} of this step, shaped as its `Metric`s say."""
        ...


# The step's own measurements, measured by the step itself (`stability.step`, `GradProbe`).
CORE: tuple[Metric, ...] = (
    Metric(
        "loss",
        rf.LOSS,
        "the step's training loss (of the optimizer step: summed over accumulated "
        "micro-batches as the loop weights them)",
        checked=True,
    ),
    Metric("grad_norm", rf.GRAD_NORM, "total L2 norm of all gradients, before clipping"),
    Metric("grad", "grad/{group}", "L2 norm of one module group's gradients, before clipping"),
    Metric("grads_finite", "grads_finite", "1 if every parameter's gradient is finite", written=False),
)
# The cascade's RMS match (`instrument.StageProbe`): see `record.format.stage_key`.
STAGE: tuple[Metric, ...] = (
    Metric("stage_rms", "stage{stage}/rms", "RMS of the stage's output before matching"),
    Metric("stage_ratio", "stage{stage}/ratio", "the scale the match needed (target RMS / rms)"),
    Metric("stage_scale", "stage{stage}/scale", "the scale applied after the clamp"),
)
# Host-side fields of every record, after the layout's keys (not in the device vector).
HOST_KEYS = (rf.FINITE, rf.CLIPPED, rf.LR, rf.STEP_MS)


@dataclass(frozen=True)
class StepRecord(Mapping[str, Any]):
    """One step, as recorded (one line of metrics.jsonl). Typed fields for what every step has;
    `measured` holds the layout's other values under their record keys (`grad/<group>`,
    `stage{i}/rms`, a probe's metrics). Reads as a mapping of the flat record keys too
    (`rec["grad/norm"]`), and `as_dict()` is the JSON line's content."""

    step: int  # global optimizer step, 0-based
    epoch: int  # 1-based
    batch: int  # batch in the epoch, 0-based (the optimizer step's last micro-batch)
    loss: float
    grad_norm: float
    finite: bool  # the loss and every parameter's gradient were finite
    clipped: bool  # the clip fired (total norm > train.clip)
    lr: float  # the learning rate this step's update used (the first parameter group's)
    step_ms: float  # wall time of the step, ms
    measured: Mapping[str, Any] = field(default_factory=dict)
    _flat: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._flat:
            flat = {
                rf.STEP: self.step,
                rf.EPOCH: self.epoch,
                rf.BATCH: self.batch,
                rf.LOSS: self.loss,
                rf.GRAD_NORM: self.grad_norm,
                **self.measured,
                rf.FINITE: self.finite,
                rf.CLIPPED: self.clipped,
                rf.LR: self.lr,
                rf.STEP_MS: self.step_ms,
            }
            object.__setattr__(self, "_flat", flat)

    def __getitem__(self, key: str) -> Any:
        return self._flat[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)

    def as_dict(self) -> dict[str, Any]:
        """The record under its metrics.jsonl keys (a new dict)."""
        return dict(self._flat)

    def per_group(self, prefix: str) -> dict[str, float]:
        """{group: value} of a per-group metric by its key prefix, e.g. per_group("grad")."""
        head = prefix + "/"
        return {k[len(head) :]: v for k, v in self.measured.items() if k.startswith(head)}


class StepLayout:
    """Where each measurement of a step sits in its device vector (see the module docstring).

    Args:
        groups: the module groups, in order (one value each of a `{group}` metric).
        n_stages: the cascade's stages (one value each of a `{stage}` metric).
        probes: objects with `metrics` (and `phase`, `measure()`) whose metrics the step packs
            after the core ones, "grads"-phase metrics before "update"-phase ones.
        clamp: (lo, hi) of the stage RMS match: `stage{i}/clamped` is the ratio outside it.
    Raises:
        ValueError: two metrics with one name, or two values with one record key (a module
        group named like a step field, e.g. a group `norm` beside the total `grad/norm`).
    """

    def __init__(
        self, groups: Sequence[str], n_stages: int = 0, probes: Sequence[Any] = (), clamp: Sequence[float] | None = None
    ) -> None:
        self.groups, self.n_stages = list(groups), n_stages
        self.clamp = tuple(clamp) if clamp is not None and n_stages else None
        # a metric's phase is its probe's
        declared = [*CORE, *(replace(m, phase=getattr(p, "phase", "grads")) for p in probes for m in p.metrics)]
        names = [m.name for m in declared]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"step metric {dup!r} is declared twice")
        # "grads" first: the step packs them before deciding, "update" ones after the optimizer step
        self.metrics: tuple[Metric, ...] = tuple(sorted(declared, key=lambda m: m.phase != "grads"))
        self.slices: dict[str, slice] = {}
        self.keys: list[str] = []  # record key per position (unwritten ones included)
        at = 0
        for m in self.metrics:
            keys = m.keys(self.groups, n_stages)
            self.slices[m.name] = slice(at, at + len(keys))
            self.keys.extend(keys)
            at += len(keys)
        self.width = at
        self.grads_width = sum(self._len(m) for m in self.metrics if m.phase == "grads")
        written = [k for m in self.metrics if m.written for k in m.keys(self.groups, n_stages)]
        reserved = [rf.STEP, rf.EPOCH, rf.BATCH, *HOST_KEYS, *(rf.stage_key(i, "clamped") for i in range(n_stages))]
        seen: set[str] = set()
        for k in [*written, *reserved]:
            if k in seen:
                raise ValueError(
                    f"step record key {k!r} is measured twice (a module group or metric named like "
                    f"another; rename the group)"
                )
            seen.add(k)
        self._written = [
            (k, i)
            for i, (k, m) in enumerate(zip(self.keys, self._per_position()))
            if m.written and k not in (rf.LOSS, rf.GRAD_NORM)
        ]
        self._checked = [self.slices[m.name] for m in self.metrics if m.checked]
        self._stage = (self.slices["stage_ratio"], self.slices["stage_scale"]) if "stage_ratio" in self.slices else None

    def _len(self, m: Metric) -> int:
        return len(m.keys(self.groups, self.n_stages))

    def _per_position(self) -> list[Metric]:
        return [m for m in self.metrics for _ in range(self._len(m))]

    def names(self, phase: Phase | None = None) -> list[str]:
        """The metric names the step packs (of one phase)."""
        return [m.name for m in self.metrics if phase is None or m.phase == phase]

    # --- on the device ------------------------------------------------------------------------
    def pack(self, values: Mapping[str, torch.Tensor], phase: Phase | None = None) -> torch.Tensor:
        """One float64 device vector of the metrics (of `phase`, or all) in layout order, from
        {metric name: tensor of its width}. No host sync. KeyError names a missing metric."""
        parts = []
        for m in self.metrics:
            if phase is not None and m.phase != phase:
                continue
            try:
                t = values[m.name]
            except KeyError:
                raise KeyError(f"step metric {m.name!r} was declared but not measured") from None
            parts.append(t.detach().reshape(-1).double())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    # --- on the host --------------------------------------------------------------------------
    def take(self, row: np.ndarray, name: str) -> np.ndarray:
        """The values of metric `name` in a host row."""
        return row[self.slices[name]]

    def finite(self, row: np.ndarray) -> bool:
        """Every gradient finite and every checked metric (the loss) finite."""
        return bool(row[self.slices["grads_finite"]][0]) and all(np.isfinite(row[s]).all() for s in self._checked)

    def record(
        self,
        row: np.ndarray,
        *,
        step: int,
        epoch: int,
        batch: int,
        lr: float,
        step_ms: float,
        clip: float | None,
        finite: bool | None = None,
    ) -> StepRecord:
        """The `StepRecord` of a host row (`pack`'s vector, or its "grads" part followed by its
        "update" part). `finite` defaults to `finite(row)`; `clipped` is a finite step whose
        total norm exceeded `clip`."""
        values = row.tolist()  # Python floats, in one call
        ok = self.finite(row) if finite is None else finite
        measured: dict[str, Any] = {k: values[i] for k, i in self._written}
        if self._stage is not None:
            ratios, scales = values[self._stage[0]], values[self._stage[1]]
            for i, (ratio, _) in enumerate(zip(ratios, scales)):
                measured[rf.stage_key(i, "clamped")] = self.clamp is not None and bool(
                    ratio < self.clamp[0] or ratio > self.clamp[1]
                )
        total = values[self.slices["grad_norm"].start]
        return StepRecord(
            step=step,
            epoch=epoch,
            batch=batch,
            loss=values[self.slices["loss"].start],
            grad_norm=total,
            finite=ok,
            clipped=bool(ok and clip is not None and total > clip),
            lr=lr,
            step_ms=step_ms,
            measured=measured,
        )

    def nonfinite_groups(self, row: np.ndarray) -> list[str]:
        """The module groups whose recorded gradient norm is not finite, in group order."""
        return [g for g, v in zip(self.groups, self.take(row, "grad")) if not math.isfinite(v)]
