"""Finite numbers are never reported as non-finite (issue 15, kind 4).

A gradient norm is a sum of squares: float32 gradients of 1e20 are finite, their squares are
not. The probe accumulates in float64, says whether each parameter's gradient is finite from
the per-parameter norms, and the verdict calls a huge finite norm an explosion, not a NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from stability.detectors import verdict
from stability.detectors.series import peak_norm
from stability.instrument import GradProbe
from tests.conftest import SMOKE, only_run, read_json, read_jsonl


def _probe_with(values: list[torch.Tensor]) -> tuple[GradProbe, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    for p, v in zip(params, values):
        p.grad = v.clone()
    mods = []
    for p in params:
        m = torch.nn.Module()
        m.w = p
        mods.append(m)
    return GradProbe({f"g{i}": [m] for i, m in enumerate(mods)}), params


@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38])
def test_huge_finite_gradients_have_a_finite_norm_and_count_as_finite(scale):
    probe, params = _probe_with([torch.full((1000,), scale), torch.full((10, 10), -scale), torch.ones(3)])
    expected = math.sqrt(1100 * scale**2 + 3)
    total, per_group, finite = probe.measure()
    assert per_group.dtype == torch.float64
    if scale < 1e19:  # float32 per-parameter norms hold: the fast path is exact
        assert bool(finite) and total.item() == pytest.approx(expected, rel=1e-6)
    else:  # a float32 per-parameter norm overflowed: inf, and the caller asks for exact norms
        assert math.isinf(total.item())
    total, per_group, finite = probe.measure(exact=True)
    assert bool(finite) and total.item() == pytest.approx(expected, rel=1e-6)
    total, _, finite = probe.measure(exact=True)
    probe.clip_(total, 5.0)  # the clip uses the same safe norm: clipped to 5, not scaled by 5/inf = 0
    clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    assert clipped == pytest.approx(5.0, rel=1e-4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_element_makes_the_step_non_finite(bad):
    g = torch.ones(100)
    g[17] = bad
    probe, _ = _probe_with([g, torch.full((10,), 1e30)])
    _, per_group, finite = probe.measure(exact=True)
    assert not bool(finite)
    assert not math.isfinite(per_group[0].item()) and math.isfinite(per_group[1].item())


def test_peak_norm_and_verdict_tell_a_huge_norm_from_a_nan():
    norms = [2.0, 2.1, 1.9, 3e31, 2.2, 2.0]
    assert peak_norm(norms, 1000.0)[0] == 3
    assert peak_norm([2.0, 2.1, 50.0, 2.0], 1000.0) is None
    peak = {"value": 3e31, "ratio": 1.4e31, "step": 3, "epoch": 1, "batch": 3}
    epochs = [
        {
            "epoch": i + 1,
            "grad_norm_mean": g,
            "grad_norm_max": g,
            "val_loss": 1.0,
            "collapsed": False,
            "clip_rate": 0.1,
            "stage_clamp_rate": [],
        }
        for i, g in enumerate([2.0, 2.0])
    ]

    def diagnose(first_nan):
        return verdict.diagnose(epochs, first_nan, 10.0, 2.0, 3, 2, 0.05, peak=peak)

    found = diagnose(None)
    assert found["verdict"] == "exploding" and "3e+31" in found["evidence"]
    assert "every gradient finite" in found["evidence"] and found["flags"][0]["step"] == 3
    nan = {"kind": "grad", "epoch": 1, "batch": 3, "step": 3, "module": "stage2.output_proj"}
    assert diagnose(nan)["verdict"] == "nan"


@pytest.mark.slow
def test_a_1e30_spike_is_an_explosion_not_a_nan_and_replay_has_nothing_to_replay(cli, tmp_path):
    cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=2", "fault.spike_at_step=3", "fault.spike_factor=1e30")
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["first_nan"] is None and summary["nonfinite_steps"] == 0
    assert summary["verdict"] != "nan"
    assert "grad norm reached" in summary["evidence"] and "every gradient finite" in summary["evidence"]
    step3 = read_jsonl(run / "metrics.jsonl")[3]
    assert step3["finite"] is True and 1e28 < step3["grad/norm"] < 1e38
    assert all(math.isfinite(step3[k]) for k in step3 if k.startswith("grad/") and k != "grad/clipped")
    assert step3["grad/clipped"] is True  # clipped to 10, not multiplied by 10/inf
    explosion = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "grad_explosion"]
    assert explosion and explosion[0]["step"] == 3
    assert not (run / "forensics").exists()
    replay = cli("replay", run, ok=False)
    assert replay.exit_code == 2 and "never went non-finite" in replay.output
