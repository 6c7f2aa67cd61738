"""The cascade's own checks before any work starts: its audio and codec weights, its fault keys.

Torch, the codec and the audio are loaded only where there is something to look at (a folder,
codec weights on disk, a fault to place), so checking the usual grid (synthetic clips, random
codec weights) loads none of them.
"""

from __future__ import annotations

from stability.config import DataConfig, ModelConfig, RunConfig
from stability.workloads.faults import check_fault_module, check_fault_steps


def check(cfg: RunConfig) -> None:
    """Every file of a data folder and the codec weights (`cascade.data.check_audio`; synthetic
    clips and random weights have nothing on disk), `fault.nan_module` against the cascade's
    module groups and the fault steps against the synthetic clips' steps. Raises ConfigError,
    DataError or CodecError naming the bad value."""
    data = cfg.data
    if isinstance(data, DataConfig) and (data.name == "folder" or data.codec.weights != "random"):
        from stability.workloads.cascade.data import check_audio

        check_audio(data, need_codec=cfg.listen.enabled)
    if cfg.fault.nan_at_step is not None:
        check_fault_module(cfg, _group_names(cfg))
    if isinstance(data, DataConfig) and data.name == "synthetic":
        assert data.n_train is not None  # null (all segments) is for data=folder only: the schema checks it
        check_fault_steps(cfg, data.n_train)


def _group_names(cfg: RunConfig) -> list[str]:
    """The cascade's module groups, built on the meta device: names only, no memory, no init cost."""
    import torch

    from stability.models.cascade import Cascade

    assert isinstance(cfg.model, ModelConfig)  # the registry sends model=cascade here
    with torch.device("meta"):
        return list(Cascade(cfg.model).module_groups())
