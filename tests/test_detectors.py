"""Detectors on hand-made sequences, and the scream check on a model forced to collapse."""

from __future__ import annotations

import math

import pytest
import torch

from stability import detectors
from stability.config import RunConfig
from stability.workloads.cascade.workload import CascadeWorkload


def test_scream_score_of_a_constant_and_a_varied_sequence():
    flat = detectors.scream_score([7] * 20)
    assert flat["dominant"] == 1.0 and flat["longest_run"] == 1.0 and flat["seq_rep_4"] == pytest.approx(16 / 17)
    varied = detectors.scream_score(list(range(20)))
    assert varied["dominant"] == 0.05 and varied["distinct_4"] == 1.0 and varied["seq_rep_4"] == 0.0
    loop = detectors.scream_score([1, 2] * 10)
    assert loop["dominant"] == 0.5 and loop["longest_run"] == 0.05 and loop["distinct_4"] == pytest.approx(2 / 17)


def test_scream_needs_a_degenerate_output_and_a_healthy_target():
    flat, varied = detectors.scream_score([3] * 30), detectors.scream_score(list(range(30)))
    assert detectors.scream_check(flat, varied, 0.6, 0.5)
    assert not detectors.scream_check(varied, varied, 0.6, 0.5)
    assert not detectors.scream_check(flat, flat, 0.6, 0.5)  # the target itself is flat


def test_scream_onset_is_the_start_of_the_final_collapsed_stretch():
    assert detectors.scream_onset([True, False, True, True], [1, 2, 3, 4]) == 3
    assert detectors.scream_onset([True, True, False], [1, 2, 3]) is None  # learned its way out
    assert detectors.scream_onset([False, True, None], [1, 2, 3]) == 2
    # a scream must last: one collapsed epoch at the end is not enough with min_epochs=2
    assert detectors.scream_onset([False, False, True], [1, 2, 3], min_epochs=2) is None
    assert detectors.scream_onset([False, True, True], [1, 2, 3], min_epochs=2) == 2


def _epochs(norms, collapsed=None, val=None, clip_rate=0.1, clamp=(0.0,), logits=None):
    n = len(norms)
    return [{"epoch": i + 1, "grad_norm_mean": g, "grad_norm_max": 1.5 * g,
             "val_loss": (val or [10.0 / (i + 1) for i in range(n)])[i],
             "collapsed": (collapsed or [False] * n)[i], "clip_rate": clip_rate, "stage_clamp_rate": list(clamp),
             "health_summary": {"attn_logit_max": (logits or [5.0] * n)[i]}} for i, g in enumerate(norms)]


def diagnose(epochs, first_nan=None, clip=10.0):
    return detectors.diagnose(epochs, first_nan, clip, explode_factor=2.0, explode_window=3,
                              scream_min_epochs=2, learning_rate=0.05)


def test_growth_and_verdicts():
    assert detectors.growth_per_epoch([2.45, 6.66, 16.71]) == pytest.approx((16.71 / 2.45) ** 0.5)
    assert diagnose(_epochs([2.45, 6.66, 16.71]))["verdict"] == "exploding"
    assert diagnose(_epochs([5.0, 4.0, 3.0]))["verdict"] == "stable"
    nan = {"epoch": 3, "batch": 205, "step": 600, "module": "stage2.layer0.mlp", "kind": "loss"}
    found = diagnose(_epochs([2.45, 6.66, math.nan]), nan)
    assert found["verdict"] == "nan" and "epoch 3, batch 205" in found["evidence"]
    # every finding is kept: the NaN run also exploded before it
    assert [f["flag"] for f in found["flags"]] == ["nan", "exploding"]


def test_exploding_is_judged_on_a_window_even_when_the_output_also_collapses():
    # the pre-norm trajectory: 2.16x per epoch on average, 2.7x over the first 3 epochs
    norms = [3.16, 11.5, 23.2, 31.8]
    found = diagnose(_epochs(norms, collapsed=[False, True, True, True], val=[9, 8, 8.5, 9]))
    assert found["verdict"] == "exploding" and found["flags"][0]["epoch"] == 1
    assert {f["flag"] for f in found["flags"]} == {"exploding", "scream"}
    # growth that settles: one window over the factor is enough, a bounded wobble is not
    assert diagnose(_epochs([2.0, 2.4, 1.9, 2.6, 2.1, 2.5]))["verdict"] == "stable"
    assert diagnose(_epochs([1.0, 1.2, 1.1, 1.3, 5.0, 30.0]))["flags"][0]["epoch"] == 3


def test_an_undertrained_model_is_not_a_scream_but_a_collapse_that_stays_is():
    still = diagnose(_epochs([2.0] * 5, collapsed=[True] * 5, val=[10, 8, 6, 4.5, 3.4]))
    assert still["verdict"] == "stable" and [w["warning"] for w in still["warnings"]][:1] == ["undertrained"]
    stalled = diagnose(_epochs([2.0] * 5, collapsed=[True] * 5, val=[10, 8, 7.9, 7.9, 7.95]))
    assert stalled["verdict"] == "scream" and stalled["scream_epoch"] == 1
    learned_then_collapsed = diagnose(_epochs([2.0] * 5, collapsed=[False, False, True, True, True]))
    assert learned_then_collapsed["verdict"] == "scream" and learned_then_collapsed["scream_epoch"] == 3


def test_warnings_a_stable_run_still_shows():
    names = lambda found: {w["warning"] for w in found["warnings"]}
    quiet = diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.2))
    assert quiet["verdict"] == "stable" and names(quiet) == set()
    assert "clip_never" in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.0)))
    assert "clip_never" not in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.0), clip=None))
    assert "clip_always" in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=1.0)))
    assert "clamp_saturated" in names(diagnose(_epochs([2.0, 1.9, 1.8], clamp=(1.0, 0.0, 0.2))))
    assert "attn_logit_growth" in names(diagnose(_epochs([2.0, 1.9, 1.8], logits=[5.0, 60.0, 500.0])))
    assert "val_not_improving" in names(diagnose(_epochs([2.0, 1.9, 1.8], val=[3.0, 3.2, 3.1])))
    stage = [w for w in diagnose(_epochs([2.0, 1.9, 1.8], clamp=(1.0, 0.0, 0.2)))["warnings"]
             if w["warning"] == "clamp_saturated"]
    assert [w["stage"] for w in stage] == [0]


def test_spikes_on_hand_made_sequences():
    base = [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    assert detectors.detect_spikes(base + [30.0] + base, window=10, z=6, warmup=5) == [20]
    assert detectors.detect_spikes(base, window=10, z=6, warmup=5) == []
    assert detectors.detect_spikes(base + [math.nan], window=10, z=6, warmup=5) == []


def test_a_model_forced_to_collapse_is_flagged_and_a_copying_model_is_not(tmp_path):
    cfg = RunConfig.from_dict({"model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "residual": [0.0, 0.0, 0.0]},
                               "data": {"n_train": 8, "n_val": 4, "seconds": 1.0}})
    work = CascadeWorkload(cfg, torch.device("cpu"))
    last = work.model.stages[-1]
    with torch.no_grad():  # all-zero output weights and no residual: a constant output
        last.output_proj.weight.zero_()
        last.output_proj.bias.fill_(0.3)
    collapsed = work.evaluate()
    assert collapsed["collapsed"] and collapsed["scores"]["dominant"] == 1.0
    assert collapsed["target_scores"]["dominant"] < 0.6
    with torch.no_grad():  # a stage that passes its input through (residual 1, zero projection)
        last.output_proj.bias.zero_()
        last.residual = 1.0
        work.model.stages[-2].residual = 1.0
        work.model.stages[-2].output_proj.weight.zero_()
        work.model.stages[-2].output_proj.bias.zero_()
        work.model.stages[0].residual = 1.0
        work.model.stages[0].output_proj.weight.zero_()
        work.model.stages[0].output_proj.bias.zero_()
    healthy = work.evaluate()
    assert not healthy["collapsed"] and healthy["scores"]["dominant"] < 0.6
