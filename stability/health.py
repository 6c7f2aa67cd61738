"""Attention and activation health, measured on the fixed validation batch at each epoch end.

Per transformer layer (named like its gradient group, e.g. `stage2.layer0`):
- `attn_entropy`: mean entropy of the attention rows, in nats (Zhai et al. 2023, arXiv 2303.06296:
  entropy collapse comes before instability); log T for uniform attention, 0 for one-hot.
- `attn_logit_max`: the largest pre-softmax attention logit (Wortsman et al. 2023,
  arXiv 2309.14322: logit growth is what QK-norm prevents).
- `sink`: mean attention the first position receives; a sink above 0.3 (Gu et al., arXiv 2410.10781).
- `massive`: top |h| over median |h| of the layer's output (Sun et al. 2024, arXiv 2402.17762).
- `grad_sink`: gradient norm at the first position of the attention input over the mean of the
  others (Chen & Yao, arXiv 2603.17771).

One extra forward and backward of the validation batch per epoch; gradients it makes are
discarded, so training is unaffected.

    health = measure(model, loss_fn, layers)   # {"stage0.layer0": {"attn_entropy": ...}, ...}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

SINK_THRESHOLD = 0.3


def attention_stats(logits: torch.Tensor) -> dict[str, float]:
    """Entropy, max logit and first-position sink score of attention logits (B, nh, T, T)."""
    p = torch.softmax(logits.float(), dim=-1)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
    entropy = -plogp.sum(-1)  # (B, nh, T)
    finite = logits[torch.isfinite(logits)]
    return {"attn_entropy": entropy.mean().item(),
            "attn_logit_max": finite.max().item() if finite.numel() else math.nan,
            "sink": p[..., 0].mean().item()}


def massive_ratio(h: torch.Tensor) -> float:
    """Top |h| over median |h| of a hidden-state tensor."""
    a = h.detach().float().abs().flatten()
    return (a.max() / a.median().clamp_min(1e-12)).item()


def grad_sink_ratio(grad: torch.Tensor) -> float:
    """Gradient norm at position 0 over the mean gradient norm at the other positions; grad (B, T, C)."""
    norms = grad.float().norm(dim=-1).mean(0)  # (T,)
    if norms.numel() < 2:
        return math.nan
    return (norms[0] / norms[1:].mean().clamp_min(1e-30)).item()


def measure(model: nn.Module, loss_fn: Callable[[], torch.Tensor],
            layers: dict[str, tuple[nn.Module, nn.Module]]) -> dict[str, dict[str, float]]:
    """`layers`: name -> (block, its attention module). `loss_fn` runs the validation forward."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def keep_input(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0]
            if x.requires_grad:
                x.retain_grad()
            inputs[name] = x
        return hook

    def keep_output(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            outputs[name] = out.detach()
        return hook

    for name, (block, attn) in layers.items():
        handles.append(attn.register_forward_pre_hook(keep_input(name)))
        handles.append(block.register_forward_hook(keep_output(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = loss_fn()
            if loss.requires_grad and torch.isfinite(loss):
                loss.backward()
        result = {}
        with torch.no_grad():
            for name, (_, attn) in layers.items():
                x = inputs[name]
                stats = attention_stats(attn.logits(x.detach()))
                stats["massive"] = massive_ratio(outputs[name])
                stats["grad_sink"] = grad_sink_ratio(x.grad) if x.grad is not None else math.nan
                result[name] = stats
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return result


def summarize(health: dict[str, dict[str, float]]) -> dict[str, float]:
    """Across layers: min entropy, max logit, max sink, number of sink layers, max massive, max grad sink."""
    if not health:
        return {}
    def pick(f: Callable[[list[float]], float], k: str) -> float:
        col = [v[k] for v in health.values() if math.isfinite(v[k])]
        return f(col) if col else math.nan

    return {"attn_entropy_min": pick(min, "attn_entropy"), "attn_logit_max": pick(max, "attn_logit_max"),
            "sink_max": pick(max, "sink"), "sink_layers": sum(1 for v in health.values() if v["sink"] > SINK_THRESHOLD),
            "massive_max": pick(max, "massive"), "grad_sink_max": pick(max, "grad_sink")}
