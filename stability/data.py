"""The cascade's data: paired (input, target) EnCodec latents, encoded once and cached on disk.

The cache entry is keyed by everything that changes the latents (the audio generator and its
seed, clip length and counts, the codec weights and their checksum, the codebook calibration).
It is written to a temporary file and renamed under a file lock, so the jobs of a sweep that
start together encode once and never read a half-written entry; an entry whose checksum does
not match is rebuilt, never trained on.

    data = load_latents(cfg.data)   # LatentData: train/val tensors (N, 128, T), scale, codec info
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from stability.codec import CodeBook, calibrate_codebooks, encode, load_codec, quantizer_state
from stability.config import DataConfig
from stability.synth import synth_pairs

# The seed's pretrained-EnCodec target latent RMS (SPEC §1): the default `latent_rms` for random
# weights, whose latents are two orders of magnitude smaller (~0.03).
SEED_TARGET_RMS = 5.69
CACHE_FORMAT = 1


@dataclass
class LatentData:
    train_input: torch.Tensor  # (N, 128, T), already rescaled by `scale`
    train_target: torch.Tensor
    val_input: torch.Tensor
    val_target: torch.Tensor
    scale: float  # common factor applied to input and target latents (after centering)
    center: torch.Tensor  # (1, 128, 1) per-channel offset removed before scaling (zeros if off)
    codebook: CodeBook  # first RVQ codebooks, for the scream check (works on unscaled latents)
    info: dict[str, Any] = field(default_factory=dict)  # codec, raw RMS, cache key and hit


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("STAB_CACHE", Path.home() / ".cache" / "stab"))


def cache_key(cfg: DataConfig) -> str:
    """Hash of everything that changes the cached latents (not latent_rms: applied on load)."""
    weights = cfg.codec.weights
    if weights not in ("random", "pretrained"):
        p = Path(weights).expanduser()
        st = p.stat() if p.exists() else None
        weights = {"path": str(p.resolve()), "size": st and st.st_size, "mtime": st and st.st_mtime_ns}
    blob = {"format": CACHE_FORMAT, "name": cfg.name, "n_train": cfg.n_train, "n_val": cfg.n_val,
            "seconds": cfg.seconds, "seed": cfg.seed, "weights": weights,
            "codec_seed": cfg.codec.seed, "calib": cfg.codec.calib_codebooks}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_entry(cfg: DataConfig) -> dict[str, Any]:
    codec = load_codec(cfg.codec)
    clean, degraded = synth_pairs(cfg.n_train + cfg.n_val, cfg.seconds, cfg.seed)
    t0 = time.perf_counter()
    target, inp = encode(codec.model, clean), encode(codec.model, degraded)
    encode_s = time.perf_counter() - t0
    quantizer = codec.model.quantizer
    if codec.info["weights"] == "random":
        # Zero codebooks until k-means: every code would be 0 and nothing could look collapsed.
        calibrate_codebooks(quantizer, target[: cfg.n_train], cfg.codec.calib_codebooks, cfg.codec.seed)
    tensors = {"input": inp, "target": target}
    tensors.update({f"codebook.{k}": v for k, v in
                    quantizer_state(quantizer, cfg.codec.calib_codebooks).items()})
    meta = {"codec": codec.info, "encode_s": encode_s, "audio_seconds": 2 * len(clean) * cfg.seconds,
            "digest": _digest(tensors)}
    return {"tensors": tensors, "meta": json.dumps(meta)}


def _load_entry(path: Path) -> dict[str, Any] | None:
    """The cache entry at `path`, or None if it is missing or corrupt."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(entry["meta"])
        if _digest(entry["tensors"]) != meta["digest"]:
            return None
        return entry
    except Exception:  # truncated, not a torch file, wrong structure: rebuild
        return None


def load_latents(cfg: DataConfig) -> LatentData:
    """Encode (or read from the cache) the configured pairs and rescale them."""
    root = cache_root(cfg) / "latents"
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg)
    path = root / f"{key}.pt"
    hit = True
    entry = _load_entry(path)
    if entry is None:
        with FileLock(str(path) + ".lock"):
            entry = _load_entry(path)  # another process may have written it while we waited
            if entry is None:
                hit = False
                entry = _build_entry(cfg)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.save(entry, tmp)
                os.replace(tmp, path)
    meta = json.loads(entry["meta"])
    t = entry["tensors"]
    inp, target = t["input"], t["target"]
    n = cfg.n_train
    raw_rms = {"input": inp[:n].pow(2).mean().sqrt().item(), "target": target[:n].pow(2).mean().sqrt().item()}
    random_weights = meta["codec"]["weights"] == "random"
    # A random-init encoder's conv biases put a constant per-channel offset on every frame: measured
    # here, 99.9% of the latents' energy. Rescaling that to RMS 5.69 would make the task "output a
    # constant"; centering removes it so the RMS is carried by the signal, as with trained weights.
    centered = cfg.latent_center == "on" or (cfg.latent_center == "auto" and random_weights)
    center = target[:n].mean(dim=(0, 2), keepdim=True) if centered else torch.zeros(1, inp.shape[1], 1)
    rms = cfg.latent_rms
    if rms == "auto":
        rms = SEED_TARGET_RMS if random_weights else "off"
    centered_rms = (target[:n] - center).pow(2).mean().sqrt().item()
    scale = 1.0 if rms == "off" else float(rms) / centered_rms
    codebook = CodeBook({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("codebook.")})
    info = {"codec": meta["codec"], "raw_rms": raw_rms, "centered": centered,
            "offset_rms": center.pow(2).mean().sqrt().item(), "latent_rms": rms, "scale": scale,
            "cache": {"key": key, "hit": hit, "path": str(path)}, "encode_s": meta["encode_s"],
            "frames": inp.shape[-1]}
    inp, target = (inp - center) * scale, (target - center) * scale
    return LatentData(inp[:n], target[:n], inp[n:], target[n:], scale, center, codebook, info)
