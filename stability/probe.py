"""Gradients at initialisation, layer by layer: does post-norm's grow with depth?

Xiong et al. 2020 (arXiv 2002.04745, Fig. 3) measure the Frobenius norm of the gradient of each
layer's FFN output weight at initialisation: for post-norm it grows with the layer index (the
last layers get the largest gradients, which is why post-norm needs warmup); for pre-norm it
stays flat. `init_profile` measures the same for a configured model, the gradient averaged over
K batches of its real training data.

    rows = compare(cfg, depths=[2, 6, 12], norms=["pre", "post"], k=4)
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn

from stability.config import ConfigError, CustomModelConfig, ModelConfig, RunConfig
from stability.workloads import build


def init_profile(cfg: RunConfig, k: int, device: torch.device) -> list[dict[str, Any]]:
    """One row per transformer layer: ||mean over K batches of dL/dW_ffn_out||_F at init."""
    work = build(cfg, device, compile=False).work
    model = work.model
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.train.batch_size, work.n_train)
    for _ in range(k):
        idx = torch.randperm(work.n_train, generator=g)[:bs]
        (work.loss(work.batch(idx)) / k).backward()  # accumulates the mean gradient
    rows = []
    for name, (block, _attn) in work.health_layers().items():
        weight = cast(nn.Linear, block.get_submodule("mlp.proj")).weight
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        stage, _, layer = name.rpartition("layer")  # "stage2.layer3" (cascade) or "layer3" (char LM)
        rows.append(
            {"layer_name": name, "stage": stage.rstrip("."), "layer": int(layer), "grad_fro": grad.norm().item()}
        )
    model.zero_grad(set_to_none=True)
    return rows


def compare(
    cfg: RunConfig, depths: list[int], norms: list[str], k: int, device: torch.device = torch.device("cpu")
) -> list[dict[str, Any]]:
    """`init_profile` for every depth x norm placement, other settings as configured."""
    out = []
    for depth in depths:
        for norm in norms:
            m = cfg.model
            if isinstance(m, CustomModelConfig):
                raise ConfigError(
                    "model=custom: stab probe varies the built-in models' depth and norm; a factory's "
                    "model has its own parameters"
                )
            # the cascade has one layer count per stage, the char LM one for its single stack
            layers = [depth] * len(m.n_layers) if isinstance(m, ModelConfig) else depth
            c = cfg.replace(model=m.replace(n_layers=layers, norm=norm))
            for row in init_profile(c, k, device):
                out.append({"depth": depth, "norm": norm, **row})
    return out


def growth(rows: list[dict[str, Any]]) -> float:
    """Last layer's gradient norm over the first layer's (within one stage)."""
    first, last = rows[0]["grad_fro"], rows[-1]["grad_fro"]
    return last / first if first > 0 else float("nan")
