"""The latent cache: one entry per key, shared by concurrent processes, a corrupt entry rebuilt
(never trained on), and `stab cache ls | clear`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from stability.config import DataConfig
from stability.workloads.cascade.data import load_latents

ROOT = Path(__file__).resolve().parent.parent


def tiny(cache: Path, seed: int = 0) -> DataConfig:
    """Three synthetic 0.4 s clips: an entry in a second or two."""
    return DataConfig(n_train=2, n_val=1, seconds=0.4, seed=seed, cache_dir=str(cache))


def test_a_corrupt_entry_is_rebuilt_never_trained_on(tmp_path):
    cfg = tiny(tmp_path)
    first = load_latents(cfg)
    path = Path(first.info["cache"]["path"])
    assert first.info["cache"]["hit"] is False and path.exists()
    assert load_latents(cfg).info["cache"]["hit"] is True

    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated: a killed writer, a full disk
    again = load_latents(cfg)
    assert again.info["cache"]["hit"] is False
    assert torch.equal(again.train_input, first.train_input) and torch.equal(again.val_target, first.val_target)

    entry = torch.load(path, weights_only=True)  # a readable file whose tensors no longer match
    entry["tensors"]["target"][0, 0, 0] += 1.0
    torch.save(entry, path)
    again = load_latents(cfg)
    assert again.info["cache"]["hit"] is False
    assert torch.equal(again.train_target, first.train_target)
    assert load_latents(cfg).info["cache"]["hit"] is True


WORKER = """
import json, sys, time
from pathlib import Path
from stability.config import DataConfig
from stability.workloads.cascade.data import load_latents
ready, go, cache = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ready.touch()
while not go.exists():
    time.sleep(0.005)
t0 = time.time()
d = load_latents(DataConfig(n_train=2, n_val=1, seconds=0.4, cache_dir=cache))
print(json.dumps({"hit": d.info["cache"]["hit"], "start": t0, "end": time.time(),
                  "sum": float(d.train_input.double().sum())}))
"""


def test_concurrent_processes_encode_once_and_share_the_entry(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"ready{i}"), str(go), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    deadline = time.time() + 600  # both workers ready is the event; 600 s only stops a hang
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):  # both imported torch & co.
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["hit"] for o in outs) == [False, True]  # one encoded, the other waited and read it
    builder, reader = sorted(outs, key=lambda o: o["hit"])
    assert reader["start"] < builder["end"], "the two processes did not overlap"
    assert builder["sum"] == reader["sum"]
    assert [p.suffix for p in sorted((cache / "latents").iterdir()) if not p.name.endswith(".lock")] == [".json", ".pt"]
    assert not list((cache / "latents").glob(".*"))  # no temporary file left behind


def test_cache_ls_and_clear(cli, tmp_path):
    cache = tmp_path / "cache"
    keys = [load_latents(tiny(cache, seed)).info["cache"]["key"] for seed in (0, 1)]
    out = cli("cache", "ls", "--dir", cache).output
    assert "2 latent cache entries" in out
    for key, seed in zip(keys, (0, 1)):
        assert key in out and f"synthetic seed {seed}: 2+1 clips x 0.4 s; EnCodec random" in out

    result = cli("cache", "clear", "--dir", cache, "nosuchkey", ok=False)
    assert result.exit_code == 2 and "no cache entry" in result.output
    result = cli("cache", "clear", "--dir", cache, "--older-than", "soon", ok=False)
    assert result.exit_code == 2 and "--older-than 'soon' is not allowed" in result.output

    assert "removed 0 entries" in cli("cache", "clear", "--dir", cache, "--older-than", "1d").output
    old = cache / "latents" / f"{keys[1]}.pt"
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    assert "removed 1 entry" in cli("cache", "clear", "--dir", cache, "--older-than", "1d").output
    assert not old.exists() and not old.with_suffix(".json").exists()

    lock = FileLock(str(cache / "latents" / f"{keys[0]}.pt") + ".lock")
    with lock:  # another process is writing this entry: leave it alone
        result = cli("cache", "clear", "--dir", cache, keys[0][:6])
        assert "removed 0 entries" in result.output and f"left {keys[0]}" in result.output
    assert "removed 1 entry" in cli("cache", "clear", "--dir", cache, keys[0][:6]).output
    assert "no cache entries" in cli("cache", "ls", "--dir", cache).output
    assert not list((cache / "latents").iterdir())
