"""EnCodec 24 kHz: audio -> continuous latents [B, 128, T] and latents -> RVQ codes.

Weights are `pretrained` (the `encodec` package's own download), a local checkpoint path
(loaded with `weights_only=True`), or `random` (the real architecture, seeded). A random-init
model's RVQ codebooks are zeros until k-means initialises them, so every code would be 0:
`calibrate_codebooks` runs k-means on the data's own latents first.

    codec = load_codec(CodecConfig(weights="random", seed=0))
    z = encode(codec.model, audio)            # (B, 128, T), 75 frames per second
    calibrate_codebooks(codec.model.quantizer, z, n_q=2, seed=0)
    book = CodeBook(quantizer_state(codec.model.quantizer, n_q=2))
    codes = book.codes(z)                     # (B, T): first-codebook codes
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stability.config import CodecConfig

FRAME_RATE = 75  # latent frames per second at 24 kHz (hop 320)


class CodecError(RuntimeError):
    """The requested EnCodec weights cannot be had."""


@dataclass
class Codec:
    model: Any  # encodec.EncodecModel
    info: dict[str, Any]  # what was used: recorded in every run


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_codec(cfg: CodecConfig) -> Codec:
    """Build EnCodec 24 kHz with the configured weights, in eval mode on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses the old weight_norm
        from encodec import EncodecModel

        if cfg.weights == "random":
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                model = EncodecModel.encodec_model_24khz(pretrained=False)
            info = {"weights": "random", "seed": cfg.seed, "checksum": None}
        elif cfg.weights == "pretrained":
            try:
                model = EncodecModel.encodec_model_24khz(pretrained=True)
            except Exception as e:  # no network, blocked download, bad cache
                raise CodecError(
                    f"data.codec.weights=pretrained: could not download the EnCodec 24 kHz weights "
                    f"({type(e).__name__}: {e}). Without a network, download "
                    f"encodec_24khz-d7cc33bc.th elsewhere and pass data.codec.weights=/path/to/it, "
                    f"or use data.codec.weights=random") from None
            info = {"weights": "pretrained", "seed": None, "checksum": "d7cc33bc"}
        else:
            path = Path(cfg.weights).expanduser()
            if not path.is_file():
                raise CodecError(f"data.codec.weights={cfg.weights!r}: no such file; expected "
                                 f"random, pretrained or the path of an EnCodec 24 kHz checkpoint")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model = EncodecModel.encodec_model_24khz(pretrained=False)
                model.load_state_dict(state)
            except Exception as e:
                raise CodecError(f"data.codec.weights={cfg.weights!r} is not an EnCodec 24 kHz "
                                 f"state dict loadable with weights_only=True: {e}") from None
            info = {"weights": str(path.resolve()), "seed": None, "checksum": _sha256(path)}
    model.eval()
    return Codec(model, info)


@torch.no_grad()
def encode(model: Any, audio: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(B, 1, samples) at 24 kHz -> continuous encoder latents (B, 128, T)."""
    return torch.cat([model.encoder(audio[i: i + chunk]) for i in range(0, len(audio), chunk)])


@torch.no_grad()
def _kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Lloyd's k-means on rows of x (N, D); distances by matmul, not an (N, k, D) tensor."""
    idx = torch.randperm(len(x), generator=g)[:k] if len(x) >= k else torch.randint(len(x), (k,), generator=g)
    means = x[idx].clone()
    for _ in range(iters):
        d = x.pow(2).sum(1, keepdim=True) - 2 * x @ means.T + means.pow(2).sum(1)  # (N, k)
        assign = d.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], means)
    return means, counts


@torch.no_grad()
def calibrate_codebooks(quantizer: Any, latents: torch.Tensor, n_q: int, seed: int,
                        iters: int = 30) -> None:
    """Initialise the first `n_q` RVQ codebooks by k-means on `latents` (B, 128, T), as
    EnCodec's own training-mode forward would, but in O(N k) memory instead of O(N k D)."""
    g = torch.Generator().manual_seed(seed)
    residual = latents.permute(0, 2, 1).reshape(-1, latents.shape[1]).float()  # (B*T, 128)
    for layer in quantizer.vq.layers[:n_q]:
        book = layer._codebook
        means, counts = _kmeans(residual, book.codebook_size, iters, g)
        book.embed.copy_(means)
        book.embed_avg.copy_(means)
        book.cluster_size.copy_(counts.float())
        book.inited.fill_(1.0)
        residual = residual - means[book.quantize(residual)]


def quantizer_state(quantizer: Any, n_q: int) -> dict[str, torch.Tensor]:
    """The calibrated part of the RVQ: enough to compute codes (`CodeBook`) without the codec."""
    return {f"{i}": quantizer.vq.layers[i]._codebook.embed.clone() for i in range(n_q)}


class CodeBook(torch.nn.Module):
    """A standalone residual quantizer built from `quantizer_state`: nearest-codeword codes."""

    def __init__(self, embeds: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("embed", torch.stack([embeds[k] for k in sorted(embeds, key=int)]))

    @torch.no_grad()
    def codes(self, latents: torch.Tensor, n_q: int = 1) -> torch.Tensor:
        """Latents (B, D, T) -> codes (B, T) of the first codebook (or (n_q, B, T))."""
        B, D, T = latents.shape
        x = latents.permute(0, 2, 1).reshape(-1, D).float()  # (B*T, D)
        out = []
        for embed in self.embed[:n_q].to(x.device):
            d = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.T + embed.pow(2).sum(1)
            idx = d.argmin(1)
            out.append(idx.view(B, T))
            x = x - embed[idx]
        return out[0] if n_q == 1 else torch.stack(out)
