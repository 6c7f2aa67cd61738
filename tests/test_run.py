"""`stab run` end to end on the smoke preset: what it computed and what it wrote."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import SMOKE, only_run, read_json, read_jsonl


def test_run_writes_a_complete_self_describing_folder(cli, tmp_path):
    result = cli("run", "--runs", tmp_path, *SMOKE, "norm=pre", "residual=0.3")
    run = only_run(tmp_path)
    for name in (
        "config.yaml",
        "overrides.json",
        "status.json",
        "metrics.jsonl",
        "epochs.jsonl",
        "grad_norms.csv",
        "events.jsonl",
        "summary.json",
        "data.json",
    ):
        assert (run / name).exists(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["norm"] == "pre" and config["model"]["residual"] == [1.0, 1.0, 0.3]
    assert read_json(run / "overrides.json")["overrides"] == ["preset=smoke", "norm=pre", "residual=0.3"]
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["device"] == "cpu"

    summary = read_json(run / "summary.json")
    epochs, batches = config["train"]["epochs"], config["data"]["n_train"] // config["train"]["batch_size"]
    assert summary["verdict"] in ("stable", "inconclusive", "exploding")
    assert summary["first_nan"] is None
    assert summary["scream_epoch"] is None  # trained with pre-norm and residual 0.3: not collapsed
    assert len(summary["grad_norm_by_epoch"]) == epochs
    assert all(math.isfinite(g) and g > 0 for g in summary["grad_norm_by_epoch"])
    assert summary["codec"]["weights"] == "random"
    assert summary["verdict"] in result.output

    steps = read_jsonl(run / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(epochs * batches))
    assert all(s["finite"] for s in steps)
    # the recorded epoch means are the means of the recorded steps
    for e, g in enumerate(summary["grad_norm_by_epoch"], start=1):
        mine = [s["grad/norm"] for s in steps if s["epoch"] == e]
        assert g == pytest.approx(sum(mine) / len(mine), rel=1e-6)
    # the total norm is the root of the sum of squared group norms
    s0 = steps[0]
    group_sq = sum(v**2 for k, v in s0.items() if k.startswith("grad/") and k not in ("grad/norm", "grad/clipped"))
    assert math.sqrt(group_sq) == pytest.approx(s0["grad/norm"], rel=1e-4)

    table = pd.read_csv(run / "grad_norms.csv")  # long: a row per epoch and module group
    assert list(table.columns) == ["epoch", "group", "mean", "max"]
    assert sorted(set(table["epoch"])) == list(range(1, epochs + 1))
    assert {
        "total",
        "stage0.in_proj",
        "stage2.layer1.attn",
        "stage2.layer1.mlp",
        "stage1.layer0.norm",
        "stage2.final_norm",
        "stage2.output_proj",
    } <= set(table["group"])
    total = table[table["group"] == "total"].set_index("epoch")
    assert total.loc[1, "mean"] == pytest.approx(summary["grad_norm_by_epoch"][0], rel=1e-5)
    # the stage-2 RMS arithmetic is recorded every step
    assert {"stage2/rms", "stage2/ratio", "stage2/scale", "stage2/clamped"} <= set(s0)


def test_same_seed_gives_identical_grad_norm_tables(cli, tmp_path):
    cli("run", "--runs", tmp_path / "a", *SMOKE, "seed=3")
    cli("run", "--runs", tmp_path / "b", *SMOKE, "seed=3")
    cli("run", "--runs", tmp_path / "c", *SMOKE, "seed=4")
    a, b, c = ((only_run(tmp_path / x) / "grad_norms.csv").read_text() for x in "abc")
    assert a == b
    assert a != c


def test_injected_nan_is_found_at_its_epoch_batch_and_module(cli, tmp_path):
    # smoke: 16 clips / batch 4 = 4 batches per epoch, so step 6 is epoch 2, batch 2
    cli("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=6", "fault.nan_module=stage1.layer1.mlp")
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["verdict"] == "nan"
    nan = summary["first_nan"]
    assert (nan["epoch"], nan["batch"], nan["step"]) == (2, 2, 6)
    assert nan["module"] == "stage1.layer1.mlp" and nan["where"] == "forward"
    assert math.isnan(summary["grad_norm_by_epoch"][-1])  # shown as NaN, not dropped
    assert summary["stopped_early"] and summary["steps"] == 7
    events = read_jsonl(run / "events.jsonl")
    assert [e for e in events if e["event"] == "first_nan"][0]["step"] == 6


def test_on_nan_skip_keeps_training_after_the_bad_step(cli, tmp_path):
    cli("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=2", "train.on_nan=skip")
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["verdict"] == "nan" and summary["first_nan"]["step"] == 2
    assert summary["nonfinite_steps"] == 1 and not summary["stopped_early"]
    steps = read_jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(s["loss"]) for s in steps if s["step"] != 2)  # the weights stayed finite


@pytest.mark.parametrize(
    "override, message",
    [
        ("norm=sideways", "norm='sideways' is not allowed: expected one of pre, post"),
        ("residual=-1", "residual=-1 is not allowed"),
        ("clip=0", "clip=0 is not allowed"),
        ("clip=abc", "clip='abc' is not allowed: expected none or a positive number"),
        ("nosuchkey=1", "unknown key 'nosuchkey'"),
        ("model.depth=3", "unknown key 'model.depth'"),
        ("preset=huge", "preset='huge' is not allowed with model=cascade: expected one of default, seed, smoke"),
        ("train.epochs=0", "train.epochs=0 is not allowed"),
        ("fault.nan_at_step=1 fault.nan_module=stage9", "fault.nan_module='stage9' is not a module group"),
        pytest.param(
            "train.device=cuda",
            "train.device='cuda': CUDA is not available on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_values_exit_before_training_with_one_line(cli, tmp_path, override, message):
    result = cli("run", "--runs", tmp_path, *SMOKE, *override.split(), ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(tmp_path.rglob("status.json"))  # nothing was started


def test_clip_none_never_clips_and_small_clip_always_does(cli, tmp_path):
    cli("run", "--runs", tmp_path / "none", *SMOKE, "clip=none")
    cli("run", "--runs", tmp_path / "tiny", *SMOKE, "clip=1e-3")
    none = read_jsonl(only_run(tmp_path / "none") / "metrics.jsonl")
    tiny = read_jsonl(only_run(tmp_path / "tiny") / "metrics.jsonl")
    assert not any(s["grad/clipped"] for s in none)
    assert all(s["grad/clipped"] for s in tiny)
