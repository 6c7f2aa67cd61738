"""The one function that sets up a run: the workload, its module groups, optimizer and probes.

    parts = build(cfg, device)       # workload, module groups, optimizer, schedule, probes
    parts.work.loss(parts.work.batch(idx))

Training (`stability.training`), `stab bench`, `stab replay` and `stab probe` all call `build`
(as `stability.workloads.build`), so a run, its benchmark, its replay and its init probe use the
same model, optimizer and learning-rate schedule. Which workload `model.name` names is
`stability.workloads.registry`'s answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn

from stability.config import CharLMConfig, ModelConfig, RunConfig, TrainConfig
from stability.instrument import GradProbe, StageProbe
from stability.step import Instruments
from stability.workloads.base import Workload
from stability.workloads.registry import WORKLOADS, workload

if TYPE_CHECKING:
    from stability.models.cascade import Cascade
    from stability.models.charlm import CharLM


def build_model(cfg: ModelConfig | CharLMConfig) -> Cascade | CharLM:
    """A built-in model alone (by `model.name`), without data: for parameter counts and
    checks before a run. The char LM's vocabulary comes from its data: built here, without
    data, it has a placeholder vocabulary. A custom model has no data-free build (its factory
    makes its data too): use `CustomWorkload`. Raises ValueError for an unknown name."""
    if isinstance(cfg, ModelConfig):
        from stability.models.cascade import Cascade

        return Cascade(cfg)
    if isinstance(cfg, CharLMConfig):
        from stability.models.charlm import CharLM

        return CharLM(cfg)
    raise ValueError(f"model={cfg.name!r}: unknown model; allowed: {', '.join(WORKLOADS)}")


def make_workload(cfg: RunConfig, device: torch.device) -> Workload:
    """The workload for `model.name` with its data loaded and its model on `device`.
    Raises ValueError for an unknown name."""
    return workload(cfg.model.name).make(cfg, device)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (decoupled weight decay, arXiv 1711.05101) over all of `model`'s parameters and
    its schedule: the learning rate rises linearly over `train.warmup` steps, then stays at
    `train.lr` (factor min(1, (step + 1) / (warmup + 1))).

    The fused implementation (CPU and CUDA): one kernel for all parameters, no host reads of
    its step counters, and a `found_inf` input that skips a non-finite step on the device
    (`step.Stepper.on_device`). Every train.sync_every uses it, so K changes no number."""
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, fused=True)
    warmup = tc.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return opt, sched


@dataclass
class RunParts:
    """Everything a training step needs, built once per run by `build`.

    groups: module group name -> modules, in forward order (`Workload.module_groups`).
    grad_probe: one total and one per-group grad norm per step, without host syncs.
    stage_probe: the cascade's stage RMS-match records ((3 * n_stages,) per step; empty else).
    """

    work: Workload
    device: torch.device
    groups: dict[str, list[nn.Module]]
    opt: torch.optim.Optimizer
    sched: Any
    grad_probe: GradProbe
    stage_probe: StageProbe
    _probes: tuple[list[Any], Any, Any] | None = None

    @property
    def model(self) -> nn.Module:
        """The model that is trained (the workload's; compiled or DDP-wrapped where the run does so)."""
        return self.work.model

    @property
    def names(self) -> list[str]:
        """The module groups' names, in forward order."""
        return list(self.groups)

    @property
    def n_stages(self) -> int:
        """Stages with an RMS match (the cascade's; 0 for other models)."""
        return len(self.work.rms_matchers())

    def instruments(self, cfg: RunConfig, world_size: int = 1) -> Instruments:
        """The run's step measurements (`stability.step.Instruments`): these groups and probes, the
        run's clip and stage clamp; with `detect.opt_state` the optimizer-state and output signals
        (`stability.optstate`), and the recovery policies of `train.on_spike` / `train.update_clip`
        (`stability.recovery`, `ins.recovery`), built once per run (their hooks and state are the model's)."""
        m = cfg.model
        clamp = m.rms_clamp if self.n_stages and isinstance(m, ModelConfig) and m.rms_match else None
        probes, recovery, opt_probe = self.step_probes(cfg)
        ins = Instruments(
            self.names, self.grad_probe, [self.stage_probe, *probes], cfg.train.clip, self.n_stages, clamp, world_size
        )
        ins.recovery, ins.opt_probe = recovery, opt_probe
        return ins

    def step_probes(self, cfg: RunConfig) -> tuple[list[Any], Any, Any]:
        """([probes], recovery or None, optimizer-state probe or None), made on the first call."""
        if self._probes is None:
            from stability.optstate import LMProbe, OptStateProbe
            from stability.recovery import Recovery

            tc = cfg.train
            probes: list[Any] = []
            opt_probe = None
            if cfg.detect.opt_state:
                opt_probe = OptStateProbe(self.groups, self.opt)
                probes += [LMProbe(self.work.model), opt_probe]
            recovery = Recovery(
                tc.on_spike,
                self.opt,
                list(self.work.model.parameters()),
                self.device,
                tc.spike_window,
                tc.spike_sigma,
                tc.backoff_factor,
                tc.backoff_steps,
                tc.update_clip,
            )
            if recovery.active:
                probes.append(recovery)
            self._probes = (probes, recovery if recovery.active else None, opt_probe)
        return self._probes


def build(cfg: RunConfig, device: torch.device, compile: bool | None = None) -> RunParts:
    """Seed, build the workload, (optionally) compile its model, and set up the optimizer,
    schedule and probes. `compile` defaults to `train.compile`: the forward is compiled, the
    parameters and submodules stay the same objects, so hooks and probes still see them."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    work = make_workload(cfg, device)
    if cfg.train.compile if compile is None else compile:
        work.model = cast(nn.Module, torch.compile(work.model))  # an OptimizedModule: typed as a callable
    groups = work.module_groups()
    opt, sched = make_optimizer(work.model, cfg.train)
    return RunParts(work, device, groups, opt, sched, GradProbe(groups), StageProbe(work.rms_matchers(), device))
