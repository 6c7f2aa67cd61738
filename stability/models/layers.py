"""Transformer layers shared by every workload: Norm -> Attention -> MLP -> Block.

`norm` places the normalisation: `post` (Vaswani et al. 2017, arXiv 1706.03762:
x <- LN(x + f(x))) or `pre` (x <- x + f(LN(x))). Xiong et al. 2020 (arXiv 2002.04745) show that
post-norm's gradients at the last layers are large at initialisation, which is why it needs
warmup and why it is one of the ablation axes here; a pre-norm stack instead leaves its
residual stream unnormalised, so it ends with a final norm (see `Stack`). `deepnorm` (Wang et
al. 2022, arXiv 2203.00555) keeps post-norm but up-weights the residual and down-scales the
init: x <- LN(alpha x + f(x)), alpha = (2N)^(1/4), beta = (8N)^(-1/4) for N layers.

The other stabilizers, each off by default and switched by `Stack` keywords (`stabilizers(cfg)`
reads them from a model config, in one place):
- `qk_norm`: a norm on each head's queries and keys (Dehghani et al. 2023, arXiv 2302.05442;
  Wortsman et al. 2023, arXiv 2309.14322), so attention logits cannot grow without bound;
- `v_scale`: v <- phi(|v|^2) v with phi(r) = r / (r + C) per head (Chen & Yao, arXiv 2603.17771);
- `sigma_reparam`: W <- gamma / sigma(W) * W on every attention and MLP weight (Zhai et al.
  2023, arXiv 2303.06296), applied by `init_weights` once W0 is drawn (gamma starts at sigma(W0)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


def make_norm(kind: str, dim: int) -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467)."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim)
    raise ValueError(f"Unsupported norm type: {kind!r}")


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """DeepNorm's (alpha, beta) for a stack of N layers (Wang et al. 2022, arXiv 2203.00555, for
    encoder-only and decoder-only models): alpha = (2N)^(1/4) up-weights the residual, beta =
    (8N)^(-1/4) scales the init of the FFN, value and output projections, which bounds the
    model update by O(1) whatever the depth."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


class SigmaReparam(nn.Module):
    """sigmaReparam (Zhai et al. 2023, arXiv 2303.06296) as a parametrization of a weight:
    W_hat = gamma / sigma(W) * W, with sigma(W) the spectral norm and gamma a learned scalar.

    Unlike plain spectral norm (sigma fixed to 1), gamma lets each layer learn its gain; the
    paper's point is that attention entropy collapse follows a growing sigma of the attention
    weights. gamma starts at sigma(W0) (exact, from an SVD), so the layer computes the same
    function at init. sigma is then tracked by one power iteration per training forward, like
    `torch.nn.utils.parametrizations.spectral_norm`; u and v are buffers, no gradient.
    """

    u: torch.Tensor  # (out_features,) buffer: the left singular vector estimate
    v: torch.Tensor  # (in_features,) buffer: the right singular vector estimate

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        with torch.no_grad():
            if weight.is_meta:  # shapes only (module names for preflight)
                u, v, sigma = weight.new_empty(out_f), weight.new_empty(in_f), weight.new_ones(())
            else:
                U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
                u, v, sigma = U[:, 0], Vh[0], S[0]
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("v", v.to(weight.dtype))
        self.gamma = nn.Parameter(sigma.clone().to(weight.dtype))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        """W (out, in) -> gamma / sigma(W) x W, sigma from one power iteration per training forward."""
        if self.training:
            with torch.no_grad():  # one power iteration, starting from the last estimate
                self.v.copy_(F.normalize(W.t() @ self.u, dim=0))
                self.u.copy_(F.normalize(W @ self.v, dim=0))
        u, v = self.u.clone(), self.v.clone()  # the next forward updates the buffers in place
        sigma = torch.dot(u, W @ v)  # gradient flows through W only
        return W * (self.gamma / sigma)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, with the optional
    qk_norm and v_scale of the module docstring; causal for the char LM."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        causal: bool,
        *,
        norm_type: str = "layer",
        qk_norm: bool = False,
        v_scale: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        hs = d_model // n_heads
        # QK-norm: normalising q and k per head bounds |q.k| / sqrt(hs) by sqrt(hs) x the norm
        # gains, which stops the attention-logit growth that collapses attention to one-hot
        # (Dehghani et al. 2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322).
        self.q_norm = make_norm(norm_type, hs) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm_type, hs) if qk_norm else nn.Identity()
        # V-scale (Chen & Yao, arXiv 2603.17771): v <- phi(|v|^2) v, phi(r) = r / (r + C),
        # C = d_model * hs * sigma^2 * lambda: the |v|^2 of a value vector at init scale
        # (sigma = 0.02) times lambda = exp(theta), learned per head. Large values pass almost
        # unchanged (phi -> 1); small ones are shrunk quadratically (phi ~ r / C).
        self.v_theta = nn.Parameter(torch.zeros(n_heads)) if v_scale else None
        self.v_c0 = d_model * hs * 0.02**2

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each (B, nh, T, hs): the one place queries and keys are made, shared by
        `forward` and `logits` so health probes see what the forward uses."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        q, k = self.q_norm(q), self.k_norm(k)  # identity unless qk_norm
        if self.v_theta is not None:
            r = v.float().pow(2).sum(-1, keepdim=True)  # (B, nh, T, 1): |v|^2 per head and position
            c = self.v_c0 * self.v_theta.float().exp().view(1, -1, 1, 1)  # (1, nh, 1, 1)
            v = v * (r / (r + c)).to(v.dtype)
        return q, k, v

    # Set by `optstate.LMProbe`: each training forward keeps its largest pre-softmax logit
    # (0-dim, on the device) in `logit_max`; off by default, so the forward costs nothing extra.
    watch_logits = False
    logit_max: torch.Tensor | None = None
    _mask: torch.Tensor | None = None  # (T, T) bool, True above the diagonal: the causal positions left out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); keeps the largest pre-softmax logit in `logit_max` when watched."""
        B, T, C = x.shape
        q, k, v = self.heads(x)
        if self.watch_logits and self.training:
            with torch.no_grad():
                att = q.detach() @ k.detach().transpose(-2, -1)  # (B, nh, T, T), unscaled
                if self.causal:  # in place, with the mask made once per length
                    if self._mask is None or self._mask.shape[0] != T or self._mask.device != att.device:
                        self._mask = torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1)
                    att.masked_fill_(self._mask, float("-inf"))
                self.logit_max = att.amax().float() / math.sqrt(q.shape[-1])
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
    """The feed-forward sublayer: Linear(d, ratio x d), GELU, Linear(ratio x d, d)."""

    def __init__(self, d_model: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One layer; `depth` (the stack's N) sets DeepNorm's alpha and beta."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mlp_ratio: int,
        norm: str,
        norm_type: str,
        causal: bool,
        *,
        depth: int = 1,
        qk_norm: bool = False,
        v_scale: bool = False,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.norm1 = make_norm(norm_type, d_model)
        self.attn = Attention(d_model, n_heads, causal, norm_type=norm_type, qk_norm=qk_norm, v_scale=v_scale)
        self.norm2 = make_norm(norm_type, d_model)
        self.mlp = MLP(d_model, mlp_ratio)
        self.alpha, self.beta = deepnorm_constants(depth) if norm == "deepnorm" else (1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d): pre-norm x + f(norm(x)); post-norm and DeepNorm norm(alpha x + f(x))."""
        if self.norm == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        # post-norm (alpha = 1) and DeepNorm: x <- LN(alpha x + f(x))
        x = self.norm1(self.alpha * x + self.attn(x))
        return self.norm2(self.alpha * x + self.mlp(x))

    @torch.no_grad()
    def scale_init(self) -> None:
        """DeepNorm's init: the FFN, value and output projections times beta (q and k keep
        theirs). The paper draws them Xavier-normal with gain beta; `init_weights` draws the
        configured init and this multiplies it by beta (1 unless deepnorm)."""
        if self.beta == 1.0:
            return
        C = self.attn.proj.in_features
        self.attn.qkv.weight[2 * C :].mul_(self.beta)  # the value rows of the fused q, k, v weight
        for linear in (self.attn.proj, self.mlp.fc, self.mlp.proj):
            linear.weight.mul_(self.beta)


class Stack(nn.Module):
    """`n_layers` blocks; a pre-norm stack ends with a final norm unless `final_norm` is off.

    Without it the pre-norm residual stream is unbounded (every block adds to it and nothing
    rescales it), and whatever reads the stream sees its full growth. Post-norm stacks already
    end in a norm, so `final_norm` does not apply to them.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_ratio: int,
        norm: str,
        norm_type: str,
        final_norm: bool,
        causal: bool,
        *,
        qk_norm: bool = False,
        v_scale: bool = False,
        sigma_reparam: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(
                d_model, n_heads, mlp_ratio, norm, norm_type, causal, depth=n_layers, qk_norm=qk_norm, v_scale=v_scale
            )
            for _ in range(n_layers)
        )
        self.final_norm = make_norm(norm_type, d_model) if norm == "pre" and final_norm else nn.Identity()
        self.sigma_reparam = sigma_reparam  # applied by `init_weights`, once the weights are drawn

    def blocks(self) -> list[Block]:
        """The blocks in order, typed (iterating the `nn.ModuleList` yields plain modules)."""
        return [b for b in self.layers if isinstance(b, Block)]

    def reparametrize(self) -> None:
        """sigmaReparam on every attention and MLP weight (once; a no-op unless enabled)."""
        if not self.sigma_reparam:
            return
        for block in self.blocks():
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                if not parametrize.is_parametrized(linear, "weight"):
                    parametrize.register_parametrization(linear, "weight", SigmaReparam(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) through every block, then the final norm (pre-norm with final_norm; else identity)."""
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


def stabilizers(cfg: Any) -> dict[str, bool]:
    """A model config's layer-level stabilizer flags as `Stack` keywords: the one place each is
    read. Every workload builds its stacks with `Stack(..., **stabilizers(cfg))`."""
    return {"qk_norm": cfg.qk_norm, "v_scale": cfg.v_scale, "sigma_reparam": cfg.sigma_reparam}


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
    Xavier-uniform per layer (the init Xiong et al. 2020 analyse). Call once, right after
    building a model: it also applies DeepNorm's init and sigmaReparam."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if std > 0:
                nn.init.normal_(m.weight, std=std)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    # The stabilizers that act on the initial weights, in order: DeepNorm's beta scaling, then
    # sigmaReparam (its gamma starts at sigma of the final W0).
    for m in module.modules():
        if isinstance(m, Block):
            m.scale_init()
    for m in list(module.modules()):
        if isinstance(m, Stack):
            m.reparametrize()
