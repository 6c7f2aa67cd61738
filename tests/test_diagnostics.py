"""Diagnostics: spikes before the NaN, replay of the first non-finite step, attention health,
and the gradient profile at initialisation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from stability import health
from stability.config import RunConfig
from stability.probe import init_profile
from tests.conftest import SMOKE, only_run, read_json, read_jsonl

T = 16


def test_attention_stats_on_hand_built_maps():
    uniform = health.attention_stats(torch.zeros(1, 1, T, T))
    assert uniform["attn_entropy"] == pytest.approx(math.log(T), rel=1e-5)
    assert uniform["sink"] == pytest.approx(1 / T)
    one_hot = torch.full((1, 1, T, T), -1e4)
    one_hot[..., 5] = 0.0  # every query attends to key 5 only
    s = health.attention_stats(one_hot)
    assert s["attn_entropy"] == pytest.approx(0.0, abs=1e-6) and s["sink"] == pytest.approx(0.0, abs=1e-6)
    sink = torch.full((1, 2, T, T), -1e4)
    sink[..., 0] = 0.0  # all mass on position 0
    s = health.attention_stats(sink)
    assert s["sink"] == pytest.approx(1.0) and s["attn_logit_max"] == 0.0


def test_massive_activation_and_gradient_sink_ratios():
    h = torch.ones(2, 8, 4)
    h[0, 3, 1] = 100.0
    assert health.massive_ratio(h) == pytest.approx(100.0)
    g = torch.ones(1, 5, 4)
    g[0, 0] *= 3.0
    assert health.grad_sink_ratio(g) == pytest.approx(3.0)


def test_health_is_recorded_per_layer_each_epoch(cli, tmp_path):
    cli("run", "--runs", tmp_path, *SMOKE)
    epochs = read_jsonl(only_run(tmp_path) / "epochs.jsonl")
    for e in epochs:
        layers = e["health"]
        assert set(layers) == {f"stage{i}.layer{j}" for i in range(3) for j in range(2)}
        for v in layers.values():
            assert 0.0 <= v["attn_entropy"] <= math.log(75) + 1e-6  # 1 s clips: 75 frames
            assert 0.0 < v["sink"] < 1.0 and v["massive"] >= 1.0 and v["grad_sink"] > 0
        assert e["health_summary"]["sink_layers"] >= 0


def test_an_injected_spike_is_found_and_counted_before_the_nan(cli, tmp_path):
    cli(
        "run",
        "--runs",
        tmp_path,
        *SMOKE,
        "detect.spike_warmup=4",
        "fault.spike_at_step=8",
        "fault.spike_factor=1000",
        "fault.nan_at_step=12",
        "clip=none",
    )
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["first_spike_step"] == 8
    assert summary["first_nan"]["step"] == 12 and summary["spike_lead_steps"] == 4
    spikes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "grad_spike"]
    assert spikes[0]["step"] == 8


def test_replay_names_the_injected_module_and_calls_it_numerical(cli, tmp_path):
    cli("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=5", "fault.nan_module=stage1.layer1.attn")
    run = only_run(tmp_path)
    assert (run / "forensics" / "state.pt").exists()
    result = cli("replay", run)
    out = " ".join(result.output.split())
    assert "stages.1.stack.layers.1.attn (group stage1.layer1.attn, in the forward pass)" in out
    assert "numerical" in out  # the injected hook fires on any batch
    missing = cli("replay", tmp_path, ok=False)
    assert missing.exit_code == 2


def test_init_probe_on_a_six_layer_model():
    cfg = RunConfig.from_dict(
        {
            "model": {"d_model": 32, "n_heads": 2, "n_layers": 6, "init_std": 0},
            "data": {"n_train": 8, "n_val": 4, "seconds": 1.0},
            "train": {"batch_size": 4},
        }
    )
    rows = {}
    for norm in ("pre", "post"):
        rows[norm] = pd.DataFrame(
            init_profile(cfg.replace(model=cfg.model.replace(norm=norm)), k=2, device=torch.device("cpu"))
        )
        assert list(rows[norm].groupby("stage").size()) == [6, 6, 6]
        assert (rows[norm]["grad_fro"] > 0).all() and rows[norm]["grad_fro"].map(math.isfinite).all()
    # the two placements give different gradients for the same init
    assert not rows["pre"]["grad_fro"].equals(rows["post"]["grad_fro"])


def test_probe_cli_writes_table_csv_and_plot(cli, tmp_path):
    result = cli("probe", "init", "--depths", "2,3", "--batches", "1", "--out", tmp_path, *SMOKE)
    assert "last / first" in result.output
    df = pd.read_csv(tmp_path / "probe_init.csv")
    assert set(df["depth"]) == {2, 3} and set(df["norm"]) == {"pre", "post"}
    assert (tmp_path / "probe_init.png").stat().st_size > 5000
    bad = cli("probe", "init", "--depths", "two", ok=False)
    assert bad.exit_code == 2 and "--depths 'two' is not allowed" in bad.output


@pytest.mark.slow
def test_char_lm_probe_in_the_papers_setting_post_norm_grows_with_depth_pre_norm_stays_flat(cli, tmp_path):
    # Xiong et al. 2020 (arXiv 2002.04745), Fig. 3: with Xavier init and unit-scale embeddings the
    # FFN-output gradient of a post-norm stack grows towards the last layer; a pre-norm stack's stays flat.
    cli("probe", "init", "model=charlm", "--paper", "--depths", "12", "--batches", "2", "--out", tmp_path)
    df = pd.read_csv(tmp_path / "probe_init.csv")
    assert set(df["stage"].fillna("")) == {""} and sorted(set(df["layer"])) == list(range(12))
    ratio = {n: part["grad_fro"].iloc[-1] / part["grad_fro"].iloc[0] for n, part in df.groupby("norm")}
    assert ratio["post"] > 1.3 and 0.5 < ratio["pre"] < 1.2 and ratio["post"] > 1.5 * ratio["pre"]


def test_nonfinite_values_are_strict_json_and_keep_their_kind(cli, tmp_path):
    import json

    from stability.storage import dumps, loads

    text = dumps({"a": [math.nan, math.inf, -math.inf, 1.5], "b": {"c": float("nan")}})
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))  # jq / JSON.parse would
    assert strict["a"][:3] == ["NaN", "Infinity", "-Infinity"]
    back = loads(text)
    assert math.isnan(back["a"][0]) and back["a"][1] == math.inf and back["a"][2] == -math.inf and back["a"][3] == 1.5
    assert loads('{"x": NaN, "y": -Infinity}')["y"] == -math.inf  # run folders written before this still read

    cli("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=6")
    run = only_run(tmp_path)
    for path in [*run.glob("*.json"), *run.glob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            if line.strip():
                json.loads(line, parse_constant=lambda name: pytest.fail(f"{path.name}: bare {name}"))
    summary = read_json(run / "summary.json")
    assert summary["verdict"] == "nan" and math.isnan(summary["grad_norm_by_epoch"][-1])
