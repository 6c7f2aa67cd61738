"""The char LM's own checks before any work starts: `fault.nan_module` against its module groups,
its text (it must exist, be UTF-8 and be long enough) and the fault steps its text gives."""

from __future__ import annotations

from stability.config import CharLMConfig, RunConfig
from stability.workloads.faults import check_fault_module, check_fault_steps


def check(cfg: RunConfig) -> None:
    """Raises ConfigError naming the bad value (`data.path`, `fault.*`)."""
    if cfg.fault.nan_at_step is not None:
        check_fault_module(cfg, _group_names(cfg))
    from stability.workloads.charlm.workload import configs, load_split

    split = load_split(cfg)
    check_fault_steps(cfg, (len(split.train) - 1) // configs(cfg)[0].context)


def _group_names(cfg: RunConfig) -> list[str]:
    """The char LM's module groups, built on the meta device (its vocabulary a placeholder):
    names only, no memory, no init cost."""
    import torch

    from stability.models.charlm import CharLM

    assert isinstance(cfg.model, CharLMConfig)  # the registry sends model=charlm here
    with torch.device("meta"):
        return list(CharLM(cfg.model).module_groups())
