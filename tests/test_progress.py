"""Long work is never silent (issue 15, kind 6): the library reports phases through
`stability.progress`, the CLI draws Rich bars with rate and ETA on a terminal and prints a line
per phase and per epoch elsewhere; a sweep's view reads each job's epoch, grad norm, verdict so
far, elapsed and ETA from its folder. No test waits on the wall clock: clocks are injected."""

from __future__ import annotations

import io
import json
import re

import pytest
import yaml
from rich.console import Console

from cli.progress import PlainReporter, TerminalReporter
from cli.sweepview import LiveView
from stability.observe import Observer
from stability.progress import phase, reporting
from stability.sweeps import job_progress, sweep_progress
from tests.conftest import SMOKE, only_run, read_jsonl


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Watch(Observer):
    """An observer of `training.run` that keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, epochs: int, batches: int) -> None:
        self.calls.append(("start", epochs, batches))

    def step(self, rec) -> None:
        self.calls.append(("step", rec["step"], rec["epoch"], rec["batch"], rec["loss"]))

    def epoch(self, erec) -> None:
        self.calls.append(("epoch", erec["epoch"], erec["loss"], erec["val_loss"]))

    def close(self, state: str) -> None:
        self.calls.append(("close", state))


def test_a_runs_observers_get_its_start_each_written_step_and_epoch_and_its_end(tmp_path, one_thread):
    from cli.config import compose_run
    from stability import training

    overrides = [*SMOKE, "train.epochs=2"]
    watch = Watch()
    training.run(compose_run(overrides), tmp_path / "run", overrides, observers=[watch])
    steps = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    epochs = read_jsonl(tmp_path / "run" / "epochs.jsonl")
    per_epoch = len(steps) // 2
    assert watch.calls[0] == ("start", 2, per_epoch) and watch.calls[-1] == ("close", "completed")
    seen = watch.calls[1:-1]
    assert [c for c in seen if c[0] == "step"] == [
        ("step", r["step"], r["epoch"], r["batch"], r["loss"]) for r in steps
    ]
    assert [c for c in seen if c[0] == "epoch"] == [("epoch", e["epoch"], e["loss"], e["val_loss"]) for e in epochs]
    assert seen.index(("epoch", 1, epochs[0]["loss"], epochs[0]["val_loss"])) == per_epoch  # after its steps

    crash = Watch()  # a crash still ends the observers, with the run's state
    with pytest.raises(training.InjectedCrash):
        training.run(compose_run([*overrides, "fault.crash_at_step=3"]), tmp_path / "crash", observers=[crash])
    assert [c[0] for c in crash.calls] == ["start", "step", "step", "step", "close"]
    assert crash.calls[-1] == ("close", "failed")


@pytest.mark.slow
def test_a_run_in_a_log_prints_its_phases_and_epochs_with_rate_and_eta(cli, tmp_path):
    out = cli(
        "run", "--runs", tmp_path / "runs", *SMOKE, "train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}"
    ).output
    assert "encoding latents: 40 clips ..." in out  # announced before the work, then its rate
    assert re.search(r"encoding latents: 40 clips done in \d+ s \([\d.e+]+ clips/s\)", out), out
    assert re.search(r"calibrating codebooks \(k-means\): 2 codebooks done in", out), out
    assert re.search(r"epoch 1/2: .* elapsed \d+ s, ETA \d+ s", out), out
    assert re.search(r"epoch 2/2: .* ETA 0 s", out), out
    report = cli("report", tmp_path / "runs").output
    assert re.search(r"drawing plots: \d+ plots done in", report) or "drawing plots: 1 plots ..." in report, report
    assert only_run(tmp_path / "runs")


def test_plain_lines_carry_count_duration_and_rate():
    buf, clock = io.StringIO(), Clock()
    r = PlainReporter(Console(file=buf, width=200), clock)
    with reporting(r):
        with phase("encoding latents", total=72, unit="clips") as p:
            for _ in range(72):
                clock.t += 0.25
                p.advance()
        with phase("evaluating epoch 1"):  # no total and short: no line
            clock.t += 0.5
        with phase("evaluating epoch 2"):
            clock.t += 3.0
    assert buf.getvalue().splitlines() == [
        "encoding latents: 72 clips ...",
        "encoding latents: 72 clips done in 18 s (4 clips/s)",
        "evaluating epoch 2: done in 3 s",
    ]


def test_terminal_bars_show_count_rate_and_eta():
    buf = io.StringIO()
    con = Console(file=buf, width=160, force_terminal=True, color_system=None)
    r = TerminalReporter(con)
    r.begin("encoding latents", 10, "clips")
    r.advance(5)
    con.print(r.progress.make_tasks_table(r.progress.tasks))
    r.end()
    text = buf.getvalue()
    assert "encoding latents" in text and "5/10" in text and "ETA" in text


def _job(root, name, state, epochs_done, total=4, started=100.0, verdict=None, collapsed=False):
    d = root / name
    d.mkdir(parents=True)
    (d / "status.json").write_text(
        json.dumps(
            {
                "state": state,
                "started": started,
                "verdict": verdict,
                "finished": started + 30 if state == "completed" else None,
            }
        )
    )
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": total}}))
    (d / "epochs.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e + 1, "grad_norm_mean": 2.5 + e, "collapsed": collapsed}) + "\n"
            for e in range(epochs_done)
        )
        + '{"epoch": torn'
    )
    return d


def test_the_sweep_view_shows_epoch_grad_norm_verdict_elapsed_and_eta(tmp_path):
    _job(tmp_path, "residual=0.1", "running", 2, collapsed=True)
    _job(tmp_path, "residual=0.3", "completed", 4, verdict="stable")
    j = job_progress(tmp_path / "residual=0.1", now=110.0)
    assert (j["epoch"], j["epochs"], j["grad_norm"], j["elapsed"], j["eta"]) == (2, 4, 3.5, 10.0, 10.0)
    assert j["verdict"] is None and j["note"] == "output collapsed at epoch 2"  # not a verdict: it may end stable
    view = LiveView(4)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(view.render(sweep_progress(tmp_path, None, 110.0)))
    rows = {
        line.split()[0]: " ".join(line.replace("│", " ").split())
        for line in buf.getvalue().splitlines()
        if line.strip().startswith("residual")
    }
    assert "running 2/4 3.5 output collapsed at epoch 2 10 s 10 s" in rows["residual=0.1"], rows
    assert "completed 4/4 5.5 stable 30 s" in rows["residual=0.3"], rows


def test_the_sweep_view_keeps_its_width_before_any_job_started(tmp_path):
    view = LiveView(4)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(view.render(sweep_progress(tmp_path, None, Clock()())))
    lines = buf.getvalue().splitlines()
    assert any("0/4 done, 0 running, 0 failed" in line for line in lines), lines  # the title on one line
    assert max(map(len, lines)) >= 100


def test_a_sweep_in_a_log_prints_a_line_per_job_and_state(cli, tmp_path):
    out = cli("sweep", "--runs", tmp_path, *SMOKE, "train.epochs=1", "residual=0.1,0.3").output
    for r in ("0.1", "0.3"):
        assert re.search(
            rf"done\] preset=smoke,residual={r},train.epochs=1: completed, epoch 1/1, grad norm [\d.]+, "
            rf"elapsed \d+ s, verdict \w+",
            out,
        ), out
