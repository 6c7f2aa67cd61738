"""A custom model's check before any work starts: the factory is called and what it returns
checked once per configuration and process, then the batch size and fault keys against it.
"""

from __future__ import annotations

import torch

from stability.config import ConfigError, RunConfig
from stability.workloads.custom.workload import CustomWorkload
from stability.workloads.faults import check_fault_module, check_fault_steps

# --- the check before any work starts ---------------------------------------------------------

_CHECKED: dict[str, tuple[list[str], int]] = {}  # run identity -> (module groups, n_train), per process


def check(cfg: RunConfig) -> None:
    """Call the factory and check what it returns (a forward and backward, `CustomWorkload`),
    then `train.batch_size` against its training examples and the fault keys against its module
    groups and steps. Built once per configuration and process: `stab run` checks before it
    creates the run folder and the run checks again. Raises ConfigError naming the bad value."""
    key = cfg.identity()
    if key not in _CHECKED:
        work = CustomWorkload(cfg, torch.device("cpu"))
        _CHECKED[key] = (list(work.module_groups()), work.n_train)
    names, n_train = _CHECKED[key]
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is more than the training data: "
            f"model._target_={getattr(cfg.model, 'target', None)} gives {n_train} training examples; expected at most {n_train}"
        )
    if cfg.fault.nan_at_step is not None:
        check_fault_module(cfg, names)
    check_fault_steps(cfg, n_train)
