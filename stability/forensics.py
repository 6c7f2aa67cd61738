"""Where the first non-finite value started, said as honestly as the evidence allows.

At a run's first non-finite step every loop (stab's own, `Monitor`, the Lightning and transformers
callbacks) calls `first_nan`: it re-runs the step's batch (each of its micro-batches) from the same
weights with a hook on every module group, and

- `how="located"`: the re-run reproduced the non-finite value; `module` is the first group, in
  execution order, whose output (any shape: tensors, tuples, dicts, `ModelOutput`, see
  `stability.outputs`) or, failing that, whose parameter gradient went non-finite; `where` says
  which pass;
- `how="not reproduced"` (the re-run stayed finite: a value that fired once) or `how="no batch"`
  (the loop gave no batch): `module` is None and `candidates` ranks the groups the recorded
  measurements point at, each with why. Never a single module stated as fact.

It saves the batch and the model and optimizer state (`forensics/state.pt`) for `stab replay`.
Also here: `NanInjector`, the injected fault (`fault.nan_module`), and `eager`, which runs probes
on the uncompiled model outside DDP.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from stability import distributed
from stability.instrument import NonFiniteProbe
from stability.outputs import map_tensors, poison, tensors
from stability.steplayout import StepLayout
from stability.storage import atomic_write_bytes

LOCATED, NOT_REPRODUCED, NO_BATCH, NO_LOSS = "located", "not reproduced", "no batch", "no loss function"


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


class NanInjector:
    """Multiplies every floating tensor of one module group's output (a tensor, a tuple, a dict,
    a `ModelOutput`, ...) by NaN during the training forward of one global step."""

    def __init__(self, modules: list[nn.Module], step: int) -> None:
        self.step, self.current = step, -1
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if self.current == self.step and module.training:
            return poison(out)
        return None

    def close(self) -> None:
        """Remove the hooks: no more NaN is injected."""
        for h in self.handles:
            h.remove()


def _rerun(loss_of: Any, model: nn.Module, groups: dict[str, list[nn.Module]], batch: Any) -> tuple[str | None, str]:
    probe = NonFiniteProbe(groups)
    try:
        model.zero_grad(set_to_none=True)
        loss_of(batch).backward()  # a non-finite loss still walks the backward for the grad hooks
    finally:
        probe.close()
        model.zero_grad(set_to_none=True)
    return probe.first


def candidates(layout: StepLayout, host: np.ndarray, groups: dict[str, list[nn.Module]]) -> list[dict[str, str]]:
    """The groups the recorded step points at, most likely first, each with why: groups whose
    weights are non-finite, then the groups with a non-finite gradient norm, ranked by what the
    loss says (a finite loss with non-finite gradients started in the backward, which spreads
    from where it starts toward the input: nearest the output first; a non-finite loss makes every
    group its backward reaches non-finite, so those norms cannot rank: forward order)."""
    out: list[dict[str, str]] = []
    for name, mods in groups.items():  # one host sync per parameter: forensics only
        if any(not bool(torch.isfinite(p).all()) for m in mods for p in m.parameters()):
            out.append({"group": name, "why": "its weights are non-finite"})
    bad = [g for g in layout.nonfinite_groups(host) if g not in {c["group"] for c in out}]
    loss = float(layout.take(host, "loss")[0])
    if math.isfinite(loss):
        why = "finite loss, non-finite gradient: a backward NaN spreads toward the input, nearest the output first"
        out += [{"group": g, "why": why} for g in reversed(bad)]
    else:
        why = "non-finite loss: every group its backward reaches goes non-finite, so the norms cannot rank it"
        out += [{"group": g, "why": why} for g in bad]
    return out


def locate(
    loss_of: Any,
    model: nn.Module,
    groups: dict[str, list[nn.Module]],
    batches: Sequence[Any],
    host: np.ndarray,
    layout: StepLayout,
) -> tuple[dict[str, Any], Any]:
    """Re-run each of the step's micro-batches (same weights) with per-group checks; `loss_of`
    None: no way to recompute a batch's loss. Returns (fields of the first_nan event: how,
    module, where, candidates; the batch that reproduced it, else the last one, else None)."""
    if not batches or loss_of is None:
        return {
            "how": NO_BATCH if not batches else NO_LOSS,
            "module": None,
            "where": "none",
            "candidates": candidates(layout, host, groups),
        }, (batches[-1] if batches else None)
    for batch in batches:
        module, where = _rerun(loss_of, model, groups, batch)
        if module is not None:
            return {"how": LOCATED, "module": module, "where": where, "candidates": []}, batch
    return {
        "how": NOT_REPRODUCED,
        "module": None,
        "where": "none",
        "candidates": candidates(layout, host, groups),
    }, batches[-1]


def first_nan(
    writer: Any,
    work: Any,
    groups: dict[str, list[nn.Module]],
    opt: torch.optim.Optimizer,
    sched: Any,
    batches: Sequence[Any],
    indices: torch.Tensor | None,
    host: np.ndarray,
    layout: StepLayout,
    epoch: int,
    b: int,
    step: int,
    rerun: bool = True,
) -> dict[str, Any]:
    """Locate the first non-finite value of the run (`locate`, on the uncompiled model), save
    what `stab replay` needs when there is a batch, and record the `first_nan` event; returns
    its fields. `work.loss(batch)` recomputes a batch's loss (`rerun=False`: it cannot).
    `batch_finite` (where the batch is known): False when the batch's own floating-point tensors
    hold NaN or inf, so the data is what went non-finite."""
    loss, total = float(layout.take(host, "loss")[0]), float(layout.take(host, "grad_norm")[0])
    with eager(work):
        found, batch = locate(work.loss if rerun else None, work.model, groups, batches, host, layout)
        ev: dict[str, Any] = {
            "epoch": epoch,
            "batch": b,
            "step": step,
            "kind": "loss" if not math.isfinite(loss) else "grad",
            **found,
            "loss": loss,
            "grad_norm": total,
        }
        if batch is not None:
            # NaN or inf in the batch's own tensors: the data, not the training, went non-finite
            ev["batch_finite"] = all(bool(torch.isfinite(t).all()) for t in tensors(batch) if t.is_floating_point())
            idx = indices if indices is not None else torch.zeros(0, dtype=torch.long)
            ev["forensics"] = (
                save(writer.dir, work, opt, sched, batch, idx, ev) if writer.writes else "forensics/state.pt"
            )  # rank 0 saves it
    writer.event({"event": "first_nan", **ev})
    return ev


def save(
    run_dir: Path,
    work: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    batch: Any,
    indices: torch.Tensor,
    where: dict[str, Any],
) -> str:
    """Save what `stab replay` needs to re-run the first non-finite step: the batch (indices
    and tensors, in its own structure: a tuple, a dict of model inputs) and the model and
    optimizer state from before that step's update (the loop checks finiteness before
    `opt.step()`, so the weights here are the ones that went wrong)."""
    folder = run_dir / "forensics"
    folder.mkdir(exist_ok=True)
    cpu = map_tensors(lambda t: t.detach().cpu(), batch)
    blob = {
        "batch": list(cpu) if isinstance(cpu, tuple) else cpu,
        "indices": indices.cpu(),
        "model": work.model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else {},
        "step": where["step"],
        "epoch": where["epoch"],
        "batch_index": where["batch"],
    }
    buf = io.BytesIO()  # torch's file writer reports a full disk as "unexpected pos"; a plain write names it
    torch.save(blob, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())
    return "forensics/state.pt"
