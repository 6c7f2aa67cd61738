"""Workloads: a model with its data, loss and checks, each beside this file, and how a run is set up.

    workload(cfg.model.name).check(cfg)   # before any work: the workload's own checks (registry.py)
    parts = build(cfg, device)            # workload, module groups, optimizer, schedule, probes (parts.py)
    parts.work.loss(parts.work.batch(idx))

`cascade/` (with its audio, codec, data and synth code), `charlm/` (with its text code) and
`custom/` (your own model from a factory function, `model=custom model._target_=...`) each
implement `base.Workload`, the interface the loop sees, and check themselves before a run
(each folder's `preflight.py`). The functions below hand on to `parts.py`,
imported (with torch) on first call, so a check that loads no torch (the usual grid) stays so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stability.workloads.registry import WORKLOADS, Kind, workload

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from stability.config import CharLMConfig, ModelConfig, RunConfig, TrainConfig
    from stability.models.cascade import Cascade
    from stability.models.charlm import CharLM
    from stability.workloads.base import Workload
    from stability.workloads.parts import RunParts

__all__ = ["WORKLOADS", "Kind", "build", "build_model", "make_optimizer", "make_workload", "workload"]


def build(cfg: RunConfig, device: torch.device, compile: bool | None = None) -> RunParts:
    """Seed, build the workload, compile its model where asked, and set up the optimizer,
    schedule and probes (`parts.build`)."""
    from stability.workloads.parts import build as build_

    return build_(cfg, device, compile)


def make_workload(cfg: RunConfig, device: torch.device) -> Workload:
    """The workload for `model.name` with its data loaded and its model on `device`
    (`parts.make_workload`); ValueError for an unknown name."""
    from stability.workloads.parts import make_workload as make_workload_

    return make_workload_(cfg, device)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over `model`'s parameters and its warmup schedule (`parts.make_optimizer`)."""
    from stability.workloads.parts import make_optimizer as make_optimizer_

    return make_optimizer_(model, tc)


def build_model(cfg: ModelConfig | CharLMConfig) -> Cascade | CharLM:
    """A built-in model alone, without data (`parts.build_model`); ValueError for an unknown name."""
    from stability.workloads.parts import build_model as build_model_

    return build_model_(cfg)
