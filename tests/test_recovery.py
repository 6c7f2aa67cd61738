"""Recovery policies, signals and rewind in the real training loop: a spike planted at a step
(`fault.spike_at_step`), the char LM's smoke preset for one epoch (about 50 steps)."""

from __future__ import annotations

import math

import pytest
import torch

from cli.config import compose_run
from stability import snapshots
from stability.storage import read_jsonl
from stability.training import run

SPIKE = 30
BASE = [
    "model=charlm",
    "preset=smoke",
    "train.epochs=1",
    "train.threads=1",
    "detect.health=false",
    "detect.opt_state=true",
    f"fault.spike_at_step={SPIKE}",
    "fault.spike_factor=1000",
    "train.spike_window=16",
]


def _train(tmp_path, name, extra):
    folder = tmp_path / name
    run(compose_run([*BASE, *extra]), folder)
    steps, _ = read_jsonl(folder / "metrics.jsonl")
    return folder, steps


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    """on_spike=skip with update clipping and a snapshot every 10 steps."""
    return _train(
        tmp_path_factory.mktemp("skip"),
        "skip",
        ["on_spike=skip", "update_clip=1", "train.snapshot_every=10", "train.snapshot_keep=100"],
    )


def test_skip_and_update_clip_act_at_the_planted_spike(skipped):
    folder, steps = skipped
    by = {r["step"]: r for r in steps}
    assert by[SPIKE]["recover/spike"] == 1.0 and by[SPIKE]["recover/skipped"] == 1.0
    # a 16-step window early in training also fires on the odd ordinary step (a false alarm)
    assert len([s for s, r in by.items() if r["recover/skipped"] and s != SPIKE]) <= 3
    assert all(by[SPIKE][k] == 0.0 for k in by[SPIKE] if k.startswith("update_rel/"))  # no update applied
    assert all(by[SPIKE - 1][k] > 0.0 for k in by[SPIKE - 1] if k.startswith("update_rel/layer"))
    clipped = [r["recover/update_clipped"] for r in steps]
    assert by[SPIKE]["recover/update_clipped"] == max(clipped) > 0.5


def test_signals_are_finite_and_where_the_run_format_says(skipped):
    _, steps = skipped
    groups = [k[5:] for k in steps[0] if k.startswith("grad/") and k not in ("grad/norm", "grad/clipped")]
    for r in steps:
        for stat in ("update_rel", "adam_m", "adam_v", "eps_share"):
            for g in groups:
                assert math.isfinite(r[f"{stat}/{g}"]), (r["step"], stat, g)
        assert all(0.0 <= r[f"eps_share/{g}"] <= 1.0 for g in groups)
        for k in ("lm/log_z", "lm/log_z_max", "lm/attn_logit_max"):
            assert math.isfinite(r[k])
        assert r["lm/log_z_max"] >= r["lm/log_z"]


def test_lr_backoff_acts_at_the_planted_spike(tmp_path):
    _, steps = _train(tmp_path, "backoff", ["on_spike=backoff", "train.backoff_steps=4"])
    by = {r["step"]: r for r in steps}
    assert all(by[s]["recover/lr_scale"] == 1.0 for s in range(10))
    before = by[SPIKE - 1]["recover/lr_scale"]  # 1, or growing back from a false alarm
    assert by[SPIKE]["recover/spike"] == 1.0 and by[SPIKE]["recover/lr_scale"] == pytest.approx(0.5 * before)
    assert by[SPIKE + 1]["recover/lr_scale"] == pytest.approx(0.5 * before * 2**0.25)  # 0.5^(-1/4) a step
    assert max(by[s]["recover/lr_scale"] for s in range(SPIKE + 5, SPIKE + 8)) == pytest.approx(1.0)


def test_rewind_restarts_from_the_snapshot_bitwise(skipped, tmp_path):
    """A run continued from the snapshot before the spike computes the same steps, bit for bit,
    and its snapshots hold the same weights and optimizer state as the original run's."""
    folder, steps = skipped
    snap = snapshots.before(folder, SPIKE)
    assert snap is not None and snap.name == f"step{SPIKE - 10:08d}.pt"
    again, steps2 = _train(
        tmp_path,
        "rewound",
        [
            "on_spike=skip",
            "update_clip=1",
            "train.snapshot_every=10",
            "train.snapshot_keep=100",
            f"train.rewind_from={snap}",
        ],
    )
    assert [r["loss"] for r in steps2] == [r["loss"] for r in steps]
    assert [r["grad/norm"] for r in steps2] == [r["grad/norm"] for r in steps]
    later = [s for s in snapshots.kept(folder) if s > SPIKE]
    assert later and later == [s for s in snapshots.kept(again) if s > SPIKE]
    for s in later:
        a = snapshots.load(folder / "snapshots" / snapshots.snapshot_name(s))
        b = snapshots.load(again / "snapshots" / snapshots.snapshot_name(s))
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        for p, st in a["optimizer"]["state"].items():
            assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][p]["exp_avg_sq"])
    events, _ = read_jsonl(again / "events.jsonl")
    assert any(e["event"] == "rewound" and e["step"] == SPIKE - 10 for e in events)


def test_rewind_from_a_file_that_is_no_snapshot_is_one_line(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"nope")
    from stability.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.rewind_from"):
        run(compose_run([*BASE, f"train.rewind_from={bad}"]), tmp_path / "r")


def test_doctor_try_trains_training_only_fixes_from_the_snapshot_before_the_departure(skipped):
    from cli.doctor_try import rewind_snapshot, rewindable
    from stability import doctor as dr

    folder, _ = skipped
    rec = dr.read_run(folder)
    dx = dr.Diagnosis(rec, "exploding", [dr.Finding("grad_departure", "planted", step=SPIKE)], [])
    assert rewind_snapshot(dx) == (folder / "snapshots" / snapshots.snapshot_name(SPIKE - 10)).resolve()
    assert rewindable({"train.lr": "1e-3", "clip": "1"}) and not rewindable({"norm": "pre", "clip": "1"})


@pytest.mark.parametrize(
    "policy",
    [
        ["on_spike=backoff", "train.backoff_steps=8"],  # the lr multiplier grows back once per step
        ["on_spike=skip"],  # the spike window holds each finite step once
        ["update_clip=1"],  # a non-finite step leaves the weights as they were
    ],
    ids=["backoff", "skip", "update_clip"],
)
def test_a_window_rewound_to_a_non_finite_step_counts_each_step_once(tmp_path, policy):
    """train.sync_every=4 with a NaN at step 33, inside the window of steps 32-35, a spike
    planted at 30 before it: the device ran steps 33-35 (skipped) before the host rewound to 33
    and re-ran them. The recovery policies' state must hold each step once, as at sync_every=1,
    so every recorded number is the same at K=1 and K=4."""
    nan = ["fault.nan_at_step=33", "fault.nan_module=layer0.mlp", "train.on_nan=skip", "train.snapshot_every=20"]
    f1, one = _train(tmp_path, "k1", [*policy, *nan, "train.sync_every=1"])
    f4, four = _train(tmp_path, "k4", [*policy, *nan, "train.sync_every=4"])
    assert [r["step"] for r in four] == [r["step"] for r in one] and len(one) > 40
    assert [r["finite"] for r in one].count(False) == 1 and not one[33]["finite"]
    for a, b in zip(one, four):
        for k in a:
            if k != "time/step_ms":
                assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (a["step"], k, a[k], b[k])
    # the policies' device state after step 39 (the spike window: 39 finite steps, each once)
    s1, s4 = (snapshots.load(f / "snapshots" / snapshots.snapshot_name(40))["extra"]["recovery"] for f in (f1, f4))
    if s1["guard"] is not None:
        assert int(s1["guard"]["count"]) == 39 == int(s4["guard"]["count"])
        assert torch.equal(s1["guard"]["buf"], s4["guard"]["buf"])


def test_the_report_gives_a_spiked_run_its_recovery_metrics_against_the_run_without_the_spike(tmp_path, cli):
    """Two runs of one configuration, one with the spike planted at step 30 and on_spike=skip:
    the report's recovery table gives the skipped steps, the steps until the loss is back at its
    pre-spike level, and the final-loss gap to the run without the spike, as the records say."""
    from stability.report.recovery import RECOVER_WINDOW as W
    from stability.report.recovery import recovery_metrics

    root = tmp_path / "runs"
    run(compose_run([*BASE, "on_spike=skip"]), root / "skip")
    run(compose_run([o for o in BASE if not o.startswith("fault.")]), root / "clean")
    spiked, _ = read_jsonl(root / "skip" / "metrics.jsonl")
    clean, _ = read_jsonl(root / "clean" / "metrics.jsonl")
    m = recovery_metrics(spiked, SPIKE)
    assert m["skipped"] == sum(r["recover/skipped"] == 1.0 for r in spiked if r["step"] >= SPIKE) >= 1
    loss = [r["loss"] for r in spiked]
    pre = sum(loss[SPIKE - W : SPIKE]) / W
    lost = m["recover_steps"]
    assert m["pre_loss"] == pytest.approx(pre) and lost >= 1
    assert sum(loss[SPIKE + lost : SPIKE + lost + W]) / W <= pre  # back at the pre-spike loss there ...
    assert all(sum(loss[i : i + W]) / W > pre for i in range(SPIKE + 1, SPIKE + lost))  # ... and not before
    gap = sum(loss[-W:]) / W - sum(r["loss"] for r in clean[-W:]) / W
    cli("report", root)
    md = (root / "report.md").read_text()
    section = md.split("## Recovery")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| skip") or "skip |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["skip", "none", str(SPIKE), str(m["skipped"])]
    assert cells[5] == str(lost) and float(cells[8]) == pytest.approx(gap, abs=1e-3)
    assert "| clean" not in section  # the run without the spike is the reference, not a row


def test_every_recorded_key_is_a_row_of_the_run_format(skipped):
    """Each key of the step records (signals and recovery policies on) matches a key of
    docs/run-format.md's metrics.jsonl table (`<group>` one of the run's module groups), and
    the planted spike's loss is recorded as the table says: multiplied by fault.spike_factor."""
    import re
    from pathlib import Path

    folder, steps = skipped
    doc = (Path(__file__).resolve().parents[1] / "docs" / "run-format.md").read_text()
    table = doc.split("## `metrics.jsonl`")[1].split("\n## ")[0]
    groups = [k[5:] for k in steps[0] if k.startswith("grad/") and k not in ("grad/norm", "grad/clipped")]
    patterns = []
    for row in table.splitlines():
        if row.startswith("| `"):
            for key in re.findall(r"`([^`]+)`", row.split("|")[1]):
                rx = re.escape(key).replace(re.escape("<group>"), "(" + "|".join(map(re.escape, groups)) + ")")
                patterns.append(re.compile(rx.replace(re.escape("{i}"), r"\d+") + "$"))
    recorded = {k for r in steps for k in r}
    assert {"update_rel/layer0.attn", "eps_share/lm_head", "lm/log_z", "recover/skipped"} <= recorded
    assert [k for k in sorted(recorded) if not any(p.match(k) for p in patterns)] == []
    by = {r["step"]: r for r in steps}
    assert by[SPIKE]["loss"] > 100 * max(by[SPIKE - 1]["loss"], by[SPIKE + 1]["loss"])  # x1000, not the raw loss
