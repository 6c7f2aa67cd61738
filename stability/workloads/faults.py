"""The fault keys (`fault.*`) held against what a workload gives: its module groups and its steps.

Each workload's pre-flight check calls these with what only it knows (its group names, its
training examples), so a fault that would never fire is refused before the run folder is made.
"""

from __future__ import annotations

from stability.config import ConfigError, RunConfig, did_you_mean


def check_fault_steps(cfg: RunConfig, n_train: int) -> None:
    """A fault step (`fault.nan_at_step`, `crash_at_step`, `spike_at_step`) must be one the run
    takes: there are `train.epochs` x (n_train // train.batch_size) steps, numbered from 0.
    Raises ConfigError naming the key, its value and the run's steps."""
    per_epoch = max(1, n_train // cfg.train.batch_size)
    total = cfg.train.epochs * per_epoch
    for key in ("nan_at_step", "crash_at_step", "spike_at_step"):
        step = getattr(cfg.fault, key)
        if step is not None and step >= total:
            raise ConfigError(
                f"fault.{key}={step} is past the end of the run: it takes {total} steps, numbered 0 to "
                f"{total - 1} (train.epochs={cfg.train.epochs} x {per_epoch} batches of "
                f"train.batch_size={cfg.train.batch_size} from {n_train} training examples)"
            )


def check_fault_module(cfg: RunConfig, names: list[str]) -> None:
    """`fault.nan_module` must be one of the model's module groups `names` (in forward order).
    Raises ConfigError naming the value, the groups and the nearest name."""
    if cfg.fault.nan_module not in names:
        raise ConfigError(
            f"fault.nan_module={cfg.fault.nan_module!r} is not a module group of this model: "
            f"expected one of {', '.join(names)}" + did_you_mean(cfg.fault.nan_module, names)
        )
