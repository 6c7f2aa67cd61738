"""EnCodec 24 kHz: audio -> continuous latents [B, 128, T] and latents -> RVQ codes.

Weights are `pretrained` (the checkpoint the `encodec` package downloads, in torch.hub's cache;
with no network this fails within seconds, saying how to supply the file), a local checkpoint
path (loaded with `weights_only=True`: a pickle that carries code is refused), or `random` (the
real architecture, seeded). Whatever is used is recorded with a sha256 checksum (of the file, or
of the state dict at init for random weights). A random-init model's RVQ codebooks are zeros
until k-means initialises them, so every code would be 0: `calibrate_codebooks` runs k-means on
the data's own latents first.

    codec = load_codec(CodecConfig(weights="random", seed=0))
    z = encode(codec.model, audio)            # (B, 128, T), 75 frames per second
    calibrate_codebooks(codec.model.quantizer, z, n_q=2, seed=0)
    book = CodeBook(quantizer_state(codec.model.quantizer, n_q=2))
    codes = book.codes(z)                     # (B, T): first-codebook codes
"""

from __future__ import annotations

import hashlib
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stability.config import CodecConfig
from stability.errors import CodecError
from stability.progress import phase

FRAME_RATE = 75  # latent frames per second at 24 kHz (hop 320)
PRETRAINED_HASH = "d7cc33bc"  # the first hex digits of the checkpoint's sha256, checked on download
PRETRAINED_NAME = f"encodec_24khz-{PRETRAINED_HASH}.th"
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + PRETRAINED_NAME
DOWNLOAD_TIMEOUT_S = 10.0  # per connect/read: with no network, fail in seconds, not at the OS's TCP timeout


@dataclass
class Codec:
    """The loaded EnCodec model and what was used (weights, seed, file, its checksum)."""

    model: Any  # encodec.EncodecModel
    info: dict[str, Any]  # what was used: recorded in every run (data.json, summary.json)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FILE_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, remembered per (path, size, mtime): a sweep asks many times."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = _sha256(path)
    return _FILE_SHA[key]


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names and bytes): identifies random-init weights too."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pretrained_file() -> Path:
    """The pretrained checkpoint in torch.hub's cache, downloaded (hash-checked) if it is not there.

    With no network this fails within DOWNLOAD_TIMEOUT_S, saying how to supply the file."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / PRETRAINED_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib's urlopen inside torch.hub has none of its own
    try:
        torch.hub.download_url_to_file(PRETRAINED_URL, str(path), hash_prefix=PRETRAINED_HASH, progress=False)
    except Exception as e:  # no network, DNS failure, timeout, proxy, hash mismatch
        raise CodecError(
            f"data.codec.weights=pretrained: could not download {PRETRAINED_URL} "
            f"({type(e).__name__}: {str(e).strip()}). Without a network, fetch {PRETRAINED_NAME} "
            f"elsewhere and pass data.codec.weights=/path/to/{PRETRAINED_NAME} (or put it in "
            f"{path.parent}/), or use data.codec.weights=random"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    return path


def checkpoint_path(cfg: CodecConfig) -> Path:
    """The checkpoint file `data.codec.weights` names (not random, not pretrained); CodecError if absent."""
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise CodecError(
            f"data.codec.weights={cfg.weights!r}: no such file; expected random, pretrained "
            f"or the path of an EnCodec 24 kHz checkpoint (a state dict saved with torch.save)"
        )
    return path


def weights_fingerprint(cfg: CodecConfig) -> Any:
    """What identifies the weights, for cache keys, without building the model."""
    if cfg.weights == "random":  # the seeded init is torch's: a new torch may draw differently
        return {"random": cfg.seed, "torch": torch.__version__.split("+")[0]}
    if cfg.weights == "pretrained":
        return {"pretrained": PRETRAINED_NAME}
    return {"sha256": file_sha256(checkpoint_path(cfg))}


def _build(seed: int) -> Any:
    """The EnCodec 24 kHz architecture, randomly initialised from `seed`, without touching the
    caller's RNG (the codec may be built in the middle of training, to listen)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses the old weight_norm
        from encodec import EncodecModel

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return EncodecModel.encodec_model_24khz(pretrained=False)


def _read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, read with weights_only=True: tensors and plain containers only,
    so a pickle that carries code (or a whole pickled module) is refused, never run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notes: the error says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CodecError(
            f"{what}: not loadable with torch.load(weights_only=True), so not a plain state dict ({_first_line(e)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(map(str, list(state)[:4])) if isinstance(state, dict) else type(state).__name__
        more = ", ..." if isinstance(state, dict) and len(state) > 4 else ""
        raise CodecError(
            f"{what}: expected an EnCodec 24 kHz state dict (parameter name -> tensor), found {keys}{more}"
        )
    return state


def _load_state(model: Any, path: Path, what: str) -> None:
    state = _read_state(path, what)
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise CodecError(f"{what}: not an EnCodec 24 kHz state dict ({_first_line(e)})") from None


_VERIFIED: set[str] = set()  # sha256 of checkpoint files that loaded in this process


def check_weights(cfg: CodecConfig) -> None:
    """Fail before any work rather than in the middle of a run: the pretrained file is fetched
    (or the download fails fast), a checkpoint file is loaded once per process."""
    if cfg.weights == "pretrained":
        pretrained_file()
    elif cfg.weights != "random":
        path = checkpoint_path(cfg)
        sha = file_sha256(path)
        if sha not in _VERIFIED:
            what = f"data.codec.weights={cfg.weights!r}"
            _read_state(path, what)  # refuses a pickle with code before building anything
            _load_state(_build(0), path, what)
            _VERIFIED.add(sha)


def load_codec(cfg: CodecConfig) -> Codec:
    """Build EnCodec 24 kHz with the configured weights, in eval mode on the CPU."""
    model = _build(cfg.seed)
    if cfg.weights == "random":
        info = {
            "weights": "random",
            "seed": cfg.seed,
            "checksum": state_sha256(model),
            "checksum_of": "state dict at init",
        }
    elif cfg.weights == "pretrained":
        path = pretrained_file()
        _load_state(model, path, f"data.codec.weights=pretrained ({path})")
        info = {
            "weights": "pretrained",
            "seed": None,
            "file": str(path),
            "checksum": file_sha256(path),
            "checksum_of": "file",
        }
    else:
        path = checkpoint_path(cfg)
        _load_state(model, path, f"data.codec.weights={cfg.weights!r}")
        info = {
            "weights": str(path.resolve()),
            "seed": None,
            "file": str(path.resolve()),
            "checksum": file_sha256(path),
            "checksum_of": "file",
        }
    model.eval()
    return Codec(model, info)


@torch.no_grad()
def encode(model: Any, audio: torch.Tensor, chunk: int = 8, progress: Any = None) -> torch.Tensor:
    """(B, 1, samples) at 24 kHz -> continuous encoder latents (B, 128, T); `progress.advance(n)`
    (a `stability.progress.Phase`) after each chunk of n clips."""
    out = []
    for i in range(0, len(audio), chunk):
        out.append(model.encoder(audio[i : i + chunk]))
        if progress is not None:
            progress.advance(len(out[-1]))
    return torch.cat(out)


@torch.no_grad()
def decode(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Continuous latents (B, 128, T) -> audio (B, 1, 320 T) at 24 kHz, by the decoder alone: the
    model's output is continuous, so it is heard as it is, not after the RVQ rounds it to codes."""
    return model.decoder(latents.float().cpu())


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
def calibrate_codebooks(quantizer: Any, latents: torch.Tensor, n_q: int, seed: int, iters: int = 30) -> None:
    """Initialise the first `n_q` RVQ codebooks by k-means on `latents` (B, 128, T), as
    EnCodec's own training-mode forward would, but in O(N k) memory instead of O(N k D)."""
    g = torch.Generator().manual_seed(seed)
    residual = latents.permute(0, 2, 1).reshape(-1, latents.shape[1]).float()  # (B*T, 128)
    with phase("calibrating codebooks (k-means)", total=n_q, unit="codebooks") as p:
        _calibrate(quantizer, residual, n_q, iters, g, p)


def _calibrate(quantizer: Any, residual: torch.Tensor, n_q: int, iters: int, g: torch.Generator, p: Any) -> None:
    for layer in quantizer.vq.layers[:n_q]:
        book = layer._codebook
        means, counts = _kmeans(residual, book.codebook_size, iters, g)
        book.embed.copy_(means)
        book.embed_avg.copy_(means)
        book.cluster_size.copy_(counts.float())
        book.inited.fill_(1.0)
        residual = residual - means[book.quantize(residual)]
        p.advance()


def quantizer_state(quantizer: Any, n_q: int) -> dict[str, torch.Tensor]:
    """The calibrated part of the RVQ: enough to compute codes (`CodeBook`) without the codec."""
    return {f"{i}": quantizer.vq.layers[i]._codebook.embed.clone() for i in range(n_q)}


class CodeBook(torch.nn.Module):
    """A standalone residual quantizer built from `quantizer_state`: nearest-codeword codes."""

    embed: torch.Tensor  # (n_q, codebook size, D) buffer

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


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message`, or the type alone for an empty message (an empty file
    raises EOFError with none)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else f"{type(e).__name__} (empty or truncated file?)"
