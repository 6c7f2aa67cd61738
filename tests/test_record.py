"""The record package: one verdict vocabulary that the detectors, the report and the doctor agree on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from stability import doctor as dr
from stability import report, sweeps
from stability.detectors.verdict import diagnose
from stability.record import format as rf
from stability.record import verdicts as vd
from stability.record.folder import RunFolder

FIXTURE = Path(__file__).parent / "fixtures" / "runs_v0"


def _epochs(norms, collapsed=None, val=None):
    n = len(norms)
    return [
        {
            "epoch": i + 1,
            "grad_norm_mean": g,
            "grad_norm_max": 1.5 * g,
            "val_loss": (val or [10.0 / (i + 1) for i in range(n)])[i],
            "collapsed": (collapsed or [False] * n)[i],
            "clip_rate": 0.1,
            "stage_clamp_rate": [0.0],
            "health_summary": {},
        }
        for i, g in enumerate(norms)
    ]


NAN = {"epoch": 3, "batch": 1, "step": 9, "module": "stage0.layer0.mlp", "kind": "loss"}
CASES = {  # hand-made histories: (epochs, first_nan) -> the verdict the vocabulary's order gives
    "nan over exploding": (_epochs([2.0, 6.0, math.nan]), NAN, "nan"),
    "exploding over scream": (
        _epochs([3.0, 11.0, 23.0, 32.0], collapsed=[False, True, True, True], val=[9, 8, 8.5, 9]),
        None,
        "exploding",
    ),
    # a collapse to the end while the loss has stopped falling (a falling loss is undertraining: exempt)
    "scream alone": (
        _epochs([2.0] * 5, collapsed=[False, False, True, True, True], val=[5, 4, 3.9, 3.9, 3.9]),
        None,
        "scream",
    ),
    "nothing found": (_epochs([5.0, 4.0, 3.0]), None, "stable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_runs_verdict_is_the_most_severe_of_its_findings(case):
    epochs, first_nan, expected = CASES[case]
    found = diagnose(
        epochs, first_nan, 10.0, explode_factor=2.0, explode_window=3, scream_min_epochs=2, learning_rate=0.05
    )
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
    # one or two runs per value: the split is shown but never called decisive (issue 24: no test behind it)
    assert sentence.startswith(
        "2/3 runs unstable; no factor is decisive yet: residual: 0/1 unstable at 0.3 vs 2/2 at 0.1"
    )
    assert "untested" in sentence and "Decisive" not in sentence
    assert sum(int(u.split("/")[0]) for u in table["unstable"]) == sum(vd.is_unstable(v) for v in verdicts) == 2
    shares = report.factor_summary(runs, ["residual"])
    shown = [c for c in shares.columns if c in vd.SEVERITY]
    assert shown == list(vd.ORDER)  # least to most broken, every verdict a column
    assert shares[list(vd.ORDER)].sum(axis=1).tolist() == pytest.approx([1.0] * len(shares))


# --- one reader: RunFolder, and every command that reads a run through it -------------------------


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """The NaN run of tests/fixtures/runs_v0 (written before schema_version: a wide grad table)."""
    shutil.copytree(FIXTURE / "nan_run", tmp_path / "nan_run")
    return tmp_path / "nan_run"


def test_an_old_run_folder_reads_as_typed_frozen_records(old_run):
    folder = RunFolder(old_run)
    raw = json.loads((old_run / rf.SUMMARY).read_text())
    s = folder.summary()
    assert "schema_version" not in raw and s.schema_version == 1  # before the version existed
    assert s.verdict == raw["verdict"] == "nan" and math.isnan(s.final_val_loss)  # "NaN" in the file
    assert s.first_nan["step"] == 5 and dict(s).keys() == raw.keys()  # the keys as written, no more
    assert folder.status().state == "completed" and folder.status().pid == raw_status(old_run)["pid"]
    epochs = folder.epochs()
    assert [e.epoch for e in epochs] == [1, 2] and math.isnan(epochs[1].grad_norm_mean)
    assert "first_nan" in [e.event for e in folder.events()]
    assert len(folder.steps()) == s.steps == 6 and folder.first_step()[rf.LOSS] == folder.steps()[0][rf.LOSS]
    table = folder.grad_table()  # the wide schema-1 table, read as the long one
    assert tuple(table.columns) == rf.GRAD_COLUMNS and sorted(set(table["epoch"])) == [1, 2]
    assert folder.incomplete() is None and folder.warnings == []
    with pytest.raises(AttributeError, match="frozen"):
        s.verdict = "stable"


def raw_status(run: Path) -> dict:
    return json.loads((run / rf.STATUS).read_text())


def test_a_torn_epoch_line_and_a_truncated_summary_read_the_same_everywhere(old_run):
    from cli.margin import read_probe
    from stability.sweeps import job_progress

    with open(old_run / rf.EPOCHS, "a") as f:
        f.write('{"epoch": 3, "loss": 0.')  # a job killed while appending
    blob = (old_run / rf.SUMMARY).read_text()
    (old_run / rf.SUMMARY).write_text(blob[: len(blob) // 2])  # a full disk

    run = report.load_run(old_run)
    assert run.verdict == "nan"  # from status.json, the summary being unreadable
    assert any(w.startswith(f"{rf.SUMMARY} unreadable") for w in run.warnings)
    assert f"{rf.EPOCHS}: 1 unparsable line(s) skipped" in run.warnings and len(run.epochs) == 2
    assert RunFolder(old_run).incomplete().startswith(f"{rf.SUMMARY} unreadable")
    assert sweeps.should_skip(old_run, raw_status(old_run)["run_id"]) is False  # a sweep runs it again
    assert dr.read_run(old_run).summary.verdict == "?" and len(dr.read_run(old_run).epochs) == 2
    assert read_probe(old_run, 0.1).verdict == "?"
    assert job_progress(old_run, now=0.0)["epoch"] == 2  # the live view counts whole epochs only
    (old_run / rf.SUMMARY).write_text(blob)
    with open(old_run / rf.EPOCHS, "w") as f:
        f.write((FIXTURE / "nan_run" / rf.EPOCHS).read_text())
    assert RunFolder(old_run).incomplete() is None and read_probe(old_run, 0.1).verdict == "nan"
