"""Data that cannot carry a signal is refused, checked on what the model is fed (issue 15, kind 2).

Audio is checked after the downmix to mono and the resampling to 24 kHz, text after decoding
(and the data.max_chars cut), latents after encoding. Each refusal is one line naming the file;
under data.on_bad_file=skip a bad audio file is skipped with a warning instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stability.config import DataConfig
from stability.errors import DataError
from stability.workloads.cascade import data as data_mod
from tests.conftest import SMOKE
from tests.test_audio import FOLDER, make_folder, tone, write_pair


def _inverted_stereo(root: Path) -> None:
    write_pair(root, "x", 44_100, 1)
    for side in ("input", "target"):
        left = sf.read(root / side / "x.wav", dtype="float32")[0]
        sf.write(root / side / "x.wav", np.stack([left, -left], axis=1), 44_100)


def _above_nyquist(root: Path) -> None:  # a 20 kHz tone at 48 kHz: 24 kHz resampling removes it
    for side in ("input", "target"):
        sf.write(root / side / "x.wav", tone(48_000, 1.0, freq=20_000.0), 48_000)


def _dc(level: float, noise: float = 0.0):
    def make(root: Path) -> None:
        write_pair(root, "x", 16_000, 1)
        x = level + noise * np.random.default_rng(0).standard_normal((16_000, 1))
        sf.write(root / "input" / "x.wav", x.astype(np.float32), 16_000)

    return make


def _silent_target(root: Path) -> None:
    write_pair(root, "x", 16_000, 1)
    sf.write(root / "target" / "x.wav", np.zeros((16_000, 1), np.float32), 16_000)


UNUSABLE = {
    "stereo channels cancel": (
        _inverted_stereo,
        "input/x.wav and target/x.wav are both silent",
        "silent after the downmix to mono",
    ),
    "content above 12 kHz": (_above_nyquist, "are both silent", "silent after resampling from 48000 Hz"),
    "DC only": (_dc(0.5), "input/x.wav is constant: a DC level of -6 dBFS", "no signal"),
    "DC with noise below -80 dB": (_dc(0.5, 1e-6), "input/x.wav is constant", "DC level"),
    "silent target": (_silent_target, "target/x.wav is silent (RMS -inf dBFS", "below -80 dBFS"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_audio_without_signal_as_the_model_sees_it_is_refused_naming_the_file(cli, tmp_path, case):
    make, message, why = UNUSABLE[case]
    root = make_folder(tmp_path / "pairs")
    make(root)
    runs = tmp_path / "runs"
    result = cli("run", "--runs", runs, *SMOKE, *FOLDER, f"data.path={root}", ok=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and why in lines[0], result.output
    assert not list(runs.rglob("status.json"))
    skipped = cli("data", "inspect", *FOLDER, f"data.path={root}", "data.on_bad_file=skip")
    out = " ".join(skipped.output.split())
    assert "warning: skipping" in out and why in out and "3 pairs" in out


TEXT = {
    "NUL bytes": ("\0" * 30_000, "vocabulary of 1 character ('\\x00' x 30000)"),
    "one repeated letter": ("e" * 30_000, "vocabulary of 1 character ('e' x 30000)"),
    "whitespace only": (" \n\t" * 10_000, "holds only whitespace"),
    "mostly control characters": (
        ("\0\1\2\3" * 9 + "some text ") * 1000,
        "is not text: 78% of its characters are control",
    ),
    "one dominant character": (("a" * 97 + "bcd") * 300, "is 97% one character ('a')"),
}


@pytest.mark.parametrize("case", sorted(TEXT))
def test_text_without_anything_to_learn_is_refused_naming_the_file(cli, tmp_path, case):
    text, message = TEXT[case]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    result = cli("run", "--runs", tmp_path / "runs", "model=charlm", *SMOKE, f"data.path={path}", ok=False)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"data.path='{path}'" in lines[0] and message in lines[0], result.output


def test_text_is_checked_after_the_max_chars_cut(cli, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\0" * 5000 + "real words follow here. " * 2000, encoding="utf-8")
    result = cli(
        "run", "--runs", tmp_path / "runs", "model=charlm", *SMOKE, f"data.path={path}", "data.max_chars=4000", ok=False
    )
    assert result.exit_code == 2 and "its first data.max_chars=4000" in result.output


def test_constant_latents_are_refused_before_they_are_cached(monkeypatch, tmp_path):
    assert data_mod.constant_latents(torch.full((4, 128, 30), 0.7)) is not None
    assert data_mod.constant_latents(torch.randn(4, 128, 30) * 1e-3) is None
    per_channel = torch.randn(1, 128, 1).expand(4, 128, 30)  # constant in time and over items
    assert data_mod.constant_latents(per_channel) is not None

    def encode(model, audio, progress=None):  # what a codec that maps every input to one point would give
        return torch.full((audio.shape[0], 128, audio.shape[-1] // 320), 0.25)

    monkeypatch.setattr(data_mod, "encode", encode)
    cfg = DataConfig(n_train=4, n_val=2, seconds=1.0, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="the input training latents are constant after encoding"):
        data_mod.load_latents(cfg)
    assert not list((tmp_path / "latents").glob("*.pt"))
