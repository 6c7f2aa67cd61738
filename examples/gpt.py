"""A small GPT (nanoGPT's layout) on a text file, as a stab workload: `build` returns the model,
its data and its loss; stab finds the layers, trains, and checks the output for a scream.

    stab run model=custom model._target_=examples.gpt.build
    stab sweep model=custom model._target_=examples.gpt.build +model.width=16,32 norm=pre,post
    stab run model=custom model._target_=examples.gpt.build +model.path=my_book.txt
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

README = Path(__file__).resolve().parent.parent / "README.md"  # the text when no path is given


class Block(nn.Module):
    """One transformer layer, post-norm (x <- LN(x + f(x))) or pre-norm (x <- x + f(LN(x)))."""

    def __init__(self, width: int, heads: int, norm: str) -> None:
        super().__init__()
        self.pre = norm == "pre"
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pre:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int, norm: str) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, norm) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width) if norm == "pre" else nn.Identity()  # a pre-norm stack's final norm
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)  # True: may not attend (future)
        x = self.tok(idx) + self.pos[:T]  # (B, T, width)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))  # (B, T, vocab)


def build(
    path: str | None = None,
    max_chars: int = 20_000,
    context: int = 32,
    width: int = 32,
    depth: int = 2,
    heads: int = 2,
    norm: str = "post",
) -> dict:
    """Next-character prediction on `path` (default: stab's README). `norm` is stab's short name."""
    if norm not in ("pre", "post"):
        raise ValueError(f"norm={norm!r}: this GPT has pre or post")
    text = Path(path or README).read_text(encoding="utf-8")[:max_chars]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, context + 1, context)  # (N, context + 1), input and next-character target
    n_val = max(8, len(windows) // 10)
    val, train = windows[:n_val], windows[n_val:]
    return {
        "model": GPT(len(chars), context, width, depth, heads, norm),
        "train": (train[:, :-1], train[:, 1:]),
        "val": (val[:, :-1], val[:, 1:]),
        "loss": lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),  # (B*T, vocab), (B*T,)
        "info": {"text": str(path or README), "chars": len(text), "vocab": len(chars)},
    }
