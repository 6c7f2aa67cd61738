"""Folder datasets: paired recordings read with soundfile, made 24 kHz mono, cut into segments.

    DIR/input/NAME.wav   <->   DIR/target/NAME.flac     paired by NAME (subfolders allowed);
                                                         any format libsndfile reads, any rate,
                                                         any channel count

Every file is decoded and checked before anything is encoded or trained: unpaired names, a
missing or empty folder, unreadable or truncated files, NaN or inf samples, empty files, files
that carry no signal, pairs of different lengths and pairs shorter than one segment each raise a
`DataError` naming the file (`on_bad="error"`), or are skipped with a warning (`on_bad="skip"`).
The signal checks look at what the model is fed: the 24 kHz mono signal after the downmix and
the resampling, so a stereo file whose channels cancel, content above 12 kHz that resampling
removes, or a constant (DC) level are caught, not only digital silence.

    listing = scan_folder("pairs")                       # names, sizes, mtimes: no decoding
    plan = plan_folder(listing, seconds=2.0, n_train=None, n_val=8, seed=0, on_bad="error")
    inp, target = read_pair(plan.pairs[0])               # (samples,) each, 24 kHz mono
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from stability.errors import DataError
from stability.progress import phase
from stability.workloads.cascade.codec import decode

SAMPLE_RATE = 24_000  # EnCodec 24 kHz
SILENT_RMS = 1e-4  # -80 dBFS: a file whose 24 kHz mono signal stays below this is silent
LOST = 1e-3  # -60 dB: a downmix or resampling that takes this much off leaves no signal
EDGE_S = 0.01  # seconds at each end of a file that the signal checks leave out (resampling transients)
LENGTH_TOLERANCE_S = 0.01  # input and target may differ by resampling round-off, not by more
# Suffixes of the formats this libsndfile reads (RAW has no header: it cannot be read unaided).
AUDIO_SUFFIXES = frozenset(
    {f".{name.lower()}" for name in sf.available_formats() if name != "RAW"}
    | {".aif", ".aifc", ".oga", ".opus", ".snd", ".sph"}
)

log = logging.getLogger("stab.audio")


class BadFile(Exception):
    """One file or pair is unusable: `what` names it (relative to the data folder)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} {reason}")
        self.what, self.reason = what, reason


class ShortData(DataError):
    """The usable pairs give fewer segments than the split needs (`have` < `need`)."""

    def __init__(self, message: str, have: int, need: int) -> None:
        super().__init__(message)
        self.have, self.need = have, need


@dataclass(frozen=True)
class AudioFile:
    """One audio file of a data folder: where it is, its size (bytes) and mtime (ns)."""

    path: Path  # absolute
    rel: str  # relative to the data folder, e.g. "input/a.wav": what messages name
    size: int
    mtime_ns: int


@dataclass
class Listing:
    """What `scan_folder` found, without decoding anything."""

    root: Path
    pairs: list[tuple[str, AudioFile, AudioFile]]  # (NAME, input, target), sorted by NAME
    bad: list[tuple[str, str]]  # (file, reason): unpaired or ambiguous names, links to nothing
    ignored: list[str]  # files whose suffix is not an audio format
    links: dict[str, str] = field(default_factory=dict)  # followed folder links -> where they lead

    def fingerprint(self) -> list[list[Any]]:
        """Every paired file's name, size and mtime: what the latent cache is keyed by."""
        return [[f.rel, f.size, f.mtime_ns] for _, i, t in self.pairs for f in (i, t)]


@dataclass
class Pair:
    """An input file and its target, checked and decoded to a common length."""

    name: str
    input: AudioFile
    target: AudioFile
    samples: int  # common length at 24 kHz (the longer file is cut to it)
    source: dict[str, Any]  # original rate and channels of each file


@dataclass
class FolderPlan:
    """The usable pairs and which segments of them go to training and validation."""

    root: Path
    seconds: float
    segment: int  # samples per segment at 24 kHz
    pairs: list[Pair]
    train: list[tuple[int, int]]  # (pair index, first sample)
    val: list[tuple[int, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What data.json and `stab data inspect` report about the source."""
        rates = sorted({p.source[k]["rate"] for p in self.pairs for k in ("input", "target")})
        channels = sorted({p.source[k]["channels"] for p in self.pairs for k in ("input", "target")})
        return {
            "kind": "folder",
            "path": str(self.root),
            "pairs": len(self.pairs),
            "audio_seconds": sum(p.samples for p in self.pairs) / SAMPLE_RATE,
            "segment_seconds": self.seconds,
            "segments": {"train": len(self.train), "val": len(self.val)},
            "val_files": sorted({self.pairs[i].name for i, _ in self.val}),
            "source_rates": rates,
            "source_channels": channels,
            "skipped": self.skipped,
            "ignored": self.ignored,
            "over_full_scale": {
                getattr(p, side).rel: p.source[side]["peak"]
                for p in self.pairs
                for side in ("input", "target")
                if "peak" in p.source[side]
            },
        }


def scan_folder(path: str | Path) -> Listing:
    """Pair DIR/input/NAME.* with DIR/target/NAME.*; raises DataError if there is nothing to pair."""
    root = Path(path).expanduser().resolve()
    hint = "expected a folder holding input/NAME.wav and target/NAME.wav (data=folder data.path=DIR)"
    if not root.is_dir():
        raise DataError(f"data.path={str(path)!r}: no such folder; {hint}")
    sides: dict[str, dict[str, list[AudioFile]]] = {}
    ignored: list[str] = []
    links: dict[str, str] = {}  # a followed folder link (relative) -> where it leads
    dangling: list[tuple[str, str]] = []  # (file, reason): links that lead nowhere
    for side in ("input", "target"):
        folder = root / side
        if not folder.is_dir():
            raise DataError(f"data.path={str(path)!r}: there is no {side}/ folder in it; {hint}")
        by_name: dict[str, list[AudioFile]] = {}
        for p in _walk(root, folder, links, dangling):
            rel = display(p.relative_to(root).as_posix())  # what messages name: bytes if not text
            if p.suffix.lower() not in AUDIO_SUFFIXES:
                ignored.append(rel)
                continue
            st = p.stat()
            name = p.relative_to(folder).with_suffix("").as_posix()
            by_name.setdefault(name, []).append(AudioFile(p, rel, st.st_size, st.st_mtime_ns))
        if not by_name:
            others = (
                f" (ignored, not audio: {', '.join(ignored[:3])}{', ...' if len(ignored) > 3 else ''})"
                if ignored
                else ""
            )
            raise DataError(f"data.path={str(path)!r}: {side}/ holds no audio files{others}; {hint}")
        sides[side] = by_name
    bad: list[tuple[str, str]] = list(dangling)
    pairs = []
    inputs, targets = sides["input"], sides["target"]
    for name in sorted(inputs.keys() | targets.keys()):
        files = inputs.get(name, []) + targets.get(name, [])
        if len(inputs.get(name, [])) > 1 or len(targets.get(name, [])) > 1:
            bad.append(
                (files[0].rel, f"is ambiguous: {', '.join(f.rel for f in files)} share the name {display(name)!r}")
            )
        elif name not in targets:
            bad.append((files[0].rel, f"has no partner target/{display(name)}.* to pair with"))
        elif name not in inputs:
            bad.append((files[0].rel, f"has no partner input/{display(name)}.* to pair with"))
        else:
            pairs.append((display(name), inputs[name][0], targets[name][0]))
    for rel, target in links.items():
        log.warning("%s is a link to %s: its files are read from there", display(rel), display(target))
    return Listing(root, pairs, bad, ignored, links)


def display(text: str) -> str:
    """A file name as text: names that are not valid UTF-8 (Python keeps their bytes as lone
    surrogates) are shown by their bytes, `b'caf\\xe9.wav'`, never as the audio's fault."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return repr(os.fsencode(text))


def _walk(root: Path, folder: Path, links: dict[str, str], dangling: list[tuple[str, str]]) -> list[Path]:
    """Every file under `folder`, sorted, following links to folders (a speaker folder kept on
    another disk) and recording where each leads in `links`. Hidden files and folders (.DS_Store,
    .git) are left out. A link back into a folder it is inside of is a loop: DataError. A link
    that leads nowhere goes to `dangling` with why."""
    files: list[Path] = []
    read: set[Path] = set()  # the real folders walked so far
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        read.add(here.resolve())
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            sub = here / d
            if sub.is_symlink():
                target = sub.resolve()
                rel = sub.relative_to(root).as_posix()
                if target in read or target in here.resolve().parents:
                    raise DataError(
                        f"data.path={str(root)!r}: {display(rel)} is a link to {display(str(target))}, "
                        f"a folder read already (a loop, or the same files twice); remove the link"
                    )
                links[rel] = str(target)
        for f in sorted(filenames):
            p = here / f
            if f.startswith("."):
                continue
            if not p.is_file():
                if p.is_symlink():
                    dangling.append(
                        (
                            p.relative_to(root).as_posix(),
                            f"is a link to {display(os.readlink(p))}, which does not exist",
                        )
                    )
                continue
            files.append(p)
    return sorted(files)


def _truncation(info: Any, frames_read: int) -> str | None:
    """Why libsndfile's own log or frame count says the file was cut short, or None."""
    log_text = info.extra_info or ""
    m = re.search(r"^data\s*:\s*(\d+) \(should be (\d+)\)", log_text, re.M)
    # 0 and 0xFFFFFFFF are what streaming writers (ffmpeg or sox to a pipe) leave in the header.
    if m and int(m[1]) > int(m[2]) and int(m[1]) not in (0, 0xFFFFFFFF):
        return f"its header declares {m[1]} bytes of samples, the file holds {m[2]}"
    if "lacks an end-of-stream" in log_text:
        return "its last Ogg page lacks the end-of-stream flag"
    if 0 < frames_read < info.frames:
        return f"it holds {frames_read} of the {info.frames} frames its header declares"
    return None


def read_audio(f: AudioFile) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode one file to 24 kHz mono float32 (samples,), checking it on the way; raises BadFile."""
    try:  # the path as bytes: libsndfile takes any name the file system holds, UTF-8 or not
        info = sf.info(os.fsencode(f.path))
        data, rate = sf.read(os.fsencode(f.path), dtype="float32", always_2d=True)  # (frames, channels)
    except Exception as e:  # libsndfile: unknown format, broken header, decoder lost sync; OSError
        raise BadFile(f.rel, f"cannot be decoded, unreadable or truncated ({str(e).strip()})") from None
    if len(data) == 0:
        raise BadFile(f.rel, "is empty (0 samples)")
    cut = _truncation(info, len(data))
    if cut:
        raise BadFile(f.rel, f"is truncated: {cut}")
    finite = np.isfinite(data)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise BadFile(f.rel, f"contains NaN or inf samples (the first at {first / rate:.3f} s)")
    mono = torch.from_numpy(data).mean(dim=1)  # downmix before resampling: 1 channel to filter
    before = {
        "raw_rms": float(np.sqrt(np.mean(np.square(data, dtype=np.float64)))),
        "mono_rms": _rms(mono),
        "peak": float(np.abs(data).max()),
        "subtype": info.subtype,
    }
    if rate != SAMPLE_RATE:
        mono = AF.resample(mono, int(rate), SAMPLE_RATE)  # windowed-sinc, torchaudio's defaults
    # What the model is fed, measured without the first and last 10 ms, where the resampler's
    # sinc rings at the file's hard edges (a constant level resampled from 16 kHz swings by 5% there).
    edge = int(EDGE_S * SAMPLE_RATE) if len(mono) > 4 * EDGE_S * SAMPLE_RATE else 0
    core = mono[edge : len(mono) - edge]
    stats = {
        "rate": int(rate),
        "channels": int(data.shape[1]),
        **before,
        "rms": _rms(core),
        "level": abs(float(core.double().mean())),
        "ac_rms": _rms(core - core.mean()),
    }
    return mono, stats


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def _db(x: float) -> str:
    return f"{20 * np.log10(x):.0f} dB" if x > 0 else "-inf dB"


def no_signal(stats: dict[str, Any]) -> str | None:
    """Why a decoded file carries no signal as the model sees it (24 kHz mono), or None.

    Silent: RMS below -80 dBFS. Lost in processing: the downmix or the resampling takes more than
    60 dB off (channels that cancel, content above 12 kHz). Constant: a level with variation more
    than 60 dB below it (DC)."""
    raw, mono, rms, ac, level = (stats[k] for k in ("raw_rms", "mono_rms", "rms", "ac_rms", "level"))
    if stats["channels"] > 1 and raw >= SILENT_RMS and mono < LOST * raw:
        return (
            f"is silent after the downmix to mono (RMS {_db(mono)}FS from {_db(raw)}FS per channel: its "
            f"{stats['channels']} channels cancel out, one is the other inverted)"
        )
    if mono >= SILENT_RMS and rms < LOST * mono:
        return (
            f"is silent after resampling from {stats['rate']} Hz to {SAMPLE_RATE} Hz (RMS {_db(rms)}FS from "
            f"{_db(mono)}FS: its content lies above {SAMPLE_RATE // 2} Hz, which 24 kHz cannot hold)"
        )
    if level >= SILENT_RMS and ac < max(SILENT_RMS, LOST * level):
        return f"is constant: a DC level of {_db(level)}FS with variation at {_db(ac)}FS, no signal"
    if ac < SILENT_RMS:
        return f"is silent (RMS {_db(ac)}FS, below {_db(SILENT_RMS)}FS)"
    return None


def _check_pair(name: str, fi: AudioFile, ft: AudioFile, segment: int) -> tuple[Pair, torch.Tensor, torch.Tensor]:
    x, sx = read_audio(fi)
    y, sy = read_audio(ft)
    both = f"{fi.rel} and {ft.rel}"
    if no_signal(sx) and no_signal(sy):
        raise BadFile(
            both, f"are both silent as the model sees them (24 kHz mono): input {no_signal(sx)}, target {no_signal(sy)}"
        )
    for f, stats in ((fi, sx), (ft, sy)):  # one side without signal: nothing to learn from, or to learn
        if why := no_signal(stats):
            raise BadFile(f.rel, why)
    for f, stats in ((fi, sx), (ft, sy)):  # only float files can hold samples beyond full scale
        if stats["peak"] > 1.0:
            log.warning(
                "%s holds %s samples beyond full scale: peak %.4g (%+.1f dBFS); used as they are, while "
                "EnCodec expects [-1, 1]: scale the file down if that is not intended",
                f.rel,
                str(stats["subtype"]).lower(),
                stats["peak"],
                20 * np.log10(stats["peak"]),
            )
    if abs(len(x) - len(y)) > LENGTH_TOLERANCE_S * SAMPLE_RATE:
        raise BadFile(
            both,
            f"differ in length ({len(x) / SAMPLE_RATE:.3f} s and {len(y) / SAMPLE_RATE:.3f} s); "
            f"paired files must be time-aligned",
        )
    n = min(len(x), len(y))
    if n < segment:
        raise BadFile(
            both,
            f"are {n / SAMPLE_RATE:.2f} s long, shorter than one segment "
            f"(data.seconds={segment / SAMPLE_RATE:g}); lower data.seconds",
        )
    source = {
        side: {k: st[k] for k in ("rate", "channels")} | ({"peak": st["peak"]} if st["peak"] > 1.0 else {})
        for side, st in (("input", sx), ("target", sy))
    }
    return Pair(name, fi, ft, n, source), x[:n], y[:n]


def read_pair(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's input and target, 24 kHz mono, cut to their common length."""
    try:
        (x, _), (y, _) = read_audio(pair.input), read_audio(pair.target)
    except BadFile as e:
        raise DataError(f"{e.what} changed since it was checked: it now {e.reason}") from None
    if min(len(x), len(y)) < pair.samples:
        raise DataError(
            f"{pair.input.rel} and {pair.target.rel} changed since they were checked: "
            f"now shorter than {pair.samples / SAMPLE_RATE:.2f} s"
        )
    return x[: pair.samples], y[: pair.samples]


def plan_folder(
    listing: Listing, seconds: float, n_train: int | None, n_val: int, seed: int, on_bad: str = "error"
) -> FolderPlan:
    """Decode and check every pair, then split their segments into training and validation.

    The split is by file where it can be: the pairs are put in a seeded order and their segments
    taken in that order, the first `n_val` for validation, so at most one file has segments on
    both sides. `n_train` (None: all) keeps a seeded subset of the rest.
    """
    root = listing.root
    segment = int(round(seconds * SAMPLE_RATE))
    skipped: list[dict[str, str]] = []

    def reject(what: str, reason: str) -> None:
        if on_bad == "error":
            raise DataError(
                f"data.path={str(root)!r}: {what} {reason}; fix or remove it, or pass "
                f"data.on_bad_file=skip to skip bad files with a warning"
            )
        log.warning("skipping %s: %s (data.on_bad_file=skip)", what, reason)
        skipped.append({"file": what, "reason": reason})

    for what, reason in listing.bad:
        reject(what, reason)
    pairs = []
    with phase("checking audio files", total=len(listing.pairs), unit="pairs") as p:
        for name, fi, ft in listing.pairs:
            try:
                pairs.append(_check_pair(name, fi, ft, segment)[0])
            except BadFile as e:
                reject(e.what, e.reason)
            p.advance()
    total = sum(p.samples // segment for p in pairs)
    if total < n_val + 1:
        short = n_val + 1 - total
        raise ShortData(
            f"data.path={str(root)!r}: {len(pairs)} usable pair(s) give {total} segment(s) of "
            f"data.seconds={seconds:g}, fewer than data.n_val={n_val} for validation plus 1 for "
            f"training: {short} segment(s) short, at least {short * seconds:g} s more audio (in "
            f"files of at least {seconds:g} s); add audio or lower data.seconds or data.n_val"
            + (f" ({len(skipped)} skipped)" if skipped else ""),
            total,
            n_val + 1,
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    segments = [(i, k * segment) for i in order for k in range(pairs[i].samples // segment)]
    val, train = segments[:n_val], segments[n_val:]
    if n_train is not None and n_train < len(train):
        keep = torch.randperm(len(train), generator=g)[:n_train].tolist()
        train = [train[j] for j in keep]
    return FolderPlan(root, seconds, segment, pairs, sorted(train), val, skipped, listing.ignored)


def write_wav(path: Path, audio: torch.Tensor, rate: int = SAMPLE_RATE) -> None:
    """(samples,) or (1, samples) float audio -> a 32-bit float WAV (no clipping, level kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), audio.detach().reshape(-1).cpu().float().numpy(), rate, subtype="FLOAT", format="WAV")
    tmp.replace(path)


def write_listening(
    model: Any, run_dir: Path, epoch: int, output: torch.Tensor, refs: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Decode latents (items, 128, T), in the codec's own space, with EnCodec's decoder and write
    RUN/audio/epoch{E}_item{i}_output.wav; `refs` ({"input": ..., "target": ...}) are written as
    item{i}_{name}.wav. Returns {"audio": [written paths, relative to run_dir]}, plus
    "audio_nonfinite": [items] for outputs that cannot be heard because they hold NaN or inf."""
    nonfinite = [i for i in range(len(output)) if not torch.isfinite(output[i]).all()]
    jobs = [(f"epoch{epoch}_item{{}}_output", output, [i for i in range(len(output)) if i not in nonfinite])]
    jobs += [(f"item{{}}_{name}", latents, list(range(len(latents)))) for name, latents in (refs or {}).items()]
    written: list[str] = []
    for pattern, latents, items in jobs:
        if not items:
            continue
        audio = decode(model, latents[items])  # (items, 1, 320 T)
        for i, wav in zip(items, audio):
            rel = f"audio/{pattern.format(i)}.wav"
            write_wav(run_dir / rel, wav)
            written.append(rel)
    return {"audio": written, **({"audio_nonfinite": nonfinite} if nonfinite else {})}
