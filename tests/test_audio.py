"""Folder datasets, EnCodec weights and listening, on real audio files written here with soundfile.

The folders are tiny (1 s files, 0.4 s segments: 30 latent frames) so a run that encodes and
trains on them for real takes seconds.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stability.config import CodecConfig
from stability.workloads.cascade import audio, codec
from stability.workloads.cascade.audio import SAMPLE_RATE, plan_folder, read_audio, scan_folder
from tests.conftest import SMOKE, only_run, read_json, read_jsonl

SEG = 0.4  # seconds: 9600 samples at 24 kHz = 30 EnCodec frames of 320 samples
FOLDER = ["data=folder", f"data.seconds={SEG}", "data.n_val=2"]


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0, amp: float = 0.4) -> np.ndarray:
    """A tone with a slow tremolo (frames, channels); channel c is scaled by 1 / (c + 1)."""
    t = np.arange(int(round(rate * seconds))) / rate
    x = amp * np.sin(2 * np.pi * freq * t) * (0.75 + 0.25 * np.sin(2 * np.pi * 3 * t))
    return np.stack([x / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def write_pair(
    root: Path, name: str, rate: int, channels: int, ext: str = "wav", seconds: float = 1.0, freq: float = 440.0
) -> None:
    """target = the tone; input = the tone plus noise (what a restoration model would meet)."""
    y = tone(rate, seconds, channels, freq)
    x = y + 0.05 * np.random.default_rng(len(name)).standard_normal(y.shape).astype(np.float32)
    for side, data in (("input", x), ("target", y)):
        (root / side).mkdir(parents=True, exist_ok=True)
        sf.write(root / side / f"{name}.{ext}", data, rate)


def make_folder(root: Path) -> Path:
    """Three 1 s pairs: 44.1 kHz stereo WAV, 16 kHz mono WAV, 48 kHz mono FLAC (2 segments each)."""
    write_pair(root, "a_stereo44k", 44_100, 2, freq=330.0)
    write_pair(root, "b_mono16k", 16_000, 1, freq=440.0)
    write_pair(root, "c_flac48k", 48_000, 1, "flac", freq=550.0)
    return root


# --- reading, resampling, segmenting --------------------------------------------------------


def test_files_are_resampled_to_24k_mono_keeping_their_pitch_and_level(tmp_path):
    write_pair(tmp_path, "s", 44_100, 2, seconds=1.0, freq=440.0)
    write_pair(tmp_path, "m", 16_000, 1, "flac", seconds=0.75, freq=1000.0)
    listing = scan_folder(tmp_path)
    (_, _, t44), (_, _, t16) = sorted(listing.pairs, key=lambda p: p[0] != "s")
    for f, rate, seconds, freq, level in ((t44, 44_100, 1.0, 440.0, 0.75), (t16, 16_000, 0.75, 1000.0, 1.0)):
        x, stats = read_audio(f)
        assert (stats["rate"], stats["channels"]) == (rate, 1 if rate == 16_000 else 2)
        assert x.dtype == torch.float32 and x.ndim == 1
        assert len(x) == int(np.ceil(rate * seconds * SAMPLE_RATE / rate))  # same duration at 24 kHz
        spectrum = np.abs(np.fft.rfft(x.numpy()))
        peak_hz = spectrum.argmax() * SAMPLE_RATE / len(x)
        assert abs(peak_hz - freq) <= SAMPLE_RATE / len(x)  # within one FFT bin
        # stereo is averaged: channels 1 and 1/2 -> 0.75 of the tone's level
        expected_rms = np.sqrt(np.mean(tone(rate, seconds, 1, freq)[:, 0] ** 2)) * level
        assert float(x.pow(2).mean().sqrt()) == pytest.approx(expected_rms, rel=0.02)


def test_segments_cover_every_file_and_the_split_is_seeded(tmp_path):
    for i in range(6):
        write_pair(tmp_path, f"p{i}", 16_000, 1, seconds=1.0 + 0.25 * i)
    listing = scan_folder(tmp_path)
    plan = plan_folder(listing, SEG, n_train=None, n_val=3, seed=0)
    seg = plan.segment
    assert seg == 9600
    expected = {(i, k * seg) for i, p in enumerate(plan.pairs) for k in range(p.samples // seg)}
    assert set(plan.train) | set(plan.val) == expected  # every whole segment, nothing else
    assert not set(plan.train) & set(plan.val) and len(plan.val) == 3
    assert all(start + seg <= plan.pairs[i].samples for i, start in plan.train + plan.val)
    # validation takes whole files where it can: at most one file has segments on both sides
    assert len({i for i, _ in plan.val} & {i for i, _ in plan.train}) <= 1
    again = plan_folder(listing, SEG, n_train=None, n_val=3, seed=0)
    assert (again.train, again.val) == (plan.train, plan.val)
    assert len({tuple(plan_folder(listing, SEG, None, 3, seed=s).val) for s in range(6)}) > 1
    capped = plan_folder(listing, SEG, n_train=4, n_val=3, seed=0)
    assert len(capped.train) == 4 and capped.val == plan.val and set(capped.train) <= set(plan.train)


# --- a real run on a real folder --------------------------------------------------------------


def test_a_folder_trains_listens_and_is_cached(cli, tmp_path, monkeypatch):
    data = make_folder(tmp_path / "pairs")
    cache = tmp_path / "cache"
    args = [*SMOKE, *FOLDER, f"data.path={data}", f"data.cache_dir={cache}"]
    cli("run", "--runs", tmp_path / "r1", *args, "listen.epochs=[1,4]")
    run = only_run(tmp_path / "r1")
    info = read_json(run / "data.json")
    src = info["source"]
    assert src["kind"] == "folder" and src["pairs"] == 3
    assert src["source_rates"] == [16_000, 44_100, 48_000] and src["source_channels"] == [1, 2]
    assert src["segments"] == {"train": 4, "val": 2} and info["frames"] == 30
    assert info["cache"]["hit"] is False
    summary = read_json(run / "summary.json")
    assert summary["verdict"] in ("stable", "inconclusive", "exploding", "scream")
    assert summary["codec"]["weights"] == "random" and len(summary["codec"]["checksum"]) == 64

    # listening: the epochs asked for, each file listed in its epoch's record, 24 kHz, 30 frames long
    epochs = read_jsonl(run / "epochs.jsonl")
    listed = {e["epoch"]: e.get("audio", []) for e in epochs}
    assert listed[2] == [] and listed[3] == []
    assert {
        "audio/epoch1_item0_output.wav",
        "audio/epoch1_item1_output.wav",
        "audio/item0_target.wav",
        "audio/item1_target.wav",
        "audio/item0_input.wav",
    } <= set(listed[1])
    assert set(listed[4]) == {"audio/epoch4_item0_output.wav", "audio/epoch4_item1_output.wav"}
    for rel in listed[1] + listed[4]:
        wav, rate = sf.read(run / rel)
        assert rate == SAMPLE_RATE and wav.shape == (30 * 320,) and np.isfinite(wav).all()
    assert sorted(p.name for p in (run / "audio").iterdir()) == sorted(Path(r).name for r in listed[1] + listed[4])

    # the second run reads the cache: the encoder is not called again
    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr("stability.workloads.cascade.data.encode", no_encoding)
    cli("run", "--runs", tmp_path / "r2", *args)
    run2 = only_run(tmp_path / "r2")
    info2 = read_json(run2 / "data.json")
    assert info2["cache"] == {**info["cache"], "hit": True}
    # listening reads nothing into the training: the same seed gives the same gradient norms
    assert (run2 / "grad_norms.csv").read_text() == (run / "grad_norms.csv").read_text()
    assert not (run2 / "audio").exists()


def test_touching_a_file_or_changing_the_segmenting_encodes_again(tmp_path):
    from stability.config import DataConfig
    from stability.workloads.cascade.data import cache_key

    data = make_folder(tmp_path / "pairs")
    cfg = DataConfig(name="folder", path=str(data), seconds=SEG, n_val=2)
    key = cache_key(cfg)
    assert cache_key(DataConfig(name="folder", path=str(data), seconds=SEG, n_val=2, latent_rms=3.0)) == key
    assert cache_key(DataConfig(name="folder", path=str(data), seconds=0.2, n_val=2)) != key
    assert (
        cache_key(
            DataConfig(name="folder", path=str(data), seconds=SEG, n_val=2, codec={"weights": "random", "seed": 1})
        )
        != key
    )
    f = data / "target" / "b_mono16k.wav"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000_000))
    assert cache_key(cfg) != key


def test_a_load_takes_the_plan_of_the_check_before_it_and_a_later_load_scans_afresh(tmp_path, monkeypatch):
    """`stab run` checks its data, then loads it: the load takes the check's plan (the folder's
    listing, the cache key, the decoded split) instead of scanning and keying the folder again;
    a load with no check before it sees the folder as it is now (a touched file is a new key)."""
    from stability.config import DataConfig
    from stability.workloads.cascade import data as data_mod

    folder = make_folder(tmp_path / "pairs")
    cfg = DataConfig(name="folder", path=str(folder), seconds=SEG, n_val=2, cache_dir=str(tmp_path / "cache"))
    scans: list[str] = []
    real_scan = data_mod.scan_folder
    monkeypatch.setattr(data_mod, "scan_folder", lambda path: scans.append(path) or real_scan(path))
    data_mod.check_audio(cfg)
    first = data_mod.load_latents(cfg)
    assert scans == [str(folder)]  # one scan for the check and the load (two before the plan was handed on)
    assert first.info["cache"]["hit"] is False and len(first.train_input) == 4 and len(first.val_input) == 2
    f = folder / "target" / "b_mono16k.wav"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000_000))
    again = data_mod.load_latents(cfg)
    assert len(scans) == 2 and again.info["cache"]["key"] != first.info["cache"]["key"]
    assert again.info["cache"]["hit"] is False  # the touched folder is encoded again, not read from the entry


# --- bad input: one line, exit 2, before any training ---------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def _bad_float(value: float):
    def mutate(root: Path) -> None:
        x = tone(24_000, 1.0)
        x[5000] = value
        sf.write(root / "input" / "b_mono16k.wav", x, 24_000, subtype="FLOAT")

    return mutate


def _flac_then_truncate(root: Path) -> None:
    write_pair(root, "d_flac", 44_100, 1, "flac", seconds=2.0)
    _truncate(root / "target" / "d_flac.flac")


BAD = {
    "unpaired input": (
        lambda r: write_pair(r, "z", 16_000, 1) or (r / "target" / "z.wav").unlink(),
        "input/z.wav has no partner target/z.*",
    ),
    "unpaired target": (
        lambda r: write_pair(r, "z", 16_000, 1) or (r / "input" / "z.wav").unlink(),
        "target/z.wav has no partner input/z.*",
    ),
    "ambiguous name": (lambda r: write_pair(r, "a_stereo44k", 16_000, 1, "flac"), "is ambiguous"),
    "empty input folder": (lambda r: [p.unlink() for p in (r / "input").iterdir()], "input/ holds no audio files"),
    "no target folder": (lambda r: shutil.rmtree(r / "target"), "there is no target/ folder"),
    "unreadable file": (
        lambda r: (r / "input" / "b_mono16k.wav").write_bytes(b"RIFF not really a wav" * 10),
        "input/b_mono16k.wav cannot be decoded",
    ),
    "truncated wav": (lambda r: _truncate(r / "target" / "a_stereo44k.wav"), "target/a_stereo44k.wav is truncated"),
    "truncated flac": (_flac_then_truncate, "target/d_flac.flac"),
    "nan samples": (_bad_float(float("nan")), "input/b_mono16k.wav contains NaN or inf samples (the first at 0.208 s)"),
    "inf samples": (_bad_float(float("inf")), "input/b_mono16k.wav contains NaN or inf samples"),
    "zero-length file": (
        lambda r: sf.write(r / "target" / "b_mono16k.wav", np.zeros((0, 1), np.float32), 16_000),
        "target/b_mono16k.wav is empty (0 samples)",
    ),
    "silent pair": (
        lambda r: [
            sf.write(r / side / "s.wav", np.zeros((24_000, 2), np.float32), 24_000) for side in ("input", "target")
        ],
        "input/s.wav and target/s.wav are both silent",
    ),
    "lengths differ": (
        lambda r: sf.write(r / "input" / "b_mono16k.wav", tone(16_000, 0.5), 16_000),
        "input/b_mono16k.wav and target/b_mono16k.wav differ in length (0.500 s and 1.000 s)",
    ),
    "shorter than a segment": (
        lambda r: write_pair(r, "short", 22_050, 1, seconds=0.3),
        "are 0.30 s long, shorter than one segment (data.seconds=0.4)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_stops_before_training_naming_the_file(cli, tmp_path, case):
    mutate, message = BAD[case]
    data = make_folder(tmp_path / "pairs")
    mutate(data)
    runs = tmp_path / "runs"
    result = cli("run", "--runs", runs, *SMOKE, *FOLDER, f"data.path={data}", ok=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.path="), result.output
    assert message in lines[0]
    if "truncated" in case:
        assert "truncated" in lines[0]
    if case not in ("empty input folder", "no target folder"):  # per-file problems can be skipped
        assert "data.on_bad_file=skip" in lines[0]
    assert not list(runs.rglob("status.json"))  # nothing started


def test_missing_folder_and_too_few_segments(cli, tmp_path):
    result = cli("run", "--runs", tmp_path, *SMOKE, *FOLDER, f"data.path={tmp_path / 'nope'}", ok=False)
    assert result.exit_code == 2 and "no such folder" in result.output
    data = make_folder(tmp_path / "pairs")
    result = cli(
        "run",
        "--runs",
        tmp_path,
        *SMOKE,
        "data=folder",
        f"data.path={data}",
        "data.seconds=0.4",
        "data.n_val=6",
        ok=False,
    )
    assert result.exit_code == 2
    assert "3 usable pair(s) give 6 segment(s) of data.seconds=0.4, fewer than data.n_val=6" in result.output


def test_bad_files_are_skipped_with_a_warning_when_asked(tmp_path, caplog):
    data = make_folder(tmp_path / "pairs")
    write_pair(data, "d_extra", 16_000, 1)
    (data / "input" / "d_extra.wav").write_bytes(b"garbage" * 100)
    write_pair(data, "e_lonely", 16_000, 1)
    (data / "target" / "e_lonely.wav").unlink()
    (data / "input" / "notes.txt").write_text("not audio")
    (data / "input" / ".DS_Store").write_bytes(b"\0")
    caplog.set_level("WARNING", logger="stab.audio")
    plan = plan_folder(scan_folder(data), SEG, n_train=None, n_val=2, seed=0, on_bad="skip")
    assert [p.name for p in plan.pairs] == ["a_stereo44k", "b_mono16k", "c_flac48k"]
    assert [s["file"] for s in plan.skipped] == ["input/e_lonely.wav", "input/d_extra.wav"]
    warned = [r.getMessage() for r in caplog.records]
    assert (
        warned[0]
        == "skipping input/e_lonely.wav: has no partner target/e_lonely.* to pair with (data.on_bad_file=skip)"
    )
    assert warned[1].startswith("skipping input/d_extra.wav: cannot be decoded")
    assert plan.summary()["ignored"] == ["input/notes.txt"]  # not audio by its suffix; hidden files unseen


# --- stab data inspect --------------------------------------------------------------------------


def test_data_inspect_reports_sizes_rms_and_code_usage(cli, tmp_path):
    from stability.config import DataConfig
    from stability.workloads.cascade.data import inspect_latents

    data = make_folder(tmp_path / "pairs")
    cfg = DataConfig(
        name="folder",
        path=str(data),
        seconds=SEG,
        n_train=16,
        n_val=2,  # as preset=smoke
        cache_dir=str(tmp_path / "cache"),
    )
    info = inspect_latents(cfg)
    assert info["segments"] == {"train": 4, "val": 2} and info["source"]["audio_seconds"] == pytest.approx(3.0)
    assert 0 < info["rms"]["raw"]["target"] < 1  # random-init EnCodec: small latents ...
    assert info["rms"]["model"]["target"] == pytest.approx(5.69, rel=1e-4)  # ... rescaled to the seed's RMS
    for side in ("input", "target"):
        for book in info["codes"][side]:
            assert book["size"] == 1024 and 1 < book["used"] <= 6 * 30
            assert 0 < book["entropy_bits"] <= np.log2(book["used"]) + 1e-9
    result = cli("data", "inspect", *SMOKE, *FOLDER, f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}")
    out = result.output
    assert "3 pairs" in out and "4 train + 2 validation of 0.4 s (30 latent frames each)" in out
    assert "(hit)" in out and "5.69" in out and "/ 1024" in out and "bits" in out


@pytest.fixture(scope="module")
def random_codec() -> codec.Codec:
    return codec.load_codec(CodecConfig(seed=3))


# --- EnCodec weights ------------------------------------------------------------------------------


def test_pretrained_weights_fail_fast_without_a_network(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing cached there

    def no_network(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    result = cli(
        "run",
        "--runs",
        tmp_path / "runs",
        *SMOKE,
        "data.codec.weights=pretrained",
        f"data.cache_dir={tmp_path / 'cache'}",
        ok=False,
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: data.codec.weights=pretrained: could not download") and "\n" not in line
    assert "data.codec.weights=/path/to/encodec_24khz-d7cc33bc.th" in line
    assert socket.getdefaulttimeout() is None  # the download timeout does not leak


def test_a_checkpoint_file_is_loaded_safely_and_recorded_with_its_checksum(cli, tmp_path, random_codec):
    model = random_codec.model
    good = tmp_path / "mine.th"
    torch.save(model.state_dict(), good)
    loaded = codec.load_codec(CodecConfig(weights=str(good)))
    assert loaded.info["checksum"] == codec._sha256(good) and loaded.info["weights"] == str(good.resolve())
    assert codec.state_sha256(loaded.model) == random_codec.info["checksum"]

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.th"
    evil.write_bytes(pickle.dumps({"encoder.weight": Evil()}))
    whole = tmp_path / "whole_model.th"
    torch.save(model, whole)  # a pickled module, not a state dict
    wrong = tmp_path / "wrong.th"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong)
    nested = tmp_path / "nested.th"
    torch.save({"model": model.state_dict(), "epoch": 3}, nested)
    for path, why in (
        (evil, "weights_only=True"),
        (whole, "weights_only=True"),
        (wrong, "not an EnCodec 24 kHz state dict"),
        (nested, "expected an EnCodec 24 kHz state dict"),
    ):
        result = cli(
            "run",
            "--runs",
            tmp_path / "runs",
            *SMOKE,
            f"data.codec.weights={path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            ok=False,
        )
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: data.codec.weights={str(path)!r}") and why in result.output
    assert not marker.exists()  # the pickle's code never ran
    result = cli("run", "--runs", tmp_path / "runs", *SMOKE, f"data.codec.weights={tmp_path / 'none.th'}", ok=False)
    assert result.exit_code == 2 and "no such file" in result.output


def test_listen_epochs_must_be_epochs_of_the_run(cli, tmp_path):
    result = cli("run", "--runs", tmp_path, *SMOKE, "listen.epochs=[2,9]", ok=False)
    assert result.exit_code == 2
    assert "listen.epochs=[2, 9] is not allowed: expected epochs between 1 and train.epochs=4" in result.output


def test_write_listening_skips_non_finite_outputs(tmp_path, random_codec):
    model = random_codec.model
    z = torch.zeros(2, 128, 5)
    z[1, 0, 0] = float("nan")
    out = audio.write_listening(model, tmp_path, 7, z, {"target": torch.zeros(2, 128, 5)})
    assert out["audio"] == ["audio/epoch7_item0_output.wav", "audio/item0_target.wav", "audio/item1_target.wav"]
    assert out["audio_nonfinite"] == [1]
    wav, rate = sf.read(tmp_path / "audio" / "epoch7_item0_output.wav")
    assert rate == 24_000 and len(wav) == 5 * 320


# --- folders as people keep them (issue 29) ------------------------------------------------------


def test_a_linked_speaker_folder_is_followed_and_said_where_it_leads(tmp_path, caplog):
    data = make_folder(tmp_path / "pairs")
    elsewhere = tmp_path / "other_disk" / "speaker2"
    write_pair(elsewhere, "s1", 16_000, 1)
    for side in ("input", "target"):
        os.symlink(elsewhere / side, data / side / "speaker2")
    caplog.set_level("WARNING", logger="stab.audio")
    plan = plan_folder(scan_folder(data), SEG, n_train=None, n_val=2, seed=0)
    assert [p.name for p in plan.pairs] == ["a_stereo44k", "b_mono16k", "c_flac48k", "speaker2/s1"]
    linked = next(p for p in plan.pairs if p.name == "speaker2/s1")
    assert linked.samples == SAMPLE_RATE and linked.input.path.resolve().parent == elsewhere / "input"
    said = [r.getMessage() for r in caplog.records]
    assert f"input/speaker2 is a link to {elsewhere / 'input'}: its files are read from there" in said


def test_a_link_loop_or_a_link_to_nothing_is_named(tmp_path):
    data = make_folder(tmp_path / "pairs")
    os.symlink(data / "input", data / "input" / "again")
    with pytest.raises(audio.DataError, match=r"input/again is a link to .*pairs/input, a folder read already"):
        scan_folder(data)
    (data / "input" / "again").unlink()
    os.symlink(tmp_path / "gone.wav", data / "input" / "d.wav")
    listing = scan_folder(data)
    assert ("input/d.wav", f"is a link to {tmp_path / 'gone.wav'}, which does not exist") in listing.bad


def test_float_audio_beyond_full_scale_is_warned_with_file_and_peak(tmp_path, caplog):
    data = make_folder(tmp_path / "pairs")
    loud = tone(24_000, 1.0) * 5.0  # peak about 2.0: only a float file can hold it
    sf.write(data / "target" / "b_mono16k.wav", loud, 24_000, subtype="FLOAT")
    sf.write(data / "input" / "b_mono16k.wav", tone(24_000, 1.0), 24_000, subtype="FLOAT")
    caplog.set_level("WARNING", logger="stab.audio")
    plan = plan_folder(scan_folder(data), SEG, n_train=None, n_val=2, seed=0)
    peak = float(np.abs(loud).max())
    (said,) = [r.getMessage() for r in caplog.records if "full scale" in r.getMessage()]
    assert said.startswith(f"target/b_mono16k.wav holds float samples beyond full scale: peak {peak:.4g} (+")
    assert plan.summary()["over_full_scale"] == {"target/b_mono16k.wav": pytest.approx(peak)}


def test_a_file_name_that_is_not_utf8_is_named_by_its_bytes_and_read(cli, tmp_path):
    data = make_folder(tmp_path / "pairs")
    for side in ("input", "target"):
        sf.write(os.fsencode(data / side) + b"/caf\xe9.wav", tone(24_000, 1.0), 24_000)
    plan = plan_folder(scan_folder(data), SEG, n_train=None, n_val=2, seed=0)
    assert "b'caf\\xe9'" in [p.name for p in plan.pairs]  # decoded and paired, not "cannot be decoded"
    os.remove(os.fsencode(data / "target") + b"/caf\xe9.wav")
    result = cli("data", "inspect", *SMOKE, *FOLDER, f"data.path={data}", ok=False)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "b'input/caf\\xe9.wav' has no partner target/b'caf\\xe9'.* to pair with" in line, line
