"""Detectors on hand-made sequences, and the scream check on a model forced to collapse."""

from __future__ import annotations

import math

import pytest
import torch

from stability import detectors
from stability.config import RunConfig
from stability.workload import CascadeWorkload


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


def test_spikes_on_hand_made_sequences():
    base = [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    assert detectors.detect_spikes(base + [30.0] + base, window=10, z=6, warmup=5) == [20]
    assert detectors.detect_spikes(base, window=10, z=6, warmup=5) == []
    assert detectors.detect_spikes(base + [math.nan], window=10, z=6, warmup=5) == []


def test_growth_and_verdicts():
    assert detectors.growth_per_epoch([2.45, 6.66, 16.71]) == pytest.approx((16.71 / 2.45) ** 0.5)
    assert detectors.verdict(None, None, [2.45, 6.66, 16.71], 2.0)[0] == "exploding"
    assert detectors.verdict(None, None, [5.0, 4.0, 3.0], 2.0)[0] == "stable"
    assert detectors.verdict(None, 2, [5.0, 4.0], 2.0)[0] == "scream"
    nan = {"epoch": 3, "batch": 205, "step": 600, "module": "stage2.layer0.mlp", "kind": "loss"}
    v, evidence = detectors.verdict(nan, None, [2.45, 6.66, math.nan], 2.0)
    assert v == "nan" and "epoch 3, batch 205" in evidence


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
