"""A ViT-style patch transformer classifying synthetic images, as a stab workload: a bright
square sits in one of the four quadrants of a noisy image; the class is the quadrant. Built from
torch's own nn.TransformerEncoderLayer, which stab finds by type (groups, attention health).

    stab run model=custom model._target_=examples.vit.build
    stab sweep model=custom model._target_=examples.vit.build +model.width=16,32 norm=pre,post
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def images(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy (1, size, size) images with a bright (size/4)-square in quadrant y, and y (n,)."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, size, size, generator=gen)
    s, half = size // 4, size // 2
    for i, q in enumerate(y.tolist()):
        r0 = (q // 2) * half + int(torch.randint(0, half - s + 1, (1,), generator=gen))
        c0 = (q % 2) * half + int(torch.randint(0, half - s + 1, (1,), generator=gen))
        x[i, 0, r0 : r0 + s, c0 : c0 + s] += 2.0
    return x, y


class ViT(nn.Module):
    """Patches -> linear embedding + [CLS] + learned positions -> encoder -> head on [CLS]."""

    def __init__(self, size: int, patch: int, width: int, depth: int, heads: int, norm: str, classes: int = 4) -> None:
        super().__init__()
        n_patches = (size // patch) ** 2
        self.embed = nn.Conv2d(1, width, patch, stride=patch)  # (B, width, size/patch, size/patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=norm == "pre"
        )
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(width) if norm == "pre" else None, enable_nested_tensor=False
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.embed(x).flatten(2).transpose(1, 2)  # (B, n_patches, width)
        h = torch.cat([self.cls.expand(len(p), -1, -1), p], dim=1) + self.pos  # (B, n_patches + 1, width)
        return self.head(self.encoder(h)[:, 0])  # (B, classes)


def build(
    n: int = 512,
    size: int = 8,
    patch: int = 2,
    width: int = 32,
    depth: int = 2,
    heads: int = 2,
    norm: str = "post",
    seed: int = 0,
) -> dict:
    """`n` images (a tenth held out); `norm` is stab's short name (pre: norm_first and a final norm)."""
    if norm not in ("pre", "post"):
        raise ValueError(f"norm={norm!r}: nn.TransformerEncoderLayer has pre (norm_first) or post")
    x, y = images(n, size, torch.Generator().manual_seed(seed))
    n_val = max(16, n // 10)
    return {
        "model": ViT(size, patch, width, depth, heads, norm),
        "train": (x[n_val:], y[n_val:]),
        "val": (x[:n_val], y[:n_val]),
        "loss": F.cross_entropy,  # (B, classes) logits, (B,) class ids
    }
