"""Re-run the first non-finite step of a run, from the state saved when it happened.

`forensics.save` keeps the batch and the model/optimizer state from before the step's
update. `replay` rebuilds the model from the run's own config, loads that state, runs the step
again with a hook on every module (in execution order) and every parameter gradient, and names
the first module whose output, or failing that whose gradient, went non-finite. It then runs the
same step on other batches of the training set: if they stay finite the batch caused it, if
they go non-finite too it is the model's state (numerics, or an injected fault).

    result = replay(Path("runs/run/2026..._fault.nan_at_step=6"))
    result.module, result.cause
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stability.config import RunConfig
from stability.devices import resolve_device
from stability.forensics import NanInjector
from stability.instrument import NonFiniteProbe
from stability.outputs import map_tensors, tensors
from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.workloads import build


class ReplayError(RuntimeError):
    """The run folder has nothing to replay."""


@dataclass
class ReplayResult:
    """What re-running a run's first non-finite step found (`replay`)."""

    step: int
    epoch: int
    batch_index: int
    module: str | None  # first module (dotted path) whose output or gradient went non-finite
    group: str | None  # its gradient-norm group
    where: str  # forward | backward | none
    loss: float
    batch_finite: bool  # the saved batch's own tensors are finite
    other_batches: list[dict[str, Any]] = field(default_factory=list)  # {indices, finite}
    cause: str = ""


def _group_of(model: torch.nn.Module, groups: dict[str, list[torch.nn.Module]]) -> dict[str, str]:
    """Dotted module path -> gradient group containing it."""
    owner = {}
    for gname, modules in groups.items():
        for m in modules:
            for sub in m.modules():
                owner[id(sub)] = gname
    return {name: owner[id(m)] for name, m in model.named_modules() if id(m) in owner}


def _step(work: Any, batch: Any, state: dict[str, Any], step: int, cfg: RunConfig) -> tuple[NonFiniteProbe, float]:
    work.model.load_state_dict(state["model"])
    work.model.train()
    injector = None
    if cfg.fault.nan_at_step == step:  # the run's own fault injection is part of that step
        injector = NanInjector(work.module_groups()[cfg.fault.nan_module], step)
        injector.current = step
    modules = {name: [m] for name, m in work.model.named_modules() if name}
    probe = NonFiniteProbe(modules)
    try:
        work.model.zero_grad(set_to_none=True)
        loss = work.loss(batch)
        loss.backward()
    finally:
        probe.close()
        if injector:
            injector.close()
        work.model.zero_grad(set_to_none=True)
    return probe, loss.item()


def _why_nothing_saved(folder: RunFolder) -> str:
    """Why a run folder has no forensics/state.pt, from its first_nan event."""
    ev = next((e for e in folder.events() if e.get("event") == "first_nan"), None)
    if ev is None:
        return f"no {rf.FORENSICS_STATE}: the run never went non-finite (or predates forensics)"
    step = f"its first non-finite step (step {ev.get('step')})"
    if ev.get("how") == "no batch":
        return (
            f"no {rf.FORENSICS_STATE}: {step} was recorded without its batch (Monitor.step(loss) without batch=), "
            f"so there is nothing to re-run; pass batch= to have it located and saved"
        )
    if ev.get("how") == "no loss function":
        return (
            f"no {rf.FORENSICS_STATE}: {step} was recorded without a loss function to re-run it "
            f"(Monitor(loss=...)), so nothing was saved"
        )
    return f"no {rf.FORENSICS_STATE}: {step} was not saved ({ev.get('how') or 'a run that predates forensics'})"


def replay(run_dir: Path, n_other: int = 2, device: str = "cpu") -> ReplayResult:
    """Rebuild the run's model from its config, load the state and batch saved at its first
    non-finite step (forensics), and run that step again module by module on `device`.

    Raises:
        ReplayError: the run has no forensics file (it never went non-finite, or predates them),
            or its config is unreadable.
    """
    folder = RunFolder(run_dir)
    path = folder.forensics()
    if path is None:
        raise ReplayError(f"{run_dir}: {_why_nothing_saved(folder)}")
    config = folder.config()
    if config is None:
        raise ReplayError(f"{run_dir}: {'; '.join(folder.warnings)}: the run's config is needed to rebuild its model")
    cfg = RunConfig.from_dict(config).resolve(device=device)
    state = torch.load(path, map_location=device, weights_only=True)
    dev = resolve_device(device)
    work = build(cfg, dev, compile=False).work
    batch = state["batch"]
    batch = map_tensors(lambda t: t.to(dev), tuple(batch) if isinstance(batch, list) else batch)
    step = state["step"]
    probe, loss = _step(work, batch, state, step, cfg)
    name, where = probe.first
    group = _group_of(work.model, work.module_groups()).get(name) if name else None
    batch_finite = all(bool(torch.isfinite(t).all()) for t in tensors(batch) if t.is_floating_point())

    others = []
    saved = set(state["indices"].tolist())
    pool = [i for i in range(work.n_train) if i not in saved]
    leaves = tensors(batch)
    bs = len(state["indices"]) or (
        len(leaves[0]) if leaves and leaves[0].dim() else 0
    )  # a Monitor run keeps no indices
    for k in range(n_other):
        idx = torch.tensor(pool[k * bs : (k + 1) * bs])
        if len(idx) < 1:
            break
        p, other_loss = _step(work, work.batch(idx), state, step, cfg)
        others.append({"indices": idx.tolist(), "finite": p.first[0] is None, "loss": other_loss})

    if not batch_finite:
        cause = "data: the batch itself contains NaN or inf"
    elif name is None:
        cause = "not reproduced: the replayed step stayed finite (non-deterministic numerics?)"
    elif others and all(o["finite"] for o in others):
        cause = "data-caused: this batch drives the model non-finite; other batches stay finite from the same state"
    else:
        cause = (
            "numerical: the same step goes non-finite on other batches too (model/optimizer state or an injected fault)"
        )
    return ReplayResult(
        step, state["epoch"], state["batch_index"], name, group, where, loss, batch_finite, others, cause
    )
