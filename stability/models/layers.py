"""Transformer layers shared by every workload: Norm -> Attention -> MLP -> Block.

`norm` places the normalisation: `post` (Vaswani et al. 2017, arXiv 1706.03762:
x <- LN(x + f(x))) or `pre` (x <- x + f(LN(x))). Xiong et al. 2020 (arXiv 2002.04745) show that
post-norm's gradients at the last layers are large at initialisation, which is why it needs
warmup and why it is one of the ablation axes here; a pre-norm stack instead leaves its
residual stream unnormalised, so it ends with a final norm (see `Stack`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_norm(kind: str, dim: int) -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467)."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim)
    raise ValueError(f"Unsupported norm type: {kind!r}")


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each (B, nh, T, hs): the one place queries and keys are made, shared by
        `forward` and `logits` so health probes see what the forward uses."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax attention logits (B, nh, T, T), causal positions masked to -inf. For
        probes only: the forward never materialises them."""
        q, k, _ = self.heads(x)
        att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        if self.causal:
            T = att.shape[-1]
            mask = torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        return att


class MLP(nn.Module):
    def __init__(self, d_model: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, norm: str, norm_type: str,
                 causal: bool) -> None:
        super().__init__()
        self.norm = norm
        self.norm1 = make_norm(norm_type, d_model)
        self.attn = Attention(d_model, n_heads, causal)
        self.norm2 = make_norm(norm_type, d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))  # post-norm
        return self.norm2(x + self.mlp(x))


class Stack(nn.Module):
    """`n_layers` blocks; a pre-norm stack ends with a final norm unless `final_norm` is off.

    Without it the pre-norm residual stream is unbounded (every block adds to it and nothing
    rescales it), and whatever reads the stream sees its full growth. Post-norm stacks already
    end in a norm, so `final_norm` does not apply to them.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, mlp_ratio: int, norm: str,
                 norm_type: str, final_norm: bool, causal: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, norm, norm_type, causal) for _ in range(n_layers))
        self.final_norm = make_norm(norm_type, d_model) if norm == "pre" and final_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


def sinusoidal_positions(T: int, d: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed positional encoding (Vaswani et al. 2017), shape (T, d)."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) linear weights (std 0.02), zero biases, unit norms. std=0 means
    Xavier-uniform per layer (the init Xiong et al. 2020 analyse)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if std > 0:
                nn.init.normal_(m.weight, std=std)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
