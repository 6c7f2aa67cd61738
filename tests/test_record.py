"""The record package: one verdict vocabulary that the detectors, the report and the doctor agree on."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from stability import detectors, report
from stability.record import verdicts as vd

FIXTURE = Path(__file__).parent / "fixtures" / "runs_v0"


def _epochs(norms, collapsed=None, val=None):
    n = len(norms)
    return [{"epoch": i + 1, "grad_norm_mean": g, "grad_norm_max": 1.5 * g,
             "val_loss": (val or [10.0 / (i + 1) for i in range(n)])[i], "collapsed": (collapsed or [False] * n)[i],
             "clip_rate": 0.1, "stage_clamp_rate": [0.0], "health_summary": {}} for i, g in enumerate(norms)]


NAN = {"epoch": 3, "batch": 1, "step": 9, "module": "stage0.layer0.mlp", "kind": "loss"}
CASES = {  # hand-made histories: (epochs, first_nan) -> the verdict the vocabulary's order gives
    "nan over exploding": (_epochs([2.0, 6.0, math.nan]), NAN, "nan"),
    "exploding over scream": (_epochs([3.0, 11.0, 23.0, 32.0], collapsed=[False, True, True, True],
                                      val=[9, 8, 8.5, 9]), None, "exploding"),
    "scream alone": (_epochs([2.0] * 5, collapsed=[False, False, True, True, True]), None, "scream"),
    "nothing found": (_epochs([5.0, 4.0, 3.0]), None, "stable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_runs_verdict_is_the_most_severe_of_its_findings(case):
    epochs, first_nan, expected = CASES[case]
    found = detectors.diagnose(epochs, first_nan, 10.0, explode_factor=2.0, explode_window=3, scream_min_epochs=2,
                               learning_rate=0.05)
    flags = [f["flag"] for f in found["flags"]]
    assert set(flags) <= set(vd.SEVERITY)
    assert found["verdict"] == expected == vd.worst(flags)
    assert vd.is_unstable(found["verdict"]) == (expected != "stable")


def test_the_report_counts_unstable_and_orders_columns_by_the_vocabulary(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "runs")
    runs = report.load_runs(tmp_path / "runs")
    verdicts = sorted(r.verdict for r in runs)
    assert verdicts == ["nan", "scream", "stable"]  # what the fixture's summaries say
    table, sentence = report.answer(runs, ["residual"])
    assert sentence.startswith("Decisive: residual: 0/1 unstable at 0.3 vs 2/2 at 0.1")
    assert sum(int(u.split("/")[0]) for u in table["unstable"]) == sum(vd.is_unstable(v) for v in verdicts) == 2
    shares = report.factor_summary(runs, ["residual"])
    shown = [c for c in shares.columns if c in vd.SEVERITY]
    assert shown == list(vd.ORDER)  # least to most broken, every verdict a column
    assert shares[list(vd.ORDER)].sum(axis=1).tolist() == pytest.approx([1.0] * len(shares))
