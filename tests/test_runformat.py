"""The run format: the writer's files against what they were computed from, streaming memory,
strict JSON, and run folders written by earlier stab (tests/fixtures/runs_v0, main at 765b456)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
from array import array
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from stability import report, sweeps
from stability.config import DetectConfig
from stability.lr_sensitivity import initial_loss, initial_loss_source
from stability.record import format as rf
from stability.record.summarizer import Summarizer
from stability.record.writer import RunWriter
from tests.conftest import SMOKE, only_run, read_json, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "runs_v0"


def invoke(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


# --- the files a run writes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run with a NaN at step 5 that goes on (on_nan=skip): epoch 2's means are NaN."""
    runs = tmp_path_factory.mktemp("runformat")
    result = CliRunner().invoke(
        app, ["run", "--runs", str(runs), *SMOKE, "train.epochs=3", "fault.nan_at_step=5", "train.on_nan=skip"]
    )
    assert result.exit_code == 0, result.output
    return only_run(runs)


def test_long_grad_table_is_what_metrics_jsonl_gives(nan_run):
    steps = pd.DataFrame(read_jsonl(nan_run / rf.METRICS))
    table = rf.read_grad_table(nan_run / rf.GRAD_TABLE)
    assert tuple(table.columns) == rf.GRAD_COLUMNS
    groups = [g for g in dict.fromkeys(table["group"]) if g != rf.TOTAL]
    assert len(groups) > 10 and list(dict.fromkeys(table["group"]))[0] == rf.TOTAL
    for epoch, mine in steps.groupby("epoch"):
        for group in (rf.TOTAL, *groups):
            col = rf.GRAD_NORM if group == rf.TOTAL else rf.grad_key(group)
            values = mine[col].to_numpy(dtype=float)
            (row,) = table[(table["epoch"] == epoch) & (table["group"] == group)].itertuples()
            # np.mean / np.max propagate NaN: the NaN epoch shows as NaN
            np.testing.assert_allclose([row.mean, row.max], [values.mean(), values.max()], rtol=1e-8)
    assert math.isnan(table[(table["epoch"] == 2) & (table["group"] == rf.TOTAL)]["mean"].item())
    assert table[table["epoch"] == 3]["mean"].notna().all()  # on_nan=skip: training went on, finite again
    # the epoch records agree with the same steps
    for e in read_jsonl(nan_run / rf.EPOCHS):
        mine = steps[steps["epoch"] == e["epoch"]]

        def col(key: str) -> np.ndarray:  # numpy propagates NaN, pandas' mean would skip it
            return mine[key].to_numpy(dtype=float)

        finite = mine[rf.FINITE].to_numpy(dtype=bool)
        np.testing.assert_allclose(  # the loss over the steps the optimizer took; the grad max propagates NaN
            [e["loss"], e["grad_norm_max"], e["clip_rate"]],
            [col(rf.LOSS)[finite].mean(), col(rf.GRAD_NORM).max(), col(rf.CLIPPED).mean()],
            rtol=1e-12,
        )
        assert e["steps"] == len(mine) and e["nonfinite"] == (~finite).sum() == (e["epoch"] == 2)
        assert e["stage_clamp_rate"] == pytest.approx(
            [col(rf.stage_key(i, "clamped")).mean() for i in range(len(e["stage_rms"]))]
        )


def test_every_file_is_strict_json_with_a_schema_version(nan_run):
    def no_constant(name: str):
        raise AssertionError(f"bare {name}: not strict JSON")

    parsed = 0
    for path in [*nan_run.glob("*.json"), *nan_run.glob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            if line.strip():
                json.loads(line, parse_constant=no_constant)
                parsed += 1
    assert parsed > 12
    assert read_json(nan_run / rf.SUMMARY)["schema_version"] == rf.SCHEMA_VERSION
    assert read_json(nan_run / rf.STATUS)["schema_version"] == rf.SCHEMA_VERSION
    assert any(
        isinstance(v, str) and v == "NaN" for v in json.loads((nan_run / rf.SUMMARY).read_text())["grad_norm_by_epoch"]
    )


def test_show_prints_the_wide_view_of_the_long_table(nan_run):
    out = invoke("show", nan_run)
    wide = rf.wide_view(rf.read_grad_table(nan_run / rf.GRAD_TABLE))
    assert list(wide.columns) == ["e1", "e2", "e3", "max"]
    total = next(line for line in out.splitlines() if line.startswith("│ total "))
    assert [c.strip() for c in total.strip("│ ").split("│")][1:] == [
        f"{wide.at['total', c]:.3g}".replace("nan", "NaN") for c in wide.columns
    ]


# --- streaming: what the writer keeps ---------------------------------------------------------


def _feed(run_dir: Path, n_epochs: int, epoch_steps: int, groups: list[str]) -> RunWriter:
    run_dir.mkdir()
    writer = RunWriter(run_dir, flush_steps=64)
    # no spike can pass a ratio of 1e9: the spike events (capped at 20 per kind) would add dicts
    writer.open(groups, 1, Summarizer(DetectConfig(spike_ratio=1e9), clip=1.0))
    rng = np.random.default_rng(0)
    tables = []
    for step in range(n_epochs * epoch_steps):
        epoch, b = step // epoch_steps + 1, step % epoch_steps
        norms = rng.lognormal(size=len(groups) + 1)
        rec = {
            rf.STEP: step,
            rf.EPOCH: epoch,
            rf.BATCH: b,
            rf.LOSS: float(rng.random()),
            rf.GRAD_NORM: norms[0],
            **{rf.grad_key(g): v for g, v in zip(groups, norms[1:])},
            rf.stage_key(0, "rms"): 1.0,
            rf.stage_key(0, "ratio"): 1.0,
            rf.stage_key(0, "scale"): 1.0,
            rf.stage_key(0, "clamped"): False,
            rf.FINITE: True,
            rf.CLIPPED: bool(norms[0] > 1.0),
            rf.LR: 1e-3,
        }
        writer.step(rec)
        if b == epoch_steps - 1:
            writer.epoch({**writer.close_epoch(), "val_loss": 1.0, "collapsed": False})
            tables.append((run_dir / rf.GRAD_TABLE).read_text())
    for before, after in itertools.pairwise(tables):  # an epoch end appends its own rows, touches none before
        assert after.startswith(before) and after.count("\n") - before.count("\n") == len(groups) + 1
    return writer


def _retained(obj: object, seen: set[int] | None = None) -> tuple[int, int]:
    """(dicts reachable from `obj`, bytes of them all), following containers and object attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, type(sys), Path)) or (callable(obj) and not hasattr(obj, "__dict__")):
        return 0, 0
    seen.add(id(obj))
    dicts, size = int(isinstance(obj, dict)), sys.getsizeof(obj)
    children = []
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    for child in children:
        d, s = _retained(child, seen)
        dicts, size = dicts + d, size + s
    return dicts, size


def test_the_writer_keeps_no_step_records(tmp_path):
    groups = [f"g{i}" for i in range(57)]
    small = _feed(tmp_path / "small", 3, 40, groups)
    large = _feed(tmp_path / "large", 3, 1000, groups)  # 25x the steps, the same epochs
    (d_small, b_small), (d_large, b_large) = _retained(small), _retained(large)
    assert d_large == d_small  # not one dict more: no step record is kept
    assert isinstance(large.summarizer.norms, array) and len(large.summarizer.norms) == 3000
    per_step = (b_large - b_small) / (3000 - 120)
    assert per_step <= 8 * 1.2  # the summarizer's float64 per step (with the array's over-allocation), nothing else
    assert len(large.lines) < large.flush_steps
    # and what it wrote is every step
    assert [r["step"] for r in read_jsonl(tmp_path / "large" / rf.METRICS)] == list(range(3000))


# --- run folders written by earlier stab ------------------------------------------------------


@pytest.fixture
def old_runs(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "runs")
    return tmp_path / "runs"


def test_folders_from_before_the_schema_read_as_they_did(old_runs):
    runs = {r.rel: r for r in report.load_runs(old_runs)}
    assert set(runs) == {
        "nan_run",
        "sweep/preset=smoke,residual=0.1,train.epochs=2",
        "sweep/preset=smoke,residual=0.3,train.epochs=2",
    }
    for r in runs.values():
        summary = json.loads((r.path / rf.SUMMARY).read_text())
        assert "schema_version" not in summary and not r.warnings
        assert r.verdict == summary["verdict"] and r.state == "completed"
        assert r.steps_recorded == summary["steps"] and sweeps.incomplete(r.path) is None
        wide = pd.read_csv(r.path / rf.GRAD_TABLE, index_col="group")  # the old layout: e{N}_mean, e{N}_max
        view = report.grad_epoch_frame(r)
        assert list(view.index) == list(wide.index)
        for e in (1, 2):
            np.testing.assert_array_equal(view[f"e{e}"].to_numpy(), wide[f"e{e}_mean"].to_numpy())
        np.testing.assert_array_equal(view["max"].to_numpy(), wide[["e1_max", "e2_max"]].to_numpy().max(axis=1))
        # no evaluation at init in these old runs: the first step's loss, and it says so
        assert initial_loss(r.path) == read_jsonl(r.path / rf.METRICS)[0]["loss"]
        assert initial_loss_source(r.path)[1] == "first training step"
    nan = runs["nan_run"]
    assert (
        nan.verdict == "nan"
        and nan.first_nan["step"] == 5
        and math.isnan(report.grad_epoch_frame(nan).at["total", "e2"])
    )

    out = invoke("report", old_runs)
    # the verdicts in the summaries; one run per value is never decisive
    assert "residual: 0/1 unstable at 0.3 vs 2/2 at 0.1: untested" in out
    written = pd.read_csv(old_runs / "runs.csv", keep_default_na=False, na_values=["", "NaN"])
    assert sorted(written["verdict"]) == ["nan", "scream", "stable"]
    assert len(list((old_runs / "plots").glob("heatmap_*.png"))) == 2  # the NaN run and the scream, from wide tables
    shown = invoke("show", nan.path)
    assert "first non-finite loss at epoch 2, batch 1 (step 5)" in shown and "│ total " in shown
