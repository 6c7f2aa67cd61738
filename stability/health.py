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

Where the logits come from: an attention module's own `logits(x)` (an `nn.MultiheadAttention` is
wrapped so it has one), or, for attention that calls `torch.nn.functional.scaled_dot_product_attention`
(Hugging Face GPT-2/Llama in their SDPA implementation, timm ViT, most hand-written blocks),
`SdpaAttention`: during the probe's forward a `TorchFunctionMode` sees each SDPA call made while
that module runs and keeps q and k (and the mask, causality, scale); the logits are
q k^T * scale with the call's mask, as SDPA computes them (arXiv 1706.03762).

    health = measure(model, loss_fn, layers)   # {"stage0.layer0": {"attn_entropy": ...}, ...}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stability.outputs import tensors

SINK_THRESHOLD = 0.3


def attention_stats(logits: torch.Tensor) -> dict[str, float]:
    """Entropy, max logit and first-position sink score of attention logits (B, nh, T, T)."""
    p = torch.softmax(logits.float(), dim=-1)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
    entropy = -plogp.sum(-1)  # (B, nh, T)
    finite = logits[torch.isfinite(logits)]
    return {
        "attn_entropy": entropy.mean().item(),
        "attn_logit_max": finite.max().item() if finite.numel() else math.nan,
        "sink": p[..., 0].mean().item(),
    }


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


def sdpa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The pre-softmax logits `F.scaled_dot_product_attention` computes: q (B, H, L, E), k (B, Hk,
    S, E) -> (B, H, L, S), scaled by `scale` (default 1/sqrt(E)); a boolean mask's False and the
    causal mask's upper triangle (top-left aligned, as SDPA's is_causal) are -inf, a float mask
    is added. With fewer key heads (grouped-query attention) each is shared by H / Hk query heads."""
    q, k = q.float(), k.float()
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: repeat each key head
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    att = q @ k.transpose(-2, -1) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))  # (B, H, L, S)
    L, S = att.shape[-2:]
    if is_causal:
        att = att.masked_fill(torch.ones(L, S, dtype=torch.bool, device=att.device).tril().logical_not(), -math.inf)
    if attn_mask is not None:
        att = att.masked_fill(attn_mask.logical_not(), -math.inf) if attn_mask.dtype == torch.bool else att + attn_mask
    return att


class _SdpaCalls(TorchFunctionMode):
    """Keeps the arguments of `F.scaled_dot_product_attention` calls made while `owner.active`."""

    def __init__(self, owner: SdpaAttention) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.owner.active:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            call = {**dict(zip(names, args)), **kwargs}
            self.owner.calls.append({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in call.items()})
        return func(*args, **kwargs)


class SdpaAttention:
    """What `measure` needs of an attention module that calls `F.scaled_dot_product_attention`:
    its input (`register_forward_pre_hook`, positional or `hidden_states=`) and, after a forward
    inside `capture()`, `logits(x)`: the logits of the SDPA call that forward made."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.active = False
        self.calls: list[dict[str, Any]] = []

    def register_forward_pre_hook(self, hook: Callable) -> Any:
        """Call `hook(module, (x,))` with the attention's input before each forward (positional or `hidden_states=`); returns the handle."""

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if x is None:
                x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if x is not None:
                hook(module, (x,))

        return self.module.register_forward_pre_hook(pre, with_kwargs=True)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While inside: SDPA calls made during this module's forward are kept (the last forward's)."""

        def start(module: nn.Module, args: Any) -> None:
            self.active, self.calls = True, []

        def stop(module: nn.Module, args: Any, out: Any) -> None:
            self.active = False

        handles = [self.module.register_forward_pre_hook(start), self.module.register_forward_hook(stop)]
        try:
            with _SdpaCalls(self):
                yield
        finally:
            self.active = False
            for h in handles:
                h.remove()

    def logits(self, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, H, T, S) logits of the module's SDPA call in the last captured forward; None if it made none."""
        if not self.calls:
            return None
        c = self.calls[-1]
        return sdpa_logits(
            c["query"],
            c["key"],
            c.get("attn_mask"),
            bool(c.get("is_causal", False)),
            c.get("scale"),
            bool(c.get("enable_gqa", False)),
        )


def measure(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], layers: dict[str, tuple[nn.Module, Any]]
) -> dict[str, dict[str, float]]:
    """`layers`: name -> (block, its attention: a module with `logits(x)`, or an `SdpaAttention`).
    `loss_fn` runs the validation forward. A layer whose logits could not be had (its SDPA was
    not called) reads NaN for the attention statistics."""
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
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            found = tensors(out)  # a block may return a tuple (hidden states first)
            if found:
                outputs[name] = found[0].detach()

        return hook

    for name, (block, attn) in layers.items():
        handles.append(attn.register_forward_pre_hook(keep_input(name)))
        handles.append(block.register_forward_hook(keep_output(name)))
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for _, attn in layers.values():
                if isinstance(attn, SdpaAttention):
                    stack.enter_context(attn.capture())
            with torch.enable_grad():
                loss = loss_fn()
        if loss.requires_grad and torch.isfinite(loss):
            loss.backward()
        result = {}
        with torch.no_grad():
            for name, (_block, attn) in layers.items():
                x = inputs.get(name)
                logits = attn.logits(x.detach()) if x is not None else None
                stats = (
                    attention_stats(logits)
                    if logits is not None
                    else {"attn_entropy": math.nan, "attn_logit_max": math.nan, "sink": math.nan}
                )
                stats["massive"] = massive_ratio(outputs[name]) if name in outputs else math.nan
                stats["grad_sink"] = grad_sink_ratio(x.grad) if x is not None and x.grad is not None else math.nan
                result[name] = stats
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return result


def calls_sdpa(model: nn.Module, forward: Callable[[], Any], attns: dict[str, nn.Module]) -> set[str]:
    """The names of `attns` whose forward calls `F.scaled_dot_product_attention`, from one
    forward (`forward()`, no gradients, eval mode)."""
    probes = {name: SdpaAttention(m) for name, m in attns.items()}
    was = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for p in probes.values():
                stack.enter_context(p.capture())
            with torch.no_grad():
                forward()
    finally:
        model.train(was)
    return {name for name, p in probes.items() if p.calls}


def summarize(health: dict[str, dict[str, float]]) -> dict[str, float]:
    """Across layers: min entropy, max logit, max sink, number of sink layers, max massive, max grad sink."""
    if not health:
        return {}

    def pick(f: Callable[[list[float]], float], k: str) -> float:
        col = [v[k] for v in health.values() if math.isfinite(v[k])]
        return f(col) if col else math.nan

    return {
        "attn_entropy_min": pick(min, "attn_entropy"),
        "attn_logit_max": pick(max, "attn_logit_max"),
        "sink_max": pick(max, "sink"),
        "sink_layers": sum(1 for v in health.values() if math.isfinite(v["sink"]) and v["sink"] > SINK_THRESHOLD),
        "massive_max": pick(max, "massive"),
        "grad_sink_max": pick(max, "grad_sink"),
    }
