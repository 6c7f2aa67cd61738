"""The cascade's data: paired (input, target) EnCodec latents, encoded once and cached on disk.

Two sources: the embedded synthetic pairs (`data=synthetic`, the default) and a folder of your
own recordings (`data=folder data.path=DIR`, read by `stability.workloads.cascade.audio`). A cache entry is keyed
by everything that changes the latents: for synthetic data the generator's seed, the counts and
the clip length; for a folder its path, every paired file's name, size and mtime, the segment
length, the split and what to do with bad files; and for both the codec weights (the file's
sha256 for a checkpoint) and the codebook calibration. The entries themselves (written under a
file lock, checked by digest, listed and cleared by `stab cache`) are `cache.py`'s; its listing
and clearing are handed on from here (`cache_entries`, `clear_cache`, `default_cache_root`).

    check_audio(cfg.data)            # before any work: DataError / CodecError naming the problem
    data = load_latents(cfg.data)   # LatentData: train/val tensors (N, 128, T), scale, codec info

Both start from one `LatentPlan` (the folder's listing, the cache key and entry, the decoded
folder's split): the check makes it and the load that follows in the same process takes it, so
a run does not walk its folder, codec weights and cache key a second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stability.config import DataConfig
from stability.progress import phase
from stability.storage import dumps, loads
from stability.workloads.cascade.audio import (
    DataError,
    FolderPlan,
    Listing,
    ShortData,
    plan_folder,
    read_pair,
    scan_folder,
)
from stability.workloads.cascade.cache import (
    CACHE_FORMAT,
    cache_entries,
    cache_root,
    clear_cache,
    default_cache_root,
    digest,
    entry_or_build,
)
from stability.workloads.cascade.codec import (
    CodeBook,
    calibrate_codebooks,
    check_weights,
    encode,
    load_codec,
    quantizer_state,
    weights_fingerprint,
)
from stability.workloads.cascade.synth import synth_pairs

__all__ = [
    "DataError",
    "LatentData",
    "LatentPlan",
    "cache_entries",
    "check_audio",
    "clear_cache",
    "default_cache_root",
    "fit_split",
    "inspect_latents",
    "load_latents",
    "plan_latents",
]

# The seed's pretrained-EnCodec latent RMS (SPEC §1): input 5.66, target 5.69. `latent_rms=auto`
# brings random-weight latents (two orders of magnitude smaller, ~0.03) to these, each side to
# its own, so stage 0 (residual 1.0 on the input) needs a scale near 1.01 at init, as the seed's did.
SEED_INPUT_RMS = 5.66
SEED_TARGET_RMS = 5.69

log = logging.getLogger("stab.data")


@dataclass
class LatentData:
    """A data set's EnCodec latents, split, centered and scaled for training (shapes below)."""

    train_input: torch.Tensor  # (N, 128, T), centered by `input_center`, rescaled by `input_scale`
    train_target: torch.Tensor  # (N, 128, T), centered by `center`, rescaled by `scale`
    val_input: torch.Tensor
    val_target: torch.Tensor
    scale: float  # target (and model output) latents: factor applied after centering
    center: torch.Tensor  # (1, 128, 1) the target's per-channel offset removed before scaling (zeros if off)
    codebook: CodeBook  # first RVQ codebooks, for the scream check (works on unscaled latents)
    info: dict[str, Any] = field(default_factory=dict)  # source, codec, raw RMS, cache key and hit
    input_scale: float = 1.0  # the input side's own factor (its RMS differs from the target's)
    input_center: torch.Tensor | None = None  # the input's own per-channel offset (None: same as `center`)

    def to_codec(self, latents: torch.Tensor, side: str = "target") -> torch.Tensor:
        """Model space -> the codec's own latent space (undo the scaling and centering).

        latents: (B, 128, T) on any device; returns them on the CPU. `side` is "target" (also
        for model outputs, which live in target space) or "input"."""
        if side == "input":
            center = self.center if self.input_center is None else self.input_center
            return latents.cpu() / self.input_scale + center
        return latents.cpu() / self.scale + self.center


def _folder(cfg: DataConfig) -> str:
    """data=folder's `data.path` (the schema refuses data=folder without one)."""
    assert cfg.path is not None
    return cfg.path


def cache_key(cfg: DataConfig) -> str:
    """Hash of everything that changes the cached latents (not latent_rms: applied on load), the
    folder as it is now (`plan_latents`)."""
    return plan_latents(cfg).key


def _key(cfg: DataConfig, listing: Listing | None) -> str:
    """`cache_key` of the configuration with its folder's `listing` (None: synthetic clips)."""
    blob: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "name": cfg.name,
        "n_train": cfg.n_train,
        "n_val": cfg.n_val,
        "seconds": cfg.seconds,
        "seed": cfg.seed,
        "weights": weights_fingerprint(cfg.codec),
        "codec_seed": cfg.codec.seed,
        "calib": cfg.codec.calib_codebooks,
    }
    if listing is not None:
        blob.update(path=str(listing.root), files=listing.fingerprint(), on_bad_file=cfg.on_bad_file)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# Folders decoded and checked in this process (cache key -> plan): `stab run` and `stab sweep`
# check a configuration more than once, and the key covers every file's size and mtime.
_FOLDERS: dict[str, FolderPlan] = {}


@dataclass
class LatentPlan:
    """What a configuration's latents are made of and where they are cached, found once.

    listing: the data folder's paired files with their sizes and mtimes (None: synthetic clips).
    key: the cache key (the source, the codec weights, the split: `cache_key`).
    path: the cache entry, RUN-independent (`data.cache_dir`/latents/KEY.pt); it may not exist yet.
    """

    cfg: DataConfig
    listing: Listing | None
    key: str
    path: Path

    def folder(self) -> FolderPlan:
        """The folder's usable pairs, every file decoded and checked, and their split into
        training and validation segments (`audio.plan_folder`): once per process and key."""
        assert self.listing is not None, "synthetic clips have no folder plan"
        if self.key not in _FOLDERS:
            if len(_FOLDERS) > 16:
                _FOLDERS.clear()
            c = self.cfg
            _FOLDERS[self.key] = plan_folder(self.listing, c.seconds, c.n_train, c.n_val, c.seed, c.on_bad_file)
        return _FOLDERS[self.key]


def plan_latents(cfg: DataConfig) -> LatentPlan:
    """Scan the folder (names, sizes, mtimes: no decoding) and key the cache; raises DataError
    for a folder that cannot be paired, CodecError for a missing checkpoint file."""
    listing = scan_folder(_folder(cfg)) if cfg.name == "folder" else None
    key = _key(cfg, listing)
    return LatentPlan(cfg, listing, key, cache_root(cfg) / "latents" / f"{key}.pt")


# The plan of the last check of each configuration in this process, taken by the loading that
# follows it (`load_latents`): the run loads what was checked, without walking the folder again.
_CHECKED: dict[DataConfig, LatentPlan] = {}


def check_audio(cfg: DataConfig, need_codec: bool = False) -> None:
    """Everything about the data that can fail, checked before any work starts.

    A folder's files are all decoded and checked unless its latents are cached already (the key
    covers every file's size and mtime, so a cached folder is unchanged since it was checked).
    The codec weights are made available (pretrained: downloaded now, or a fast failure) when the
    latents must be encoded or `need_codec` (listening decodes the output). The plan is kept for
    the `load_latents` that follows in this process. Raises DataError or CodecError.
    """
    plan = plan_latents(cfg)  # a missing checkpoint file fails here
    cached = plan.path.exists()
    if plan.listing is not None and not cached:
        plan.folder()
    if not cached or need_codec:
        check_weights(cfg.codec)
    if len(_CHECKED) > 16:
        _CHECKED.clear()
    _CHECKED[cfg] = plan


def fit_split(cfg: DataConfig) -> tuple[DataConfig, str | None]:
    """For `stab data inspect`: check the data like `check_audio`, but where the folder is too
    short for the configured split, inspect it with a smaller `n_val` (at least one training
    segment) and say by how much the configured split falls short. Returns (config, warning)."""
    try:
        check_audio(cfg)
        return cfg, None
    except ShortData as e:
        if e.have < 2:  # one segment cannot be both a validation and a training set
            raise
        fitted = cfg.replace(n_val=e.have - 1)
        check_audio(fitted)
        return fitted, (
            f"{e}. Inspecting with data.n_val={fitted.n_val} instead; a run with these settings would stop here"
        )


def constant_latents(z: torch.Tensor) -> str | None:
    """Why latents (N, C, T) carry no signal, or None: every channel holds one value over all
    items and frames (to float32 precision), e.g. audio that EnCodec maps to a fixed point. Such
    latents would be rescaled by latent_rms / 0."""
    if z.numel() == 0:
        return None
    level = z.abs().max().item()
    variation = (z - z.mean(dim=(0, 2), keepdim=True)).pow(2).mean().sqrt().item()
    if variation <= 1e-6 * level or level == 0:
        return f"are constant after encoding (variation {variation:.3g} around a level of {level:.3g})"
    return None


def _encode_folder(model: Any, plan: FolderPlan) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode the plan's segments, one file at a time (memory: one file's audio, not the folder's).
    Returns (input, target) latents ordered train then validation, and the seconds spent encoding."""
    wanted = plan.train + plan.val
    slot = {seg: j for j, seg in enumerate(wanted)}
    by_pair: dict[int, list[int]] = {}
    for i, start in wanted:
        by_pair.setdefault(i, []).append(start)
    inp: torch.Tensor | None = None
    target: torch.Tensor | None = None
    encode_s = 0.0
    with phase("encoding latents", total=2 * len(wanted), unit="segments") as p:
        for i in sorted(by_pair):
            x, y = read_pair(plan.pairs[i])
            starts = by_pair[i]
            xs = torch.stack([x[s : s + plan.segment] for s in starts]).unsqueeze(1)  # (k, 1, samples)
            ys = torch.stack([y[s : s + plan.segment] for s in starts]).unsqueeze(1)
            t0 = time.perf_counter()
            zx, zy = encode(model, xs, progress=p), encode(model, ys, progress=p)  # (k, 128, T)
            encode_s += time.perf_counter() - t0
            for side, z, f in (("input", zx, plan.pairs[i].input), ("target", zy, plan.pairs[i].target)):
                why = constant_latents(z)
                if why:
                    raise DataError(
                        f"data.path={str(plan.root)!r}: {f.rel}: its {side} latents {why}; EnCodec "
                        f"sees no signal in it; fix or remove it"
                    )
            if inp is None or target is None:
                inp, target = zx.new_empty(len(wanted), *zx.shape[1:]), zy.new_empty(len(wanted), *zy.shape[1:])
            for k, s in enumerate(starts):
                inp[slot[(i, s)]], target[slot[(i, s)]] = zx[k], zy[k]
    if inp is None or target is None:
        raise DataError(f"data.path={str(plan.root)!r}: no segments to encode")
    return inp, target, encode_s


def _build_entry(plan: LatentPlan) -> dict[str, Any]:
    cfg, listing = plan.cfg, plan.listing
    codec = load_codec(cfg.codec)
    if listing is None:
        assert cfg.n_train is not None  # null (all segments) is for data=folder only: the schema checks it
        clean, degraded = synth_pairs(cfg.n_train + cfg.n_val, cfg.seconds, cfg.seed)
        t0 = time.perf_counter()
        with phase("encoding latents", total=len(clean) + len(degraded), unit="clips") as p:
            target, inp = encode(codec.model, clean, progress=p), encode(codec.model, degraded, progress=p)
        encode_s = time.perf_counter() - t0
        n_train = cfg.n_train
        source = {
            "kind": "synthetic",
            "seed": cfg.seed,
            "segment_seconds": cfg.seconds,
            "segments": {"train": cfg.n_train, "val": cfg.n_val},
        }
    else:
        folder = plan.folder()
        inp, target, encode_s = _encode_folder(codec.model, folder)
        n_train = len(folder.train)
        source = folder.summary()
    for side, z in (("input", inp[:n_train]), ("target", target[:n_train])):
        why = constant_latents(z)
        if why:
            what = f"data.path={str(listing.root)!r}" if listing is not None else f"data={cfg.name}"
            raise DataError(f"{what}: the {side} training latents {why}; nothing to train on")
    quantizer = codec.model.quantizer
    if codec.info["weights"] == "random":
        # Zero codebooks until k-means: every code would be 0 and nothing could look collapsed.
        calibrate_codebooks(quantizer, target[:n_train], cfg.codec.calib_codebooks, cfg.codec.seed)
    tensors = {"input": inp, "target": target}
    tensors.update({f"codebook.{k}": v for k, v in quantizer_state(quantizer, cfg.codec.calib_codebooks).items()})
    meta = {
        "format": CACHE_FORMAT,
        "key": plan.key,
        "source": source,
        "codec": codec.info,
        "n_train": n_train,
        "n_val": len(inp) - n_train,
        "frames": inp.shape[-1],
        "encode_s": encode_s,
        "audio_seconds": 2 * len(inp) * cfg.seconds,
        "created": time.time(),
        "digest": digest(tensors),
    }
    return {"tensors": tensors, "meta": dumps(meta)}


def load_latents(cfg: DataConfig) -> LatentData:
    """Encode (or read from the cache) the configured pairs and rescale them: the pairs the last
    `check_audio` of `cfg` in this process planned, else the folder as it is now."""
    plan = _CHECKED.pop(cfg, None)
    if plan is None:
        plan = plan_latents(cfg)
    key, path = plan.key, plan.path
    entry, hit = entry_or_build(path, lambda: _build_entry(plan))
    meta = loads(entry["meta"])
    skipped = meta["source"].get("skipped") or []
    if hit and skipped:  # the warnings were given when the entry was built; say it again, once
        log.warning(
            "%d bad file(s) skipped in %s (data.on_bad_file=skip): %s",
            len(skipped),
            cfg.path,
            "; ".join(f"{s['file']} {s['reason']}" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else ""),
        )
    t = entry["tensors"]
    inp, target = t["input"], t["target"]
    n = meta["n_train"]
    raw_rms = {"input": inp[:n].pow(2).mean().sqrt().item(), "target": target[:n].pow(2).mean().sqrt().item()}
    random_weights = meta["codec"]["weights"] == "random"
    # A random-init encoder's conv biases put a constant per-channel offset on every frame: measured
    # here, 99.9% of the latents' energy. Rescaling that to RMS 5.69 would make the task "output a
    # constant"; centering removes it so the RMS is carried by the signal, as with trained weights.
    # Input and target are centered and scaled each by its own statistics (training split only):
    # with the target's alone, the degraded input came out at RMS 9.24 instead of 5.66, and stage 0
    # (out = f(x) + 1.0 * input) needed a scale of 0.6, so its clamp sat on 0.7 at every step.
    centered = cfg.latent_center == "on" or (cfg.latent_center == "auto" and random_weights)
    zeros = torch.zeros(1, inp.shape[1], 1)
    center = target[:n].mean(dim=(0, 2), keepdim=True) if centered else zeros
    input_center = inp[:n].mean(dim=(0, 2), keepdim=True) if centered else zeros
    rms = cfg.latent_rms
    if rms == "auto":
        rms = SEED_TARGET_RMS if random_weights else "off"
    goal = {"input": SEED_INPUT_RMS if cfg.latent_rms == "auto" else rms, "target": rms}
    centered_rms = {
        "input": (inp[:n] - input_center).pow(2).mean().sqrt().item(),
        "target": (target[:n] - center).pow(2).mean().sqrt().item(),
    }
    scales = {side: 1.0 if rms == "off" else float(goal[side]) / centered_rms[side] for side in ("input", "target")}
    scale = scales["target"]
    codebook = CodeBook({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("codebook.")})
    inp, target = (inp - input_center) * scales["input"], (target - center) * scale
    info = {
        "source": meta["source"],
        "codec": meta["codec"],
        "raw_rms": raw_rms,
        "centered": centered,
        "offset_rms": center.pow(2).mean().sqrt().item(),
        "latent_rms": rms,
        "scale": scale,
        "input_scale": scales["input"],
        "rms": {"input": inp[:n].pow(2).mean().sqrt().item(), "target": target[:n].pow(2).mean().sqrt().item()},
        "cache": {"key": key, "hit": hit, "path": str(path)},
        "encode_s": meta["encode_s"],
        "audio_seconds": meta["audio_seconds"],
        "frames": inp.shape[-1],
    }
    return LatentData(
        inp[:n],
        target[:n],
        inp[n:],
        target[n:],
        scale,
        center,
        codebook,
        info,
        input_scale=scales["input"],
        input_center=input_center,
    )


# --- stab data inspect ----------------------------------------------------------------------


def code_usage(codes: torch.Tensor, size: int) -> dict[str, Any]:
    """How much of a codebook the codes use: distinct codes and the entropy of their histogram
    (bits; log2(size) if every code were equally used, 0 for one repeated code)."""
    counts = torch.bincount(codes.reshape(-1), minlength=size).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    return {
        "used": int((counts > 0).sum()),
        "size": size,
        "entropy_bits": entropy,
        "max_bits": math.log2(size),
        "perplexity": 2**entropy,
    }


def inspect_latents(cfg: DataConfig) -> dict[str, Any]:
    """What `stab data inspect` prints: the source, latent RMS before and after centering and
    rescaling, and the RVQ code usage of input and target latents (all segments)."""
    data = load_latents(cfg)
    n_q, size = data.codebook.embed.shape[:2]

    def rms(z: torch.Tensor) -> float:
        return z.pow(2).mean().sqrt().item()

    usage: dict[str, list[dict[str, Any]]] = {}
    for side, parts in (
        ("input", (data.train_input, data.val_input)),
        ("target", (data.train_target, data.val_target)),
    ):
        z = data.to_codec(torch.cat(parts), side)  # back to the codec's own space
        codes = torch.cat(
            [data.codebook.codes(z[i : i + 64], n_q=n_q).reshape(n_q, -1) for i in range(0, len(z), 64)], dim=1
        )  # (n_q, frames): chunks bound memory
        usage[side] = [{"codebook": q, **code_usage(codes[q], size)} for q in range(n_q)]
    info = data.info
    return {
        **info,
        "segments": {"train": len(data.train_input), "val": len(data.val_input)},
        "rms": {"raw": info["raw_rms"], "model": {"input": rms(data.train_input), "target": rms(data.train_target)}},
        "codes": usage,
    }
