"""Attention logits for the health probe from a custom model's attention modules:
`nn.MultiheadAttention` (recomputed from its input projection), a module with `logits(x)`, or a
call of `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from stability.health import SdpaAttention
from stability.workloads.custom.groups import is_attention

# --- attention health -------------------------------------------------------------------------


class MultiheadAttentionLogits:
    """What `stability.health.measure` needs of an `nn.MultiheadAttention` used as self-attention:
    a hook on its input and `logits(x)`, the pre-softmax logits (B, heads, T, T) recomputed from
    its input projection with the mask of the call it saw (the module never returns them with
    need_weights=False, and then only averaged after the softmax)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        self.mha = mha
        self.sig = inspect.signature(mha.forward)
        self.attn_mask: torch.Tensor | None = None
        self.key_padding_mask: torch.Tensor | None = None
        self.is_causal = False

    def register_forward_pre_hook(self, hook: Callable) -> Any:
        """Calls `hook(module, (x,))` with the query x as (B, T, E) however the module is laid out;
        for a sequence-first module x is a transposed view that the forward then uses, so its
        gradient (the health probe's grad_sink) is the input's own."""
        mha = self.mha

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            a = self.sig.bind(*args, **kwargs).arguments
            self.attn_mask, self.key_padding_mask = a.get("attn_mask"), a.get("key_padding_mask")
            self.is_causal = bool(a.get("is_causal", False))
            q = a["query"]
            if mha.batch_first or q.dim() == 2:
                hook(module, (q,))
                return None
            qb = q.transpose(0, 1)  # (B, T, E), a view that becomes the forward's input
            hook(module, (qb,))
            q_new = qb.transpose(0, 1)  # (T, B, E)
            return (
                tuple(q_new if t is q else t for t in args),
                {k: (q_new if v is q else v) for k, v in kwargs.items()},
            )

        return mha.register_forward_pre_hook(pre, with_kwargs=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, E) -> pre-softmax self-attention logits (B, heads, T, T), masked positions -inf."""
        mha, E, H = self.mha, self.mha.embed_dim, self.mha.num_heads
        if mha._qkv_same_embed_dim:
            wq, wk = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
        else:
            wq, wk = mha.q_proj_weight, mha.k_proj_weight
        bq = mha.in_proj_bias[:E] if mha.in_proj_bias is not None else None
        bk = mha.in_proj_bias[E : 2 * E] if mha.in_proj_bias is not None else None
        if x.dim() == 2:
            x = x.unsqueeze(0)
        B, T, _ = x.shape
        q = nn.functional.linear(x, wq, bq).view(B, T, H, E // H).transpose(1, 2)  # (B, H, T, hd)
        k = nn.functional.linear(x, wk, bk).view(B, T, H, E // H).transpose(1, 2)  # (B, H, T, hd)
        att = q @ k.transpose(-2, -1) / math.sqrt(E // H)  # (B, H, T, T)
        mask = self.attn_mask
        if mask is not None:
            mask = mask.view(B, H, T, T) if mask.dim() == 3 else mask  # (B*H, T, T) -> (B, H, T, T)
            att = att.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else att + mask
        elif self.is_causal:
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1), float("-inf"))
        if self.key_padding_mask is not None and self.key_padding_mask.dtype == torch.bool:
            att = att.masked_fill(self.key_padding_mask.view(B, 1, 1, T), float("-inf"))
        return att


def attention_probe(layer: nn.Module) -> Any | None:
    """The layer's self-attention as `health.measure` reads it, or None if its logits cannot be had."""
    attns = [c for n, c in layer.named_children() if is_attention(c)]
    named = dict(layer.named_children())
    attn = (
        named.get("self_attn") if is_attention(named.get("self_attn", nn.Identity())) else (attns[0] if attns else None)
    )
    if isinstance(attn, nn.MultiheadAttention):
        return MultiheadAttentionLogits(attn)
    if attn is not None and callable(getattr(attn, "logits", None)):
        return attn
    if attn is not None:  # measured if it calls F.scaled_dot_product_attention (checked by a forward)
        return SdpaAttention(attn)
    return None
