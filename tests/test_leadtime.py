"""Lead time of the step signals before an event, against false alarms (stability/leadtime.py):
a spike planted in a really trained char LM, and the table's arithmetic over runs."""

from __future__ import annotations

import math

import pytest

from cli.config import compose_run
from stability import leadtime
from stability.doctor import read_run
from stability.training import run

SPIKE = 30


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The char LM's smoke preset, one epoch (52 steps) at a learning rate whose loss falls
    smoothly, signals on, the loss (and so every gradient) multiplied by 1000 at step 30."""
    folder = tmp_path_factory.mktemp("lead") / "planted"
    overrides = [
        "model=charlm",
        "preset=smoke",
        "train.epochs=1",
        "train.lr=3e-3",
        "train.threads=1",
        "detect.health=false",
        "detect.opt_state=true",
        f"fault.spike_at_step={SPIKE}",
        "fault.spike_factor=1000",
    ]
    run(compose_run(overrides), folder)
    return read_run(folder)


def test_a_planted_spike_is_the_event_and_the_gradient_signals_alarm_at_it(planted):
    r = leadtime.run_lead(planted)
    assert (r.event, r.event_kind) == (SPIKE, "loss_spike")
    assert r.alarms["grad/norm"] == SPIKE  # the reference signal: lead 0 at a spike with no warning
    assert r.alarms["adam_v"] == SPIKE and r.alarm_group["adam_v"] in planted.groups  # v takes g^2 at once
    # Adam's update m / sqrt(v) hardly moves when one gradient is 1000x: m and sqrt(v) grow alike
    assert r.alarms["update_rel"] is None
    assert set(r.alarms) == {name for name, _, _ in leadtime.SIGNALS}  # the char LM records every signal
    table = leadtime.lead_table([r])
    assert table["grad/norm"].leads == [0] and table["grad/norm"].quiet_runs == 0
    assert "| `grad/norm` | 0 [0–0] | 1/1 | – (no quiet run) |" in leadtime.markdown(table)


def test_the_table_counts_leads_misses_and_false_alarms_per_signal():
    runs = [
        leadtime.RunLead("a", 50, "loss_spike", 100, {"grad/norm": 50, "adam_v": 40}),
        leadtime.RunLead("b", 80, "nan", 100, {"grad/norm": 90, "adam_v": 60}),  # grad/norm after the event: a miss
        leadtime.RunLead("c", None, "none", 100, {"grad/norm": None, "adam_v": 20}),  # adam_v: a false alarm
        leadtime.RunLead("d", None, "none", 120, {"grad/norm": None, "adam_v": None}),
    ]
    t = leadtime.lead_table(runs)
    assert (t["grad/norm"].leads, t["grad/norm"].missed, t["grad/norm"].false_alarms) == ([0], 1, 0)
    assert (t["adam_v"].leads, t["adam_v"].median, t["adam_v"].interval) == ([10, 20], 15.0, (10, 20))
    assert t["adam_v"].false_alarm_rate == 0.5 and t["adam_v"].quiet_steps == 220
    assert math.isnan(leadtime.SignalLead("x").median)
