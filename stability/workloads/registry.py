"""Which workload `model.name` names: how it is checked before any work starts, and how it is made.

    workload(cfg.model.name).check(cfg)           # its data, module groups and fault steps
    work = workload(cfg.model.name).make(cfg, device)

Each workload is imported on use: checking the usual grid (the cascade on synthetic clips with
random codec weights) loads no torch, and the cascade's codec is loaded only by the cascade.
A new workload is one entry here, its own folder beside this file and a schema section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from stability.config import RunConfig
    from stability.workloads.base import Workload


@dataclass(frozen=True)
class Kind:
    """One workload.

    check(cfg): its own checks, before any work starts (its data, its module groups against
        `fault.nan_module`, the steps its data gives against the fault steps); raises
        ConfigError, DataError or CodecError naming the bad value.
    make(cfg, device): the workload with its data loaded and its model on `device`.
    """

    check: Callable[[RunConfig], None]
    make: Callable[[RunConfig, torch.device], Workload]


def _check_cascade(cfg: RunConfig) -> None:
    from stability.workloads.cascade.preflight import check

    check(cfg)


def _make_cascade(cfg: RunConfig, device: torch.device) -> Workload:
    from stability.workloads.cascade.workload import CascadeWorkload

    return CascadeWorkload(cfg, device)


def _check_charlm(cfg: RunConfig) -> None:
    from stability.workloads.charlm.preflight import check

    check(cfg)


def _make_charlm(cfg: RunConfig, device: torch.device) -> Workload:
    from stability.workloads.charlm.workload import CharLMWorkload

    return CharLMWorkload(cfg, device)


def _check_custom(cfg: RunConfig) -> None:
    from stability.workloads.custom.preflight import check

    check(cfg)


def _make_custom(cfg: RunConfig, device: torch.device) -> Workload:
    from stability.workloads.custom.workload import CustomWorkload

    return CustomWorkload(cfg, device)


WORKLOADS: dict[str, Kind] = {
    "cascade": Kind(_check_cascade, _make_cascade),
    "charlm": Kind(_check_charlm, _make_charlm),
    "custom": Kind(_check_custom, _make_custom),
}


def workload(name: str) -> Kind:
    """The workload `model.name` names; ValueError for an unknown name."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"model={name!r}: unknown model; allowed: {', '.join(WORKLOADS)}") from None
