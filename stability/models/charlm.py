"""A small causal character-level transformer LM: the text side of the scream.

The original reports' text model of the cascade's family collapsed into repeating the letter
`e` under post-norm, and stopped doing so under pre-norm with clipping. This model reproduces
that setting with the cascade's own layers (`layers.Stack`), so every knob (norm placement,
norm type, final norm, spectral norm, QK-norm, V-scale, sigmaReparam, DeepNorm) means the same
thing in both workloads. Layout follows nanoGPT (Karpathy): token + learned position
embeddings -> causal blocks -> (final norm) -> lm_head; the lm_head is not tied to the token
embedding, so `spectral_norm` can bound it alone and its gradient norm is its own group.

    model = CharLM(CharLMConfig(norm="pre"), vocab_size=96)
    logits = model(idx)                         # (B, T) -> (B, T, vocab)
    text_ids = model.generate(prompt, 128)      # greedy continuation, (B, T0 + 128)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from stability.config import CharLMConfig
from stability.models.layers import Stack, init_weights, stabilizers

# The vocabulary comes from the data; building without data (module names only) uses this.
PLACEHOLDER_VOCAB = 128


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Next-character cross-entropy, plus z_loss x mean(log^2 Z) when z_loss > 0.

    log Z = logsumexp of the output logits. The auxiliary term keeps log Z near 0, so the
    softmax normaliser cannot drift to where float rounding makes the loss diverge (Chowdhery
    et al. 2022, arXiv 2204.02311; Wortsman et al. 2023, arXiv 2309.14322, coefficient 1e-4).
    logits (B, T, V), targets (B, T).
    """
    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if z_loss > 0:
        log_z = torch.logsumexp(logits, dim=-1)  # (B, T)
        loss = loss + z_loss * log_z.pow(2).mean()
    return loss


class CharLM(nn.Module):
    """A GPT-style character language model: token and position embeddings, a causal transformer
    stack (the cascade's blocks and stabilizers), a linear head over the vocabulary."""

    def __init__(self, cfg: CharLMConfig, vocab_size: int = PLACEHOLDER_VOCAB) -> None:
        super().__init__()
        self.context = cfg.context
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.stack = Stack(
            cfg.d_model,
            cfg.n_layers,
            cfg.n_heads,
            cfg.mlp_ratio,
            cfg.norm,
            cfg.norm_type,
            cfg.final_norm,
            causal=True,
            **stabilizers(cfg),
        )
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        # GPT-2: N(0, 0.02), not nn.Embedding's N(0, 1). With embed_scale, the Transformer's (and
        # Xiong et al. 2020's, arXiv 2002.04745) N(0, 1/d) times sqrt(d): entries of unit scale, so
        # the residual stream does not start 50x smaller than what each block adds to it.
        self.embed_mult = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=cfg.d_model**-0.5 if cfg.embed_scale else 0.02)
        if cfg.spectral_norm:
            # The char LM's output projection, as `output_proj` is the cascade's (Miyato et al.
            # 2018, arXiv 1802.05957): sigma(lm_head) = 1, one power iteration per training forward.
            spectral_norm(self.lm_head)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), T <= context -> logits (B, T, vocab_size)."""
        _, T = idx.shape  # (B, T)
        pos = torch.arange(T, device=idx.device)
        x = (self.tok(idx) + self.pos(pos)) * self.embed_mult  # (B, T, d)
        x = self.stack(x)  # (B, T, d)
        return self.lm_head(x)  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy (argmax) continuation of `idx` (B, T0) by `n` characters -> (B, T0 + n).

        Greedy, because that is where degeneration shows first (Holtzman et al. 2019, arXiv
        1904.09751; Welleck et al. 2020, arXiv 1908.04319). The context is cropped to the last
        `context` characters, as in nanoGPT.
        """
        for _ in range(n):
            logits = self(idx[:, -self.context :])  # (B, t, vocab)
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Named groups whose gradient norms are recorded, in forward (execution) order."""
        groups: dict[str, list[nn.Module]] = {"embedding": [self.tok, self.pos]}
        for j, layer in enumerate(self.stack.blocks()):
            groups[f"layer{j}.attn"] = [layer.attn]
            groups[f"layer{j}.mlp"] = [layer.mlp]
            groups[f"layer{j}.norm"] = [layer.norm1, layer.norm2]
        if any(True for _ in self.stack.final_norm.parameters()):
            groups["final_norm"] = [self.stack.final_norm]
        groups["lm_head"] = [self.lm_head]
        return groups

    def health_layers(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """Each transformer layer and its attention, named like its gradient groups."""
        return {f"layer{j}": (layer, layer.attn) for j, layer in enumerate(self.stack.blocks())}
