"""A factory's training or validation data as one form: a `Dataset`, a `TensorDataset` or
tensors, indexed by a batch of example numbers and moved to the run's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from stability.config import ConfigError

# --- data -------------------------------------------------------------------------------------


class Examples:
    """Training or validation examples: tensors indexed directly (fast), or a Dataset collated
    with torch's default_collate. A batch is a tensor or a tuple of tensors."""

    def __init__(self, data: Any, what: str, where: str, device: torch.device) -> None:
        self.device = device
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.dataset: Dataset | None = None
        if isinstance(data, TensorDataset):
            data = data.tensors
        if isinstance(data, torch.Tensor):
            data = (data,)
        self.keys: tuple[str, ...] | None = None
        if isinstance(data, Mapping) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
            self.keys = tuple(data)  # a dict of model inputs ({"input_ids": ..., "labels": ...}): dict batches
            data = tuple(data.values())
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            sizes = {len(t) if t.dim() else -1 for t in data}
            if len(sizes) != 1 or -1 in sizes:
                raise ConfigError(
                    f"{where}: the {what} tensors have different numbers of rows "
                    f"({', '.join(str(tuple(t.shape)) for t in data)}): expected one row per example"
                )
            self.tensors = tuple(t.to(device) for t in data)
            self.single = len(data) == 1
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.dataset = data
            self.single = False
        else:
            raise ConfigError(f"{where}: {what} is a {type(data).__name__}: expected a torch Dataset or tensors (x, y)")
        try:
            n = len(self)
        except TypeError as e:
            raise ConfigError(f"{where}: {what} has no length: {e}") from None
        if n == 0:
            raise ConfigError(f"{where}: the {what} data has no examples (length 0)")

    def _dataset(self) -> Dataset:
        if self.dataset is None:
            raise RuntimeError("Examples holds tensors, not a Dataset")
        return self.dataset

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors is not None else len(self._dataset())  # type: ignore[arg-type]

    def __getitem__(self, idx: torch.Tensor) -> Any:
        """The examples `idx` (int64, (B,)) as one batch on the device."""
        if self.tensors is not None:
            idx = idx.to(self.tensors[0].device)
            rows = tuple(t[idx] for t in self.tensors)
            if self.keys is not None:
                return dict(zip(self.keys, rows))
            return rows[0] if self.single else rows
        dataset = self._dataset()
        batch = default_collate([dataset[i] for i in idx.tolist()])
        return _to(batch, self.device)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to(b, device) for b in batch)
    return batch


def split(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """(model inputs, target) of a batch: (inputs..., target), or one tensor that is both. A dict
    batch (keyword inputs, `model(**batch)`) is its own target: see `CustomWorkload.loss`."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), batch[0]
        return tuple(batch[:-1]), batch[-1]
    return (batch,), batch
