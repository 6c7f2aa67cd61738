"""The interface between a workload (a model with its data, loss and checks) and stab's loop.

The training loop, `stab bench`, `stab replay` and `stab probe` see a workload only through
`Workload`. A subclass must give `model`, `n_train`, `batch` and `loss`; everything else has a
documented default that turns the feature off rather than faking it:

    ============================  ==========================================  ===================
    member                        what stab does with it                       default
    ============================  ==========================================  ===================
    model                         trained, instrumented, saved for replay      (required)
    info                          written to the run folder's data.json        {}
    n_train, batch(idx)           the epoch's shuffled mini-batches            (required)
    loss(batch)                   the scalar that is backpropagated            (required)
    module_groups()               one grad norm per group per step             model.module_groups(),
                                                                               else its children
    rms_matchers()                stage RMS-match records (cascade only)       [] (none)
    evaluate()                    validation loss and the scream check         NaN loss, no check
    health_layers(), health_loss  attention entropy, max logit, sinks          {} (not available)
    listen(epoch, run_dir)        decoded audio at listen epochs               {} (nothing)
    ============================  ==========================================  ===================
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class Workload(abc.ABC):
    """A model, its training data and loss, and the checks stab runs on it each epoch.

    Attributes:
        model: the `nn.Module` being trained, already on the run's device.
        info: facts about the data (sizes, scales, source), JSON-serialisable; data.json.
        target_scores: the scream scores of the real data the scream check compares against
            ({} when the workload has no scream check).
    """

    model: nn.Module
    info: dict[str, Any] = {}  # noqa: RUF012 (a subclass assigns its own dict; never mutated here)
    target_scores: dict[str, float] = {}  # noqa: RUF012 (as info)

    @property
    @abc.abstractmethod
    def n_train(self) -> int:
        """Training examples; an epoch is `n_train // train.batch_size` batches."""

    @abc.abstractmethod
    def batch(self, idx: torch.Tensor) -> Any:
        """The mini-batch of training examples `idx` (int64, (B,)), on the model's device."""

    @abc.abstractmethod
    def loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one batch: a scalar (0-dim) tensor with a gradient path."""

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Named groups of modules, in forward order, each recorded as one grad norm per step
        and searched for the first non-finite value. Default: the model's own
        `module_groups()`, else one group per top-level child module."""
        own = getattr(self.model, "module_groups", None)
        if callable(own):
            return own()
        return {
            name: [child]
            for name, child in self.model.named_children()
            if any(p.requires_grad for p in child.parameters())
        }

    def rms_matchers(self) -> list[Any]:
        """Stage RMS-matchers whose `last` is (rms, needed ratio, applied scale); [] if none."""
        return []

    def evaluate(self) -> dict[str, Any]:
        """Per-epoch validation: {"val_loss": float, "collapsed": bool | None (None: no
        check), "scores": {...}, "target_scores": {...}} and any extra JSON-able fields.
        Default: no validation data (val_loss NaN, no scream check)."""
        return {"val_loss": math.nan, "collapsed": None, "scores": {}, "target_scores": {}}

    def health_layers(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """{layer name: (transformer layer, its attention module)} for the health probe
        (`stability.health`); {} means attention health is not available."""
        return {}

    def health_loss(self) -> torch.Tensor:
        """The loss on a fixed validation batch, run by the health probe; only called when
        `health_layers()` is not empty."""
        raise NotImplementedError(f"{type(self).__name__} has health layers but no health_loss()")

    def listen(self, epoch: int, run_dir: Path) -> dict[str, Any]:
        """Extra per-epoch artefacts written into `run_dir` (the cascade's decoded audio);
        returns fields for the epoch record, {} for none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, n_train={self.n_train})"
