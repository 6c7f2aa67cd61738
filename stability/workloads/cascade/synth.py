"""Procedural, seeded audio pairs: the embedded default data that needs no network and no files.

Each target is a clean "melody": a sequence of harmonic notes of random pitch and length with
decaying envelopes, and now and then a glide. The input is the same signal degraded the way a
restoration model would meet it: band-limited, soft-clipped and buried in noise.
The notes change every 0.1-0.4 s, so the EnCodec codes of a target change over time as well,
which the scream check needs for contrast (a constant target would itself look collapsed).

    clean, degraded = synth_pairs(n=4, seconds=2.0, seed=0)  # each (4, 1, 48000)
"""

from __future__ import annotations

import math

import torch

SAMPLE_RATE = 24_000


def _melody(n_samples: int, g: torch.Generator) -> torch.Tensor:
    t_all = torch.arange(n_samples, dtype=torch.float64) / SAMPLE_RATE
    out = torch.zeros(n_samples, dtype=torch.float64)
    pos = 0
    while pos < n_samples:
        dur = int(SAMPLE_RATE * (0.1 + 0.3 * torch.rand((), generator=g).item()))
        seg = t_all[: min(dur, n_samples - pos)]
        f0 = 110.0 * 2 ** (4 * torch.rand((), generator=g).item())  # A2 .. A6
        glide = 1.0 + (torch.rand((), generator=g).item() - 0.5) * (torch.rand((), generator=g).item() < 0.2)
        freq = f0 * (1 + (glide - 1) * seg / max(seg[-1].item(), 1e-3))
        phase = 2 * math.pi * torch.cumsum(freq, 0) / SAMPLE_RATE
        tilt = 0.3 + 0.6 * torch.rand((), generator=g).item()  # harmonic roll-off
        note = sum(tilt**k * torch.sin((k + 1) * phase) for k in range(5))
        decay = 1.0 + 8.0 * torch.rand((), generator=g).item()
        attack = torch.clamp(seg / 0.005, max=1.0)
        out[pos : pos + len(seg)] = note * attack * torch.exp(-decay * seg)
        pos += dur
    return out / out.abs().max().clamp_min(1e-9)


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    width = 1 + int(torch.randint(2, 12, (), generator=g))  # moving-average low-pass
    kernel = torch.ones(1, 1, width, dtype=x.dtype) / width
    y = torch.nn.functional.conv1d(x.view(1, 1, -1), kernel, padding=width // 2).view(-1)[: x.numel()]
    drive = 1.0 + 4.0 * torch.rand((), generator=g).item()
    y = torch.tanh(drive * y) / math.tanh(drive)  # soft clipping
    snr_db = 5.0 + 15.0 * torch.rand((), generator=g).item()
    noise = torch.randn(x.numel(), generator=g, dtype=x.dtype)
    noise *= y.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
    return y + noise


def synth_pairs(n: int, seconds: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` (clean target, degraded input) pairs at 24 kHz, each shaped (n, 1, samples)."""
    g = torch.Generator().manual_seed(seed)
    n_samples = int(round(seconds * SAMPLE_RATE))
    clean, degraded = [], []
    for _ in range(n):
        c = 0.5 * _melody(n_samples, g)
        clean.append(c)
        degraded.append(_degrade(c, g))
    return (torch.stack(clean).unsqueeze(1).float(), torch.stack(degraded).unsqueeze(1).float())
