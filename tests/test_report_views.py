"""What the report draws: per-step curves with their marks, the min/max thinning that never loses
a spike, runs grouped by factor (readable at 2 runs and at 100), the per-group departure across
runs, and the terminal tables at 80 columns. The 100-run sweep is hand-made run folders
(tests/synthetic_runs.py: training 100 runs here would take an hour); the report's own tests
(test_report.py) draw and open the same things over really trained runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from stability.report import factors, load_runs, sort_runs
from stability.report.grouped import plot_grouped
from stability.report.stepplots import (
    departure_frame,
    departure_table,
    plot_departure,
    plot_steps,
)
from stability.report.steps import (
    departures,
    detect_settings,
    load_steps,
    minmax_downsample,
    spikes,
)
from tests.synthetic_runs import make_run

LRS = ["0.001", "0.003", "0.01", "0.03", "0.1"]
CLIPS = ["0.5", "1", "2", "none"]


def test_minmax_thinning_keeps_a_planted_spike_and_dip():
    rng = np.random.default_rng(0)
    x = np.arange(100_000)
    y = 1.0 + 0.01 * rng.standard_normal(len(x))
    y[54_321], y[7_777], y[90_000] = 50.0, 0.2, np.nan
    xs, ys = minmax_downsample(x, y, 1000)
    assert len(xs) <= 1000 + 500  # a bucket with a NaN keeps one more point
    assert np.all(np.diff(xs) > 0)  # in step order
    assert ys[xs == 54_321][0] == 50.0 and ys[xs == 7_777][0] == 0.2
    assert np.isnan(ys[xs == 90_000][0])  # a gap where the NaN was
    assert np.nanmax(ys) == 50.0 and np.nanmin(ys) == 0.2
    assert np.array_equal(minmax_downsample(x[:10], y[:10], 1000)[1], y[:10])  # short: whole


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> Path:
    """`two`: 2 runs (3000 steps with a spike at 1234; a skipped NaN at 1500). `big`: 100 runs,
    5 learning rates x 4 clips x 5 seeds; at lr >= 0.03 the unclipped runs and the even seeds
    go NaN, layer1.mlp growing 10x a step for 5 steps before."""
    root = tmp_path_factory.mktemp("synthetic")
    make_run(root / "two", "a", {"norm": "pre"}, steps=3000, epochs=5, seed=1, spike=(1234, 30.0))
    make_run(root / "two", "b", {"norm": "post"}, steps=2000, epochs=5, seed=2, nan_at=1500, on_nan="skip")
    i = 0
    for lr in LRS:
        for clip in CLIPS:
            for seed in range(5):
                unstable = float(lr) >= 0.03 and (clip == "none" or seed % 2 == 0)
                make_run(
                    root / "big",
                    f"lr={lr},clip={clip},seed={seed}",
                    {"train.lr": lr, "clip": clip, "seed": seed},
                    steps=200,
                    seed=i,
                    nan_at=120 + 10 * seed if unstable else None,
                )
                i += 1
    return root


def loaded(root: Path):
    runs = load_runs(root)
    keys = factors(runs)
    runs = sort_runs(runs, keys)
    return runs, keys, {r.rel: load_steps(r) for r in runs}


def png_size(path: Path) -> tuple[int, int]:
    h, w = mpimg.imread(path).shape[:2]
    return w, h


def test_per_step_plot_marks_spike_clip_skip_first_nan_and_epochs(sweeps, tmp_path):
    runs, _, series = loaded(sweeps / "two")
    a, b = sorted(runs, key=lambda r: r.rel)
    assert 1234 in series["a"].step[spikes(series["a"].grad, detect_settings(a))]  # the planted spike is found
    drawn = plot_steps(a, series["a"], "a", tmp_path / "a.png")
    assert "spike (1)" in drawn.legend and "clip threshold 1" in drawn.legend
    assert any(label.startswith("gradient norm (min/max per") for label in drawn.legend)  # 3000 steps thinned
    drawn = plot_steps(b, series["b"], "b", tmp_path / "b.png")
    assert "first NaN: step 1500 in layer1.mlp" in drawn.legend
    assert "skipped (1 steps)" in drawn.legend and "non-finite" in drawn.legend
    assert series["b"].skipped.sum() == 1 and not series["b"].finite[series["b"].step == 1500][0]
    assert sorted(set(series["b"].epoch)) == [1, 2, 3, 4, 5]
    w, h = png_size(tmp_path / "b.png")
    assert 800 < w < 1400 and 500 < h < 900


def test_grouped_plot_is_readable_at_2_runs_and_at_100(sweeps, tmp_path):
    runs, keys, series = loaded(sweeps / "two")
    two = plot_grouped(runs, series, keys, tmp_path / "two.png")
    assert two.legend[:2] == ["norm=post  (1/1 unstable)", "norm=pre  (0/1 unstable)"]
    assert len(two.legend) <= 4  # one per colour, plus the NaN mark
    w2, _ = png_size(two.path)

    runs, keys, series = loaded(sweeps / "big")
    assert len(runs) == 100 and set(keys) == {"train.lr", "clip", "seed"}
    big = plot_grouped(runs, series, keys, tmp_path / "big.png", spread={"train.lr": 0.7, "clip": 0.16})
    colours = [label for label in big.legend if label.startswith("train.lr=")]
    assert len(colours) == len(LRS) and len(big.legend) <= len(LRS) + 2  # never one entry per run
    assert "train.lr=0.03  (14/20 unstable)" in colours
    assert big.panels == [f"clip={c}" for c in ["0.5", "1", "2", "none"]]
    assert any("band: min-max over up to 5 runs (seed)" in label for label in big.legend)
    w, h = png_size(big.path)
    assert w <= 2600 and h <= 1200 and w2 <= 1200  # fits a screen; the 2-run figure stays small


def test_without_a_decisive_factor_the_one_with_fewer_values_is_the_colour(sweeps, tmp_path):
    runs, keys, series = loaded(sweeps / "big")
    drawn = plot_grouped(runs, series, keys, tmp_path / "g.png")
    assert [label.split("=")[0] for label in drawn.legend[:4]] == ["clip"] * 4
    assert drawn.panels == [f"train.lr={lr}" for lr in LRS]


def test_departure_finds_the_group_that_leaves_first_in_unstable_runs_only(sweeps, tmp_path):
    runs, _, series = loaded(sweeps / "big")
    rows = departure_table(runs, series)
    unstable = [r for r in rows if r["unstable"]]
    assert len(unstable) == 28 and all(r["first"] == ["layer1.mlp"] for r in unstable)
    nan_step = {r.rel: r.first_nan["step"] for r in runs if r.first_nan}
    assert all(r["first step"] < nan_step[r["run"]] for r in unstable)  # before the NaN, not at it
    frame = departure_frame(rows).set_index("group")
    assert frame.loc["layer1.mlp", "first in unstable"] == "28/28"
    assert frame.loc["layer1.mlp", "first in stable"] == "0/72"
    drawn = plot_departure(rows, tmp_path / "dep.png")
    assert drawn.panels[:2] == ["embed", "layer0.attn"] and "stable runs (72; 72 never left it)" in drawn.legend


def test_departure_is_the_first_value_out_of_the_band_or_non_finite():
    from stability.report.steps import StepSeries

    flat = np.ones(40)
    jump, nan = flat.copy(), flat.copy()
    jump[25:] = 10.0
    nan[30] = np.nan
    s = StepSeries(
        step=np.arange(40),
        epoch=np.ones(40, int),
        loss=flat,
        grad=flat,
        clipped=np.zeros(40, bool),
        finite=np.ones(40, bool),
        skipped=np.zeros(40, bool),
        groups={"a": flat, "b": jump, "c": nan},
    )
    got = departures(s, {"window": 20, "z": 6.0, "warmup": 10, "ratio": 3.0})
    assert got == {"a": None, "b": 25, "c": 30}


@pytest.fixture
def width_80():
    """The terminal pinned at 80 columns for one test (conftest pins 260 for the rest)."""
    from cli.common import console

    before = console.width
    console.width = 80
    yield 80
    console.width = before


def _table_words(output: str) -> list[str]:
    """The words inside the printed tables' cells and headers (box characters dropped)."""
    words = []
    for line in output.splitlines():
        if any(ch in line for ch in "│┃"):
            for cell in line.replace("┃", "│").split("│"):
                words += cell.split()
    return words


def _allowed_words(frames) -> set[str]:
    from cli.report import SHORT_HEADERS, soft_split

    words = {
        piece
        for f in frames
        for col in f.columns
        for text in [str(col), *map(str, f[col])]
        for w in text.split()
        for piece in [w, *soft_split(w)]
    }
    return words | {w for header in SHORT_HEADERS.values() for w in header.split()}


def _report_frames(root: Path):
    from stability.report import (
        answer,
        answer_display,
        factor_display,
        factor_summary,
        lr_display,
        lr_summary,
        overview,
    )

    runs, keys, _ = loaded(root)
    lr = lr_summary(runs, keys)
    return (
        runs,
        keys,
        [
            overview(runs, keys),
            answer_display(answer(runs, keys)[0]),
            factor_display(factor_summary(runs, keys)),
            *([lr_display(lr)] if lr is not None else []),
        ],
    )


def test_stab_report_fits_80_columns_without_cutting_a_word(cli, sweeps, tmp_path, width_80):
    result = cli("report", sweeps / "two", "--out", tmp_path)
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    _, _, frames = _report_frames(sweeps / "two")
    cut = [w for w in _table_words(result.output) if w not in _allowed_words(frames)]
    assert not cut, cut  # every word in a cell is a whole word of the table (or a piece after / , = : _)
    assert [w for w in _table_words(result.output) if w in ("stable", "nan")][:2] == ["nan", "stable"]  # the runs


def test_100_runs_tables_fit_80_columns_and_say_what_they_leave_out(sweeps, width_80):
    import io

    from rich.console import Console

    from cli.report import OVERVIEW_DROP, frame_table

    runs, keys, frames = _report_frames(sweeps / "big")
    texts = []
    for i, frame in enumerate(frames):
        out = Console(width=80, file=io.StringIO(), color_system=None)
        drop = [*OVERVIEW_DROP[:-2], *reversed(keys), *OVERVIEW_DROP[-2:]] if i == 0 else None
        out.print(frame_table(frame, title="t", drop=drop), crop=False)
        texts.append(out.file.getvalue())
    text = "".join(texts)
    assert max(map(len, text.splitlines())) <= 80
    cut = [w for w in _table_words(text) if w not in _allowed_words(frames)]
    assert not cut, cut
    assert sum(w in ("stable", "nan") for w in _table_words(texts[0])) == len(runs) == 100  # every run, whole
    assert "not shown at 80 columns:" in text  # the lr table's columns do not all fit: named, not cut


def test_a_long_run_name_breaks_only_after_punctuation():
    from cli.report import soft_split

    name = "grid/norm=post,preset=smoke,residual=0.1,train.lr=0.003"
    pieces = soft_split(name)
    assert "".join(pieces) == name and all(len(p) <= 20 for p in pieces)
    assert all(p[-1] in "/,=:_" for p in pieces[:-1])
