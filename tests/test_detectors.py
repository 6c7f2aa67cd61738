"""Detectors on hand-made sequences, and the scream check on a model forced to collapse."""

from __future__ import annotations

import math

import pytest
import torch

from stability.config import RunConfig
from stability.detectors import verdict
from stability.detectors.collapse import loop_share, scream_check, scream_onset, scream_score
from stability.detectors.series import detect_spikes, growth_per_epoch
from stability.record import verdicts as vd
from stability.workloads.cascade.workload import CascadeWorkload


def test_scream_score_of_a_constant_and_a_varied_sequence():
    flat = scream_score([7] * 20)
    assert flat["dominant"] == 1.0 and flat["longest_run"] == 1.0 and flat["seq_rep_4"] == pytest.approx(16 / 17)
    varied = scream_score(list(range(20)))
    assert varied["dominant"] == 0.05 and varied["distinct_4"] == 1.0 and varied["seq_rep_4"] == 0.0
    loop = scream_score([1, 2] * 10)
    assert loop["dominant"] == 0.5 and loop["longest_run"] == 0.05 and loop["distinct_4"] == pytest.approx(2 / 17)


def test_scream_needs_a_degenerate_output_and_a_healthy_target():
    flat, varied = scream_score([3] * 30), scream_score(list(range(30)))
    assert scream_check(flat, varied, 0.6, 0.5)
    assert not scream_check(varied, varied, 0.6, 0.5)
    assert not scream_check(flat, flat, 0.6, 0.5)  # the target itself is flat


def test_scream_onset_is_the_start_of_the_final_collapsed_stretch():
    assert scream_onset([True, False, True, True], [1, 2, 3, 4]) == 3
    assert scream_onset([True, True, False], [1, 2, 3]) is None  # learned its way out
    assert scream_onset([False, True, None], [1, 2, 3]) == 2
    # a scream must last: one collapsed epoch at the end is not enough with min_epochs=2
    assert scream_onset([False, False, True], [1, 2, 3], min_epochs=2) is None
    assert scream_onset([False, True, True], [1, 2, 3], min_epochs=2) == 2


def _epochs(norms, collapsed=None, val=None, clip_rate=0.1, clamp=(0.0,), logits=None):
    n = len(norms)
    return [
        {
            "epoch": i + 1,
            "grad_norm_mean": g,
            "grad_norm_max": 1.5 * g,
            "val_loss": (val or [10.0 / (i + 1) for i in range(n)])[i],
            "collapsed": (collapsed or [False] * n)[i],
            "clip_rate": clip_rate,
            "stage_clamp_rate": list(clamp),
            "health_summary": {"attn_logit_max": (logits or [5.0] * n)[i]},
        }
        for i, g in enumerate(norms)
    ]


def diagnose(epochs, first_nan=None, clip=10.0, init_val=12.0):
    """diagnose with the validation loss at initialisation above every loss `_epochs` makes by default."""
    return verdict.diagnose(
        epochs,
        first_nan,
        clip,
        explode_factor=2.0,
        explode_window=3,
        scream_min_epochs=2,
        learning_rate=0.05,
        init={"val_loss": init_val},
    )


def test_growth_and_verdicts():
    assert growth_per_epoch([2.45, 6.66, 16.71]) == pytest.approx((16.71 / 2.45) ** 0.5)
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
    # collapsed to the end, loss still falling: undertrained or a scream cannot be told apart, so neither a
    # scream nor `stable` (the char LM's smoke preset emits one character after 3 epochs at any lr)
    still = diagnose(_epochs([2.0] * 5, collapsed=[True] * 5, val=[10, 8, 6, 4.5, 3.4]))
    assert still["verdict"] == "inconclusive" and [w["warning"] for w in still["warnings"]][:1] == ["undertrained"]
    assert "undertrained model and a scream look the same" in still["evidence"]
    stalled = diagnose(_epochs([2.0] * 5, collapsed=[True] * 5, val=[10, 8, 7.9, 7.9, 7.95]))
    assert stalled["verdict"] == "scream" and stalled["scream_epoch"] == 1
    learned_then_collapsed = diagnose(
        _epochs([2.0] * 5, collapsed=[False, False, True, True, True], val=[6, 5, 4.9, 4.9, 4.95])
    )
    assert learned_then_collapsed["verdict"] == "scream" and learned_then_collapsed["scream_epoch"] == 3
    # the loss still falls 20% per epoch below its start: the collapse is not called a scream (the loss says otherwise)
    falling = diagnose(_epochs([2.0] * 5, collapsed=[False, False, True, True, True], val=[10, 8, 6, 4.5, 3.4]))
    assert falling["verdict"] == "inconclusive" and "undertrained" in {w["warning"] for w in falling["warnings"]}


def test_warnings_a_stable_run_still_shows():
    names = lambda found: {w["warning"] for w in found["warnings"]}
    quiet = diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.2))
    assert quiet["verdict"] == "stable" and names(quiet) == set()
    assert "clip_never" in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.0)))
    assert "clip_never" not in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=0.0), clip=None))
    assert "clip_always" in names(diagnose(_epochs([2.0, 1.9, 1.8], clip_rate=1.0)))
    assert "clamp_saturated" in names(diagnose(_epochs([2.0, 1.9, 1.8], clamp=(1.0, 0.0, 0.2))))
    # attention: absolute levels, not growth from a tiny start
    assert "attn_logit" in names(diagnose(_epochs([2.0, 1.9, 1.8], logits=[5.0, 60.0, 500.0])))
    assert "attn_logit" not in names(diagnose(_epochs([2.0, 1.9, 1.8], logits=[0.23, 1.0, 2.45])))  # healthy, 10x
    assert "val_not_improving" in names(diagnose(_epochs([2.0, 1.9, 1.8], val=[3.0, 3.2, 3.1])))
    stage = [
        w
        for w in diagnose(_epochs([2.0, 1.9, 1.8], clamp=(1.0, 0.0, 0.2)))["warnings"]
        if w["warning"] == "clamp_saturated"
    ]
    assert [w["stage"] for w in stage] == [0]


def test_spikes_on_hand_made_sequences():
    base = [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    assert detect_spikes(base + [30.0] + base, window=10, z=6, warmup=5) == [20]
    assert detect_spikes(base, window=10, z=6, warmup=5) == []
    assert detect_spikes(base + [math.nan], window=10, z=6, warmup=5) == []


def test_a_model_forced_to_collapse_is_flagged_and_a_copying_model_is_not(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "residual": [0.0, 0.0, 0.0]},
            "data": {"n_train": 8, "n_val": 4, "seconds": 1.0},
        }
    )
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


def _diag(epochs, first_nan=None, init=None, clip=10.0, scream=None, peak=None):
    return verdict.diagnose(epochs, first_nan, clip, 2.0, 3, 2, 0.05, peak=peak, init=init, band=0.1, scream=scream)


def test_a_run_that_ends_above_its_initial_loss_diverged_whatever_its_gradients_did():
    # the char LM at lr 1: gradients bounded, validation loss 26.6 against 4.46 at init
    up = _diag(_epochs([21.4, 30.2, 30.3], val=[28.5, 21.6, 26.6]), init={"val_loss": 4.46})
    assert up["verdict"] == "diverged" and up["loss_ratio"] == pytest.approx(26.6 / 4.46)
    assert "above its validation loss at initialisation 4.46" in up["evidence"]
    assert vd.SEVERITY.index("exploding") < vd.SEVERITY.index("diverged") < vd.SEVERITY.index("scream")
    assert "diverged" in vd.UNSTABLE
    # learning: below its start, stable; without an init evaluation the no-learning baseline is the reference
    assert _diag(_epochs([2.0, 1.9, 1.8], val=[3.0, 2.8, 2.6]), init={"val_loss": 4.46})["verdict"] == "stable"
    base = _diag(_epochs([2.0, 1.9, 1.8], val=[3.0, 3.2, 3.3]), init={"baseline_loss": 3.1, "baseline": "unigram"})
    assert base["verdict"] == "diverged" and "no-learning baseline (unigram)" in base["evidence"]
    # a collapse of a diverged run is not excused as undertraining, and the verdict names the divergence
    both = _diag(_epochs([2.0] * 4, collapsed=[True] * 4, val=[30, 25, 20, 15]), init={"val_loss": 4.46})
    assert both["verdict"] == "diverged" and {f["flag"] for f in both["flags"]} == {"diverged", "scream"}


def test_a_run_too_short_for_the_detectors_is_inconclusive_not_stable():
    one = _diag(_epochs([2.0], val=[3.0]), init={"val_loss": 4.46})
    assert one["verdict"] == "inconclusive" and "too short" in one["evidence"]
    # an unstable finding needs no length: a NaN in epoch 1 is a NaN
    nan = {"epoch": 1, "batch": 3, "step": 3, "module": "layer0.mlp", "kind": "loss"}
    assert _diag(_epochs([math.nan], val=[math.nan]), nan)["verdict"] == "nan"
    # two epochs are enough to judge (the undertrained test uses the loss at init as its first point)
    two = _diag(_epochs([2.0, 1.9], collapsed=[True, True], val=[3.2, 2.6]), init={"val_loss": 4.46})
    assert two["verdict"] == "inconclusive" and "undertrained" in {w["warning"] for w in two["warnings"]}
    assert "over 2 epochs" in _diag(_epochs([2.0, 1.9], val=[3.2, 2.6]), init={"val_loss": 4.46})["evidence"]


def test_values_within_the_band_of_a_threshold_are_borderline():
    near = _diag(_epochs([2.0, 1.9, 1.8], val=[4.5, 4.4, 4.3]), init={"val_loss": 4.46})
    assert near["verdict"] == "stable" and [b["what"] for b in near["borderline"]] == ["final loss"]
    clear = _diag(_epochs([2.0, 1.9, 1.8], val=[3.0, 2.8, 2.6]), init={"val_loss": 4.46})
    assert clear["borderline"] == []
    grow = _diag(_epochs([1.0, 2.05, 4.1]))  # 2.02x per epoch against a factor of 2
    assert grow["verdict"] == "exploding" and [b["what"] for b in grow["borderline"]] == ["grad norm growth"]


def _scored(dominants, target=0.2):
    return [{"dominant": d, "longest_run": 0.1} for d in dominants], {"dominant": target, "longest_run": 0.05}


def test_a_collapse_is_not_erased_by_one_epoch_just_under_the_threshold_nor_by_recovering_at_the_end():
    from stability.config import ScreamConfig

    sc = ScreamConfig()
    # the cascade run: collapsed in epochs 4-11, the last epoch at 0.58 against 0.6
    dominants = [0.3, 0.35, 0.4] + [0.9] * 8 + [0.58]
    scores, target = _scored(dominants)
    eps = _epochs([2.0] * 12, collapsed=[d >= 0.6 for d in dominants], val=[10 - 0.1 * i for i in range(12)])
    for e, s in zip(eps, scores):
        e.update(scores=s, target_scores=target)
    found = _diag(eps, init={"val_loss": 11.0}, scream=sc)
    assert found["verdict"] == "scream" and found["scream_epoch"] == 4 and "to the end" in found["evidence"]
    # its epoch line says `collapsed: false` for epoch 12 (0.58 < 0.6): the verdict says why it still counts
    assert eps[-1]["collapsed"] is False
    assert "epoch 12 at 0.97 of its threshold" in found["evidence"] and "hysteresis" in found["evidence"]
    assert "epoch 11 at" not in found["evidence"]  # past the threshold on its own: nothing to explain
    # without hysteresis the last epoch would end the collapse; it still counts: a collapse need not last to the end
    for e, d in zip(eps, [0.3, 0.35, 0.4] + [0.9] * 8 + [0.2]):
        e["scores"] = {"dominant": d, "longest_run": 0.1}
    recovered = _diag(eps, init={"val_loss": 11.0}, scream=sc)
    assert recovered["verdict"] == "scream" and "to epoch 11" in recovered["evidence"]
    # the default run of the issue: collapsed in epochs 3-6, 8, 9, 11 of 12, dips to 0.55 in between
    pattern = [0.3, 0.4, 0.9, 0.9, 0.9, 0.9, 0.55, 0.9, 0.9, 0.56, 0.9, 0.3]
    for e, d in zip(eps, pattern):
        e["scores"] = {"dominant": d, "longest_run": 0.1}
    gaps = _diag(eps, init={"val_loss": 11.0}, scream=sc)
    assert gaps["verdict"] == "scream" and gaps["scream_epoch"] == 3 and "to epoch 11" in gaps["evidence"]
    # an untrained model's near-constant output that learns its way out is still no scream
    for e, d in zip(eps, [0.9, 0.9, 0.9] + [0.3] * 9):
        e["scores"] = {"dominant": d, "longest_run": 0.1}
    assert _diag(eps, init={"val_loss": 11.0}, scream=sc)["verdict"] == "stable"


def test_repetition_of_any_short_period_is_degenerate_against_the_target():
    from stability.config import ScreamConfig

    sc = ScreamConfig()
    text = [ord(c) for c in "the the the the ale ale ale ale the the the the ale ale ale ale "]
    out = scream_score(text, 4)
    out["loop"] = loop_share(text, sc.loop_period)
    prose = [ord(c) for c in "call me ishmael. some years ago, never mind how long precisely, having little money"]
    target = scream_score(prose, 4)
    target["loop"] = loop_share(prose, sc.loop_period)
    assert out["dominant"] < sc.dominant and out["loop"] < sc.loop  # the old checks pass it
    assert out["seq_rep_4"] > 0.7 and target["seq_rep_4"] < 0.3
    assert scream_check(out, target, sc.dominant, sc.longest_run, sc.loop, sc.seq_rep, sc.n)
    assert not scream_check(target, target, sc.dominant, sc.longest_run, sc.loop, sc.seq_rep, sc.n)
    # a target that repeats like that itself does not make its repetition a collapse
    assert not scream_check(out, out, sc.dominant, sc.longest_run, sc.loop, sc.seq_rep, sc.n)


def test_attention_warnings_fire_on_absolute_levels_and_clip_never_not_on_a_nan_run():
    def names(found):
        return {w["warning"] for w in found["warnings"]}

    eps = _epochs([2.0, 1.9, 1.8], logits=[3e3, 3e3, 3e3])  # the pre-norm run: no growth, huge logits
    for e in eps:
        e["health_summary"]["attn_entropy_min"] = 0.017
    found = _diag(eps)
    assert {"attn_logit", "attn_entropy_collapse"} <= names(found)
    nan = {"epoch": 2, "batch": 0, "step": 5, "module": "layer0.mlp", "kind": "grad"}
    eps = _epochs([2.0, math.nan], clip_rate=0.0)
    eps[1]["grad_norm_max"] = math.nan
    assert "clip_never" not in names(_diag(eps, nan))


def test_a_borderline_value_puts_in_doubt_only_the_verdicts_its_threshold_can_move():
    from stability.record import verdicts as vd

    # a loss that ends within detect.band of where it started: the divergence threshold is near
    near = _diag(_epochs([2.0] * 4, val=[9.0, 9.2, 9.4, 9.6]), init={"val_loss": 10.0})
    (b,) = [b for b in near["borderline"] if b["what"] == "final loss"]
    assert vd.in_doubt(near["verdict"], near["borderline"]) == [b]  # stable or diverged: cannot tell
    assert vd.in_doubt("diverged", [b]) == [b] and vd.in_doubt("scream", [b]) == [b]
    assert vd.in_doubt("nan", [b]) == [] and vd.in_doubt("exploding", [b]) == []  # either outranks diverged
    growth = {"what": "grad norm growth"}
    assert vd.in_doubt("exploding", [growth]) == [growth] and vd.in_doubt("nan", [growth]) == []
    assert vd.in_doubt("stable", [{"what": "something new"}]) == [{"what": "something new"}]  # unknown: doubt
    assert vd.in_doubt("failed", [b]) == []


def test_a_borderline_growth_does_not_put_in_doubt_a_run_unstable_without_it():
    """The newcomer's lr-10 probes: grad norm growth 2.05x per epoch against 2.0 (borderline), and
    a validation loss that ended hundreds of times above its start. `exploding` or `diverged`, the
    run is unstable: the report must count it, not set it aside as borderline."""
    norms = [1.0, 2.05, 2.05**2, 2.05**3]
    blew = _diag(_epochs(norms, val=[40.0, 400.0, 1500.0, 3730.0]), init={"val_loss": 10.0})
    assert blew["verdict"] == "exploding" and {f["flag"] for f in blew["flags"]} >= {"exploding", "diverged"}
    assert [b["what"] for b in blew["borderline"]] == ["grad norm growth"]
    assert vd.in_doubt(blew["verdict"], blew["borderline"]) == blew["borderline"]  # the name may move
    assert vd.in_doubt(blew["verdict"], blew["borderline"], blew["flags"]) == []  # unstable it stays
    # the same growth with a loss that fell: exploding or stable is a toss-up, in doubt
    fell = _diag(_epochs(norms, val=[9.0, 8.0, 7.0, 6.0]), init={"val_loss": 10.0})
    assert fell["verdict"] == "exploding" and "diverged" not in {f["flag"] for f in fell["flags"]}
    assert vd.in_doubt(fell["verdict"], fell["borderline"], fell["flags"]) == fell["borderline"]
    # `stab run` and `stab show` print the doubt under the verdict; none for the run unstable either way
    from cli.common import doubt_lines

    (line,) = doubt_lines(fell)
    assert (
        line.startswith("  borderline: grad norm growth 2.05x per epoch is within 10%")
        and "could go either way" in line
    ), line
    assert doubt_lines(blew) == []


def _collapse_run(val, collapsed, init_val=25.4, init_collapsed=False):
    """diagnose on a run with steady grad norms, the given validation losses and collapsed states."""
    epochs = _epochs([2.0] * len(val), collapsed=collapsed, val=val)
    return verdict.diagnose(
        epochs,
        None,
        10.0,
        explode_factor=2.0,
        explode_window=3,
        scream_min_epochs=2,
        learning_rate=0.05,
        init={"val_loss": init_val, "collapsed": init_collapsed},
    )


def test_a_collapse_the_model_learned_its_way_out_of_while_its_loss_fell_is_not_a_scream():
    # the newcomer's 8-epoch smoke cascade: collapsed in epochs 2-6, recovered in 7-8, the loss falling
    # 10-12% per epoch throughout (24.21 ... 10.40 against 25.43 at init)
    val = [24.21, 22.03, 19.55, 17.22, 15.06, 13.16, 11.64, 10.40]
    collapsed = [False, True, True, True, True, True, False, False]
    d = _collapse_run(val, collapsed, init_val=25.43)
    assert d["verdict"] == "stable" and d["scream_epoch"] is None
    note = next(w for w in d["warnings"] if w["warning"] == "transient_collapse")
    through = 1 - (13.16 / 24.21) ** (1 / 5)  # epoch 1 -> epoch 6
    assert note["epoch"] == 2 and f"{through:.0%} per epoch" in note["message"]
    # the same collapse while the loss stalls is a scream: it is the loss that tells learning from screaming
    stalled = [24.21, 24.0, 23.9, 23.95, 23.8, 23.85, 23.0, 22.5]
    d = _collapse_run(stalled, collapsed, init_val=25.43)
    assert d["verdict"] == "scream" and d["scream_epoch"] == 2 and "to epoch 6" in d["evidence"]
    assert "transient_collapse" not in {w["warning"] for w in d["warnings"]}


def test_a_transient_collapse_falling_near_the_learning_threshold_is_borderline():
    # 24 -> 21.6 over epochs 1-3: 5.1% per epoch, within 10% of detect.scream.learning 5%
    val = [24.0, 22.8, 21.6, 21.0]
    d = _collapse_run(val, [False, True, True, False], init_val=25.0)
    assert d["verdict"] == "stable"
    assert any(b["what"] == "still learning" and b["value"] == pytest.approx(1 - 0.9**0.5) for b in d["borderline"])


def test_an_output_collapsed_from_initialisation_that_never_left_it_is_inconclusive_not_a_scream():
    # the newcomer's 4-class timm ViT: collapsed at init (dominant 1.0), the loss flat at ln 4
    d = _collapse_run([1.383, 1.384], [True, True], init_val=1.462, init_collapsed=True)
    assert d["verdict"] == "inconclusive" and d["scream_epoch"] is None
    assert next(f for f in d["flags"] if f["flag"] == "inconclusive")["reason"] == "never_learned"
    assert "collapsed at initialisation" in d["evidence"] and "1.462" in d["evidence"]
    # collapsed at init and to the end, but the loss fell 28% and stalled (a char LM stuck at its unigram loss,
    # emitting one character): it learned, then stopped with its output collapsed, a scream
    d = _collapse_run([3.3, 3.2, 3.2], [True, True, True], init_val=4.45, init_collapsed=True)
    assert d["verdict"] == "scream" and d["scream_epoch"] == 1
    # collapsed at init but not in the first epochs, collapsing again later with a flat loss: a scream
    d = _collapse_run([1.2, 1.1, 1.1, 1.1], [False, False, True, True], init_val=1.462, init_collapsed=True)
    assert d["verdict"] == "scream" and d["scream_epoch"] == 3


def test_without_validation_data_divergence_is_judged_on_the_training_loss():
    epochs = _epochs([1.0, 2.0, 2.5], val=[math.nan] * 3)
    for e, loss in zip(epochs, [1800.0, 3000.0, 2400.0]):
        e["loss"], e["collapsed"] = loss, None
    kw = {"explode_factor": 2.0, "explode_window": 3, "scream_min_epochs": 2, "learning_rate": 0.05}
    d = verdict.diagnose(epochs, None, 10.0, **kw, first_train_loss=4.17)
    assert d["verdict"] == "diverged" and d["loss_ratio"] == pytest.approx(2400.0 / 4.17)
    assert "training loss" in d["evidence"] and "first step" in d["evidence"]
    assert "no_validation" in {w["warning"] for w in d["warnings"]}
    for e, loss in zip(epochs, [3.0, 2.5, 2.2]):
        e["loss"] = loss
    d = verdict.diagnose(epochs, None, 10.0, **kw, first_train_loss=4.17)
    assert d["verdict"] == "stable" and d["loss_ratio"] == pytest.approx(2.2 / 4.17)
    # no loss at all to start from: said, not silently passed
    d = verdict.diagnose(epochs, None, 10.0, **kw)
    assert "divergence was not judged" in next(w for w in d["warnings"] if w["warning"] == "no_validation")["message"]
