"""`stab report` and `stab show` on real run folders: a smoke sweep, a run with an injected NaN,
a crashed run, and hand-damaged copies of them. Asserts on the printed table, on runs.csv
against each run's own summary.json, and on the PNGs being real images."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from stability.record import verdicts as vd
from stability.record.format import read_grad_table
from tests.conftest import SMOKE, read_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args: object, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, latent_cache: Path) -> Path:
    """Built once: a 2x2 smoke sweep, a run with a NaN injected at step 6, a crashed run."""
    root = tmp_path_factory.mktemp("runs")
    invoke("sweep", "--runs", root, "--name", "grid", *SMOKE, "residual=0.1,0.3", "norm=pre,post")
    invoke("run", "--runs", root, *SMOKE, "fault.nan_at_step=6")
    invoke("run", "--runs", root, *SMOKE, "fault.crash_at_step=0", code=1)
    return root


@pytest.fixture(scope="module")
def reported(runs: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    return invoke("report", runs, "--out", out), out


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("status.json") if ".hydra" not in p.parts)


def by_summary(root: Path, verdict: str) -> Path:
    found = [d for d in run_dirs(root) if read_json(d / "summary.json")["verdict"] == verdict]
    assert found, verdict
    return found[0]


def rich_tables(output: str) -> list[list[dict[str, str]]]:
    """The Rich tables printed in `output` as rows of {header: cell}, wrapped cells joined (tests pin a wide console)."""
    tables, header, rows = [], None, []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("┃"):
            header = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│") and header:
            cells = [c.strip() for c in line.strip("│").split("│")]
            if rows and not cells[0]:  # a wrapped cell: Rich continues the row on the next line
                rows[-1] = {h: " ".join(filter(None, (rows[-1][h], c))) for h, c in zip(header, cells)}
            else:
                rows.append(dict(zip(header, cells)))
        elif line.startswith("└") and header:
            tables.append(rows)
            header, rows = None, []
    return tables


def resolved_residual(run_dir: Path) -> str:
    """The last stage's residual the run trained with, as the report spells it."""
    import yaml

    return f"{yaml.safe_load((run_dir / 'config.yaml').read_text())['model']['residual'][-1]:g}"


def table_with(output: str, column: str) -> list[dict[str, str]]:
    """The first printed table that has `column`."""
    return next(t for t in rich_tables(output) if t and column in t[0])


def test_report_prints_one_row_per_run_with_the_overrides_that_differ(runs, reported):
    result, _ = reported
    table = table_with(result.output, "verdict")
    dirs = run_dirs(runs)
    assert len(table) == len(dirs) == 6
    assert {
        "residual",
        "norm",
        "fault.nan_at_step",
        "fault.crash_at_step",
        "verdict",
        "first NaN",
        "scream",
        "final loss",
        "wall",
    } <= set(table[0])
    grid = [r for r in table if r["sweep"] == "grid"]
    assert sorted((r["residual"], r["norm"]) for r in grid) == [
        ("0.1", "post"),
        ("0.1", "pre"),
        ("0.3", "post"),
        ("0.3", "pre"),
    ]
    for row in grid:
        d = runs / "grid" / f"norm={row['norm']},preset=smoke,residual={row['residual']}"
        summary = read_json(d / "summary.json")
        assert row["verdict"] == summary["verdict"]
        assert row["grad norm per epoch"].split() == [f"{g:.3g}" for g in summary["grad_norm_by_epoch"]]
        assert row["final loss"] == f"{summary['final_loss']:.3g}"

    nan_dir = by_summary(runs, "nan")
    first = read_json(nan_dir / "summary.json")["first_nan"]
    nan_row = next(r for r in table if r["fault.nan_at_step"] == "6")
    assert nan_row["verdict"] == "nan"
    assert nan_row["first NaN"] == f"e{first['epoch']} b{first['batch']} {first['module']}" == "e2 b2 stage2.layer0.mlp"
    assert nan_row["grad norm per epoch"].split()[-1] == "NaN"  # shown, not dropped or zeroed
    assert nan_row["final loss"] == "NaN"

    crashed = next(r for r in table if r["fault.crash_at_step"] == "0")
    assert crashed["verdict"] == "failed" and crashed["final loss"] == "-"
    assert "InjectedCrash" in result.output and "warning" in result.output  # listed and warned, not hidden


def test_factor_summary_gives_verdict_shares_and_median_last_grad_norm(runs, reported):
    result, out = reported
    printed = table_with(result.output, "stable")
    factors = pd.read_csv(out / "factors.csv")
    for value in ("0.1", "0.3"):
        # every run whose resolved residual is this value: the NaN and crashed runs kept the default 0.1
        mine = [read_json(d / "summary.json") for d in run_dirs(runs) if resolved_residual(d) == value]
        row = factors[(factors["factor"] == "residual") & (factors["value"].astype(str) == value)].iloc[0]
        assert row["runs"] == len(mine) == {"0.1": 4, "0.3": 2}[value]
        for verdict in ("stable", "exploding", "scream", "nan", "failed"):
            assert row[verdict] == pytest.approx(sum(s["verdict"] == verdict for s in mine) / len(mine))
        last = [
            [g for g in s["grad_norm_by_epoch"] if math.isfinite(g)][-1] for s in mine if s.get("grad_norm_by_epoch")
        ]
        assert row["median last grad norm"] == pytest.approx(statistics.median(last), rel=1e-12)
        shown = next(r for r in printed if r["factor"] == "residual" and r["value"] == value)
        assert shown["stable"] == f"{round(100 * row['stable'])}%"
    nan_row = factors[(factors["factor"] == "fault.nan_at_step") & (factors["value"].astype(str) == "6")].iloc[0]
    assert nan_row["nan"] == 1.0


def test_the_report_opens_with_the_answer_per_factor_value(runs, reported):
    result, out = reported
    printed = {(r["factor"], r["value"]): r for r in table_with(result.output, "unstable")}
    for value in ("0.1", "0.3"):  # the crashed run has no verdict to count
        mine = [read_json(d / "summary.json") for d in run_dirs(runs) if resolved_residual(d) == value]
        mine = [s for s in mine if s["verdict"] != "failed"]
        # counted: judged, not inconclusive, no borderline value that could move the verdict
        counted = [s for s in mine if s["verdict"] != "inconclusive" and not vd.in_doubt(s["verdict"], s["borderline"])]
        bad = sum(s["verdict"] in ("exploding", "diverged", "scream", "nan") for s in counted)
        assert printed[("residual", value)]["unstable"] == f"{bad}/{len(counted)}"
        assert printed[("residual", value)]["not counted"] == (
            str(len(mine) - len(counted)) if mine != counted else "-"
        )
        vals = sorted(s["final_val_loss"] for s in counted)  # medians over the counted runs
        if vals:
            assert printed[("residual", value)]["median final val loss"] == f"{statistics.median(vals):.3g}"
    # the injected NaN run is unstable at fault.nan_at_step=6, so that factor is decisive
    assert printed[("fault.nan_at_step", "6")]["unstable"] == "1/1"
    # its one run's last validation loss is the median (a NaN or inf loss ranks worst: "non-finite")
    last = read_json(by_summary(runs, "nan") / "summary.json")["final_val_loss"]
    expected = f"{last:.3g}" if math.isfinite(last) else "non-finite"
    assert printed[("fault.nan_at_step", "6")]["median final val loss"] == expected
    md = (out / "report.md").read_text()
    sentence = next(line for line in md.splitlines() if line.startswith("**"))  # the line after the title
    assert "fault.nan_at_step: " in sentence and "1/1 at 6" in sentence
    assert sentence.strip("*") in " ".join(result.output.split())
    _png(out / "plots" / "curves.png")


def test_a_value_whose_runs_are_all_set_aside_has_no_median(tmp_path):
    """A 1-epoch run is inconclusive, so train.epochs=1 has no counted run: its medians are "-"
    (nothing to take a median of), not NaN, which reads as runs whose loss went NaN."""
    invoke("sweep", "--runs", tmp_path, "--name", "short", *SMOKE, "train.epochs=1,3")
    result = invoke("report", tmp_path / "short")
    summaries = {d.name: read_json(d / "summary.json") for d in run_dirs(tmp_path)}
    one = next(s for name, s in summaries.items() if "train.epochs=1" in name)
    three = next(s for name, s in summaries.items() if "train.epochs=3" in name)
    assert one["verdict"] == "inconclusive" and math.isfinite(one["final_val_loss"])
    printed = {(r["factor"], r["value"]): r for r in table_with(result.output, "unstable")}
    row = printed[("train.epochs", "1")]
    assert (row["unstable"], row["not counted"]) == ("0/0", "1")
    assert row["median final val loss"] == row["median max grad norm"] == "-"
    assert row["val loss interval"] == row["grad norm interval"] == "-"
    if three["verdict"] != "inconclusive" and not vd.in_doubt(three["verdict"], three["borderline"]):
        assert printed[("train.epochs", "3")]["median final val loss"] == f"{three['final_val_loss']:.3g}"
    assert not [cell for r in printed.values() for cell in r.values() if "NaN" in cell]
    # the table's title names every unstable verdict (it once said "exploding, scream or nan")
    assert "unstable (nan, exploding, diverged, scream) per factor value" in " ".join(result.output.split())


def test_runs_csv_has_every_number_of_every_run_and_keeps_nan(runs, reported):
    _, out = reported
    raw = pd.read_csv(out / "runs.csv", dtype=str, keep_default_na=False)  # the cells as written
    table = pd.read_csv(out / "runs.csv", keep_default_na=False, na_values=["", "NaN"])  # verdict 'nan' stays a word
    assert len(table) == 6
    for i, row in table.iterrows():
        s = read_json(runs / row["path"] / "summary.json")
        assert row["verdict"] == s["verdict"]
        if s["verdict"] == "failed":
            assert raw.loc[i, "final_loss"] == "" and "InjectedCrash" in raw.loc[i, "error"]
            continue
        for e, (mean, mx) in enumerate(zip(s["grad_norm_by_epoch"], s["grad_norm_max_by_epoch"]), start=1):
            for col, want in (
                (f"grad_mean_e{e}", mean),
                (f"grad_max_e{e}", mx),
                (f"loss_e{e}", s["loss_by_epoch"][e - 1]),
            ):
                if math.isnan(want):
                    assert raw.loc[i, col] == "NaN", col
                else:
                    assert row[col] == want, col
        for key in ("final_loss", "final_val_loss", "clip_rate", "latent_scale", "wall_s"):
            assert (raw.loc[i, key] == "NaN") if math.isnan(s[key]) else (row[key] == s[key]), key
        assert row["epochs_run"] == s["epochs_run"] and row["steps"] == s["steps"]
        nan = s["first_nan"]
        if nan is None:
            assert raw.loc[i, "first_nan_epoch"] == ""  # not applicable: empty, never 0
        else:
            assert (row["first_nan_epoch"], row["first_nan_batch"], row["first_nan_module"]) == (
                nan["epoch"],
                nan["batch"],
                nan["module"],
            )
            assert raw.loc[i, "first_nan_loss"] == "NaN" and raw.loc[i, "final_loss"] == "NaN"


def _png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    return img


def test_plots_are_real_images_embedded_in_the_markdown(runs, reported):
    _, out = reported
    md = (out / "report.md").read_text()
    img = _png(out / "plots" / "grad_norm.png")
    pure_red = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] < 0.1)
    assert pure_red.sum() > 30  # the red X where the NaN run went non-finite
    assert "](plots/grad_norm.png)" in md
    unstable = [d for d in run_dirs(runs) if vd.is_unstable(read_json(d / "summary.json")["verdict"])]
    heatmaps = sorted((out / "plots").glob("heatmap_*.png"))
    assert len(heatmaps) == len(unstable) >= 1
    for h in heatmaps:
        _png(h)
        assert f"](plots/{h.name})" in md
    assert "e2 b2 stage2.layer0.mlp" in md and "| NaN |" in md
    assert "InjectedCrash" in md  # the crashed run is in the warnings section


def test_each_run_gets_its_per_step_plot_and_the_nan_run_its_departure(runs, reported):
    _, out = reported
    md = (out / "report.md").read_text()
    trained = [d for d in run_dirs(runs) if (d / "metrics.jsonl").exists() and (d / "metrics.jsonl").stat().st_size]
    steps = sorted((out / "plots" / "steps").glob("*.png"))
    assert len(steps) == len(trained) >= 5  # the crashed run recorded no step
    for p in steps:
        _png(p)
        assert f"](plots/steps/{p.name})" in md
    _png(out / "plots" / "grouped.png")
    _png(out / "plots" / "departure.png")
    from stability.report import load_run
    from stability.report.steps import departures, detect_settings, load_steps

    nan_dir = by_summary(runs, "nan")
    dep = departures(load_steps(load_run(nan_dir)), detect_settings(load_run(nan_dir)))
    assert min(v for v in dep.values() if v is not None) <= 6  # by the first NaN at the latest
    assert "## Which module group left its band first" in md


def test_report_html_opens_in_a_real_browser_with_the_answer_and_every_run(runs, reported, tmp_path):
    """Headless Chromium over the DevTools protocol: no console error, no request but the file
    itself, the answer sentence and a link to each run's section, sorting by a column works, and
    the screenshot is not blank."""
    from tests.browser import Browser, chromium

    if chromium() is None:
        pytest.skip("no chromium (apt-get install chromium; .ci/run installs it)")
    output, out = reported
    page = out / "report.html"
    sentence = next(
        line
        for line in output.output.splitlines()
        if line.startswith(("Decisive", "All", "The one", "No run")) or re.match(r"\d+/\d+ runs unstable", line)
    )
    with Browser() as b:
        b.open(page)
        assert b.errors == []
        assert b.eval("document.documentElement.getAttribute('data-ready')") == "1"
        assert b.eval("document.documentElement.getAttribute('data-errors')") is None
        assert [u for u in b.requests if not u.startswith("data:")] == [page.resolve().as_uri()]  # offline
        shown = b.eval("document.getElementById('answer').textContent")
        # the terminal wraps a long answer over lines; the page holds it whole
        assert shown.startswith(sentence.strip()) and " ".join(shown.split()) in " ".join(output.output.split())
        links = b.eval("Array.from(document.querySelectorAll('#runs-table tbody a')).map(a => a.getAttribute('href'))")
        assert len(links) == len(run_dirs(runs))
        headings = b.eval("Array.from(document.querySelectorAll('section.run')).map(s => '#' + s.id)")
        assert links == headings  # every run has its section, each linked
        rels = b.eval("Array.from(document.querySelectorAll('section.run p.muted')).map(p => p.textContent)")
        assert all(any(p.startswith(os.path.relpath(d, runs)) for p in rels) for d in run_dirs(runs))
        images = b.eval("Array.from(document.images).map(i => i.naturalWidth)")
        assert len(images) >= 3 + len(run_dirs(runs)) - 1 and all(w > 200 for w in images)  # all decoded
        col = "final loss"
        b.eval(f"Array.from(document.querySelectorAll('#runs-table th')).find(t => t.textContent == '{col}').click()")
        idx = b.eval(
            f"Array.from(document.querySelectorAll('#runs-table th')).findIndex(t => t.textContent == '{col}')"
        )
        cells = b.eval(
            f"Array.from(document.querySelectorAll('#runs-table tbody tr')).map(r => r.cells[{idx}].textContent)"
        )
        numbers = [float(c) for c in cells if c not in ("-", "NaN", "inf")]
        assert numbers == sorted(numbers) and len(numbers) >= 4
        shot = tmp_path / "shot.png"
        shot.write_bytes(b.screenshot())
        assert b.errors == []
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert (img.min(axis=2) < 0.9).mean() > 0.02 and img.std() > 0.05  # text and tables, not a blank page


def test_show_plot_draws_the_run_per_step(runs):
    nan_dir = by_summary(runs, "nan")
    result = invoke("show", nan_dir, "--plot")
    assert f"per-step plot: {nan_dir / 'plots' / 'steps.png'}" in result.output.replace("\n", "")
    _png(nan_dir / "plots" / "steps.png")


def test_damaged_and_unfinished_runs_are_listed_with_warnings(runs, tmp_path):
    grid = run_dirs(runs / "grid")
    damaged = tmp_path / "damaged"
    names = ["truncated", "corrupt_metrics", "missing_files", "running", "bad_status", "inf"]
    for name, src in zip(names, grid + grid[:2]):
        shutil.copytree(src, damaged / name)
    shutil.copytree(by_summary(runs, "nan"), damaged / "nan")
    text = (damaged / "truncated/summary.json").read_text()
    (damaged / "truncated/summary.json").write_text(text[: len(text) // 2])
    lines = (damaged / "corrupt_metrics/metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (damaged / "corrupt_metrics/metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "lo')
    for f in ("overrides.json", "grad_norms.csv", "events.jsonl", "data.json"):
        (damaged / "missing_files" / f).unlink()
    status = read_json(damaged / "running/status.json")
    status.update(state="running", finished=None, pid=os.getpid(), verdict=None)
    (damaged / "running/status.json").write_text(json.dumps(status))
    (damaged / "running/summary.json").unlink()
    (damaged / "running/.lease").unlink(missing_ok=True)  # no lease: judged by its pid, alive (this process)
    (damaged / "bad_status/status.json").write_text('{"state": "compl')
    summary = read_json(damaged / "inf/summary.json")
    summary["grad_norm_by_epoch"][-1] = math.inf
    (damaged / "inf/summary.json").write_text(json.dumps(summary))

    out = tmp_path / "out"
    result = invoke("report", damaged, "--out", out)
    rows = {r["run"]: r for r in table_with(result.output, "verdict")}
    assert set(rows) == set(names) | {"nan"}  # nobody hidden
    assert rows["running"]["state"] == "running" and rows["running"]["verdict"] == "running"
    assert rows["running"]["grad norm per epoch"] != "-"  # partial numbers from epochs.jsonl
    assert rows["bad_status"]["state"] == "unknown"
    assert rows["inf"]["grad norm per epoch"].split()[-1] == "inf"
    assert rows["nan"]["first NaN"] == "e2 b2 stage2.layer0.mlp"
    for needle in (
        "truncated: summary.json unreadable",
        "corrupt_metrics: metrics.jsonl: 2 unparsable line(s)",
        "missing_files: no overrides.json",
        "running: still running",
        "bad_status: status.json unreadable",
    ):
        assert needle in result.output, needle
    csv = pd.read_csv(out / "runs.csv", dtype=str, keep_default_na=False).set_index("path")
    assert csv.loc["inf", f"grad_mean_e{len(summary['grad_norm_by_epoch'])}"] == "inf"
    assert csv.loc["nan", "final_loss"] == "NaN"
    assert "still running" in csv.loc["running", "warnings"]
    _png(out / "plots" / "grad_norm.png")


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_nothing_to_report_is_one_line_and_exit_2(tmp_path, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("hi")
    result = invoke("report", target, code=2)
    assert result.output.strip().count("\n") == 0 and "error:" in result.output
    assert {"missing": "no such folder", "empty": "no run folders", "file": "not a folder"}[make] in result.output


def test_show_prints_groups_stages_events_codec_and_config_diff(runs):
    nan_dir = by_summary(runs, "nan")
    result = invoke("show", nan_dir)
    tables = rich_tables(result.output)
    grads = tables[0]
    groups = dict.fromkeys(read_grad_table(nan_dir / "grad_norms.csv")["group"])  # long: a row per epoch and group
    assert [r["group"] for r in grads] == list(groups)
    total = next(r for r in grads if r["group"] == "total")
    summary = read_json(nan_dir / "summary.json")
    assert total["e1"] == f"{summary['grad_norm_by_epoch'][0]:.3g}" and total["e2"] == "NaN" and total["max"] == "NaN"
    stages = next(t for t in tables if t and "needed ratio" in t[0])
    assert len(stages) == summary["epochs_run"] * len(summary["stage_rms_last_epoch"])
    events = next(t for t in tables if t and "event" in t[0])
    recorded = [json.loads(line)["event"] for line in (nan_dir / "events.jsonl").read_text().splitlines()]
    assert sorted(r["event"] for r in events) == sorted(recorded) and "first_nan" in recorded
    nan_event = next(r for r in events if r["event"] == "first_nan")
    assert (nan_event["epoch"], nan_event["batch"], nan_event["step"]) == ("2", "2", "6")
    assert "codec: weights random" in result.output
    diff = {r["key"]: (r["default"], r["this run"]) for r in next(t for t in tables if t and "key" in t[0])}
    assert diff["fault.nan_at_step"] == ("null", "6")
    assert "model.d_model" in diff  # the smoke preset


def test_the_replay_command_a_nan_event_names_runs_as_printed_from_a_path_with_a_space_and_a_quote(runs, tmp_path):
    """The first_nan event names `stab replay RUN_DIR`, quoted for the shell; copied and pasted
    (shlex.split, as a shell would) it replays the step. It used to print the forensics file
    (`stab replay forensics/state.pt`), which replay refuses as not a run folder."""
    import shlex

    from stability.report import events_frame
    from stability.report.loading import load_run

    moved = tmp_path / "my runs" / "it's here"
    shutil.copytree(by_summary(runs, "nan"), moved)
    details = next(d for e, d in events_frame(load_run(moved)).loc[:, ["event", "details"]].values if e == "first_nan")
    command = shlex.split(details.rsplit(": ", 1)[1])
    assert command == ["stab", "replay", str(moved)]
    result = invoke(*command[1:])
    assert f"from {moved}" in " ".join(result.output.split()) and "first non-finite" in result.output


def test_show_refuses_a_folder_that_is_not_a_run(runs):
    result = invoke("show", runs / "grid", code=2)
    assert "not a run folder" in result.output and "norm=" in result.output
    invoke("show", runs / "nope", code=2)


def test_report_library_imports_no_cli_or_config_framework():
    code = (
        "import sys, stability.report; bad = [m for m in ('typer', 'rich', 'hydra', 'omegaconf') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_report_adds_lr_sensitivity_when_the_sweep_varies_the_learning_rate(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    swept = runner.invoke(
        app,
        [
            "sweep",
            "--runs",
            str(tmp_path),
            "--name",
            "lr",
            "model=charlm",
            "preset=smoke",
            "train.lr=1e-3,1e-2",
            "train.threads=1",
        ],
    )
    assert swept.exit_code == 0, swept.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "learning-rate sensitivity" in result.output
    table = pd.read_csv(tmp_path / "lr_sensitivity.csv")
    assert len(table) == 1 and table.loc[0, "n_lr"] == 2
    assert table.loc[0, "lr_sensitivity"] >= 0.0  # mean loss above the best LR's: never negative
    assert "## Learning-rate sensitivity" in (tmp_path / "report.md").read_text()
    # judged on the validation loss, not the last training batch's
    vals = [read_json(p)["final_val_loss"] for p in (tmp_path / "lr").glob("*/summary.json")]
    assert table.loc[0, "best_final_loss"] == pytest.approx(min(vals), rel=1e-6)


def test_factors_compare_resolved_values_not_override_spellings(tmp_path):
    from stability.report import Run, answer, factor_value, factors

    def run(name, overrides, norm, residual, clip, verdict):
        config = {
            "model": {"norm": norm, "residual": [1.0, 1.0, residual]},
            "train": {"clip": clip, "device": "cpu"},
            "seed": 0,
        }
        return Run(
            path=tmp_path / name,
            rel=name,
            state="completed",
            verdict=verdict,
            overrides=overrides,
            config=config,
            summary={"verdict": verdict, "final_val_loss": 1.0},
        )

    runs = [
        run("a", [], "post", 0.1, 10.0, "exploding"),  # the defaults, nothing overridden
        run("b", ["experiment=seed_fix"], "pre", 0.3, 5.0, "stable"),
        run("c", ["norm=post", "train.clip=5", "train.device=cuda"], "post", 0.1, 5.0, "exploding"),
        run("d", ["clip=10", "residual=0.3"], "post", 0.3, 10.0, "exploding"),
    ]
    keys = factors(runs)
    # train.clip and clip are one factor; the device is operational; experiment is a real override
    assert "train.device" not in keys and sum(k in ("clip", "train.clip") for k in keys) == 1
    assert [factor_value(r, "norm") for r in runs] == ["post", "pre", "post", "post"]  # no "(default)"
    assert [factor_value(r, "residual") for r in runs] == ["0.1", "0.3", "0.1", "0.3"]
    clip = next(k for k in keys if k in ("clip", "train.clip"))
    assert [factor_value(r, clip) for r in runs] == ["10", "5", "5", "10"]  # 10.0 and "10" are one value
    table, sentence = answer(runs, keys)
    # one run at pre-norm: never decisive, however clean the split; the sentence says what a test would need
    assert "Decisive" not in sentence and "norm: 0/1 unstable at pre vs 3/3 at post: untested" in sentence
    assert "Fisher's exact test needs at least 4 per value" in sentence
    row = table[(table["factor"] == "norm") & (table["value"] == "post")].iloc[0]
    assert row["unstable"] == "3/3" and row["95% interval"] == "44%..100%"  # Wilson interval of 3/3


def test_a_loss_that_went_nan_ranks_worst_in_the_median_over_seeds():
    """Two of three seeds went NaN: the median loss is non-finite, not the one finite run's 0.5;
    one of three: the median is the worse finite loss and the interval reaches non-finite."""
    from stability.report.factors import median_interval

    med, lo, hi, _ = median_interval([0.5, math.nan, math.nan], nonfinite_worst=True)
    assert (med, lo, hi) == (math.inf, 0.5, math.inf)
    med, lo, hi, cov = median_interval([0.5, 0.9, math.nan], nonfinite_worst=True)
    assert (med, lo, hi) == (0.9, 0.5, math.inf) and cov == pytest.approx(0.75)
    # without it, non-finite values are left out (the grad-norm medians, over finite maxima)
    assert median_interval([0.5, math.nan, math.nan])[0] == 0.5


@pytest.mark.slow
def test_a_fault_target_a_run_does_not_read_is_no_factor_value(tmp_path):
    """Newcomer F7: custom-model runs without a fault hold the cascade's default fault.nan_module
    (stage2.layer0.mlp, no module of theirs); beside a run that injects into blocks.0.mlp it made
    them a factor value `stage2.layer0.mlp`. Without fault.nan_at_step the key has no effect, so it
    is `(default)`; a cascade run that injects at the default module keeps it as its value."""
    from stability.report import factor_value, factors, load_runs

    tiny = ["model=custom", "model._target_=examples.gpt.build", "+model.max_chars=2500", "+model.context=16"]
    tiny += ["+model.width=16", "train.epochs=1", "train.batch_size=16"]
    invoke("run", "--runs", tmp_path, *tiny)
    invoke("run", "--runs", tmp_path, *tiny, "fault.nan_at_step=2", "fault.nan_module=blocks.0.mlp")
    invoke("run", "--runs", tmp_path, *SMOKE, "train.epochs=1", "fault.nan_at_step=2")
    runs = sorted(load_runs(tmp_path), key=lambda r: (r.config["model"]["name"], len(r.overrides or [])))
    assert [r.flat["fault.nan_module"] for r in runs] == ["stage2.layer0.mlp", "stage2.layer0.mlp", "blocks.0.mlp"]
    assert [(r.summary["first_nan"] or {}).get("module") for r in runs] == [
        "stage2.layer0.mlp",
        None,
        "blocks.0.mlp",
    ]
    assert "fault.nan_module" in factors(runs)
    assert [factor_value(r, "fault.nan_module") for r in runs] == ["stage2.layer0.mlp", "(default)", "blocks.0.mlp"]


def test_one_configuration_and_seed_trained_twice_counts_once(tmp_path):
    """Two `stab run`s of one configuration and seed into one folder are one experiment, not two
    replicates: the statistics count it once (the repeat named in the sentence), the runs table
    still lists every folder. Counting both printed 3/3 unstable over "3 runs" of 2 seeds."""
    for _ in range(2):
        invoke("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=6")
    invoke("run", "--runs", tmp_path, *SMOKE, "fault.nan_at_step=6", "seed=1")
    folders = run_dirs(tmp_path)
    assert len(folders) == 3 and [read_json(d / "summary.json")["verdict"] for d in folders] == ["nan"] * 3
    result = invoke("report", tmp_path)
    assert len(table_with(result.output, "first NaN")) == 3  # every folder is listed
    md = (tmp_path / "report.md").read_text()
    sentence = next(line for line in md.splitlines() if line.startswith("**"))
    assert "All 2 judged runs are unstable" in sentence and "2/2 unstable" in sentence, sentence
    repeat = min(folders, key=lambda d: read_json(d / "status.json")["finished"])  # the earlier of seed 0's two
    assert f"1 run(s) repeat the configuration and seed of another run ({repeat.relative_to(tmp_path)})" in sentence
    (row,) = list(csv.DictReader((tmp_path / "configs.csv").open()))
    assert (row["runs"], row["unstable"]) == ("2", "2/2")
    # seed is replication, not a factor: the by-factor table has no seed rows (it had, beside that sentence)
    assert not [r for r in csv.DictReader((tmp_path / "factors.csv").open()) if r.get("factor") == "seed"]
