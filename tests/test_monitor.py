"""stab's monitor in your own loop: the records a plain loop writes are the ones stab's loop writes,
the verdict and events are live, and stab's readers (report, show, replay) read its folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stability.monitor import Monitor
from stability.storage import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
CEILING_S = 600  # a generous ceiling for a subprocess on a busy 2-core machine, not a timing
TINY = {"max_chars": 2500, "context": 16, "width": 16}


def _tiny_gpt():
    from examples.gpt import build

    torch.manual_seed(0)
    return build(**TINY)


def _loop(monitor: Monitor, task: dict, epochs: int, steps: int, nan_at: int | None = None) -> None:
    model, loss_fn, (x, y) = task["model"], task["loss"], task["train"]
    k = 0
    for _ in range(epochs):
        for b in range(steps):
            idx = torch.arange(b * 8, b * 8 + 8)
            loss = loss_fn(model(x[idx]), y[idx])
            if k == nan_at:
                loss = loss * float("nan")
            monitor.step(loss, batch=(x[idx], y[idx]), indices=idx)
            k += 1
            if monitor.should_stop:
                break
        monitor.end_epoch()
        if monitor.should_stop:
            break


def test_a_plain_loop_writes_the_records_stabs_loop_writes(cli, tmp_path, one_thread):
    task = _tiny_gpt()
    opt = torch.optim.AdamW(task["model"].parameters(), lr=3e-3)
    with Monitor(
        task["model"],
        opt,
        run_dir=tmp_path / "own",
        loss=task["loss"],
        val=task["val"],
        clip=1.0,
        config=TINY,
        factory="examples.gpt.build",
        epochs=2,
    ) as monitor:
        assert monitor.verdict == "running"
        _loop(monitor, task, epochs=2, steps=4)
        assert monitor.verdict in ("stable", "exploding", "scream")  # live, before the summary
    steps, _ = read_jsonl(tmp_path / "own" / "metrics.jsonl")
    epochs, _ = read_jsonl(tmp_path / "own" / "epochs.jsonl")
    assert [s["step"] for s in steps] == list(range(8)) and [s["epoch"] for s in steps] == [1] * 4 + [2] * 4
    assert all(s["finite"] and s["grad/norm"] > 0 for s in steps)
    assert [s["grad/clipped"] for s in steps] == [s["grad/norm"] > 1.0 for s in steps]  # clip=1.0, measured before
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["val_loss"] > 0 for e in epochs)
    assert set(epochs[-1]["health"]) == {"blocks.0", "blocks.1"}
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert summary["verdict"] == monitor.summary["verdict"] and summary["steps"] == 8

    # stab's own loop on the same model writes the same kinds of records
    cli(
        "run",
        "--runs",
        tmp_path / "runs",
        "model=custom",
        "model._target_=examples.gpt.build",
        *(f"+model.{k}={v}" for k, v in TINY.items()),
        "train.epochs=1",
        "train.batch_size=64",
    )
    run = next((tmp_path / "runs").rglob("summary.json")).parent
    their_steps, _ = read_jsonl(run / "metrics.jsonl")
    their_epochs, _ = read_jsonl(run / "epochs.jsonl")
    # stab's loop also records the optimizer-state and output signals (stability/optstate.py: measured after
    # its own optimizer step; the Monitor records a step before yours) and nothing else
    own_loop_only = ("update_rel/", "adam_m/", "adam_v/", "eps_share/", "lm/")
    assert {k for k in their_steps[0] if not k.startswith(own_loop_only)} == set(steps[0])
    assert set(their_epochs[0]) == set(epochs[0])
    assert (run / "grad_norms.csv").read_text().splitlines()[0] == (
        tmp_path / "own" / "grad_norms.csv"
    ).read_text().splitlines()[0]

    result = cli("show", tmp_path / "own")
    assert "blocks.1.attn" in result.output and "verdict" in result.output
    cli("report", tmp_path / "own")


def test_the_first_nan_is_live_located_skipped_and_replayable(cli, tmp_path, one_thread):
    task = _tiny_gpt()
    model = task["model"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with Monitor(
        model,
        opt,
        run_dir=tmp_path / "own",
        loss=task["loss"],
        val=task["val"],
        config=TINY,
        factory="examples.gpt.build",
    ) as monitor:
        model_before = {}  # the weights just before the non-finite step
        orig_step = monitor.step

        def step(loss, **kw):
            if monitor.global_step == 3:
                model_before.update({k: v.clone() for k, v in model.state_dict().items()})
            finite = orig_step(loss, **kw)
            if monitor.global_step == 4:
                assert not finite and monitor.verdict == "nan" and monitor.should_stop
                assert monitor.events[-1]["event"] == "first_nan" and monitor.events[-1]["step"] == 3
            return finite

        monitor.step = step
        _loop(monitor, task, epochs=2, steps=6, nan_at=3)
    for k, v in model.state_dict().items():  # the optimizer skipped the non-finite step
        assert torch.equal(v, model_before[k]), k
    summary = monitor.summary
    assert summary["verdict"] == "nan" and summary["first_nan"]["step"] == 3 and summary["steps"] == 4
    assert (tmp_path / "own" / "forensics" / "state.pt").exists()
    result = cli("replay", tmp_path / "own")
    assert "replay of step 3" in result.output


def test_monitor_bench_prints_a_measured_ratio(cli):
    result = cli(
        "bench",
        "--monitor",
        "--steps",
        "5",
        "model=custom",
        "model._target_=examples.gpt.build",
        *(f"+model.{k}={v}" for k, v in TINY.items()),
    )
    lines = result.output.splitlines()
    measured = ["monitor ratio:"]
    for name, needs in (("Lightning", ["pytorch_lightning"]), ("transformers Trainer", ["transformers", "accelerate"])):
        if all(importlib.util.find_spec(m) for m in needs):
            measured.append(f"{name} callback ratio:")
        else:
            assert any(f"{name} callback: not measured" in ln for ln in lines), result.output
    for what in measured:
        line = next(ln for ln in lines if what in ln)
        assert 0 < float(line.split(what)[1].split()[0]) < 10, result.output
    # 5 // 4 timed steps per fit, 4 fits per arm, for each callback measured
    assert sum("4 timed steps each (4 fits per arm)" in ln for ln in lines) == len(measured) - 1


@pytest.mark.slow
def test_own_loop_example_writes_a_run_folder(cli, tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/own_loop.py", "--runs", str(tmp_path), "--epochs", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=CEILING_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = next(tmp_path.rglob("summary.json")).parent
    assert run.parent.name == "own" and f"run folder: {run}" in result.stdout
    verdict = json.loads((run / "summary.json").read_text())["verdict"]
    assert f"verdict: {verdict}" in result.stdout and "verdict so far" in result.stdout
    epochs, _ = read_jsonl(run / "epochs.jsonl")
    assert len(epochs) == 2 and all(e["collapsed"] is not None for e in epochs)
    report = cli("report", tmp_path)
    assert verdict in report.output


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="pytorch-lightning not installed")
def test_lightning_callback_writes_the_same_run_folder(tmp_path, one_thread):
    import pytorch_lightning as pl

    from stability.lightning import StabCallback

    task = _tiny_gpt()
    loss_fn = task["loss"]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = task["model"]

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    x, y = task["train"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:48], y[:48]), batch_size=8)
    callback = StabCallback(str(tmp_path), loss=lambda out, y: loss_fn(out, y), val=task["val"])
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Module(), loader)
    run = callback.monitor.dir
    steps, _ = read_jsonl(run / "metrics.jsonl")
    epochs, _ = read_jsonl(run / "epochs.jsonl")
    assert len(steps) == 12 and [e["epoch"] for e in epochs] == [1, 2]
    assert {"grad/net.blocks.0.attn", "grad/net.head"} <= set(steps[0])
    assert json.loads((run / "summary.json").read_text())["verdict"] == callback.monitor.verdict


def test_a_loop_without_validation_that_blows_up_is_diverged_on_its_training_loss(tmp_path, one_thread):
    # the newcomer's Trainer run: no eval set, lr 10, loss 4.17 -> thousands, was `stable`
    verdicts = {}
    for lr in (10.0, 3e-3):
        task = _tiny_gpt()
        opt = torch.optim.AdamW(task["model"].parameters(), lr=lr)
        with Monitor(task["model"], opt, run_dir=tmp_path / f"lr{lr:g}", loss=task["loss"], epochs=3) as monitor:
            _loop(monitor, task, epochs=3, steps=4)
        summary = json.loads((tmp_path / f"lr{lr:g}" / "summary.json").read_text())
        steps, _ = read_jsonl(tmp_path / f"lr{lr:g}" / "metrics.jsonl")
        epochs, _ = read_jsonl(tmp_path / f"lr{lr:g}" / "epochs.jsonl")
        assert all(e["collapsed"] is None and e["val_loss"] != e["val_loss"] for e in epochs)  # no validation: NaN
        ratio = epochs[-1]["loss"] / steps[0]["loss"]
        assert summary["loss_ratio"] == pytest.approx(ratio)
        assert "no_validation" in {w["warning"] for w in summary["warnings"]}
        verdicts[lr] = (summary["verdict"], ratio)
    (big, big_ratio), (small, small_ratio) = verdicts[10.0], verdicts[3e-3]
    assert big_ratio > 1.1 and big in ("diverged", "exploding", "nan") and big != "stable"
    assert small_ratio < 0.9 and small != "diverged"


def test_a_loop_with_validation_is_measured_against_its_loss_at_initialisation(tmp_path, one_thread):
    task = _tiny_gpt()
    opt = torch.optim.AdamW(task["model"].parameters(), lr=3e-3)
    with Monitor(task["model"], opt, run_dir=tmp_path / "own", loss=task["loss"], val=task["val"], epochs=2) as m:
        _loop(m, task, epochs=2, steps=4)
    events, _ = read_jsonl(tmp_path / "own" / "events.jsonl")
    init = next(e for e in events if e["event"] == "init_eval")
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    epochs, _ = read_jsonl(tmp_path / "own" / "epochs.jsonl")
    assert init["val_loss"] > 0 and summary["val_loss_init"] == init["val_loss"]
    assert summary["loss_ratio"] == pytest.approx(epochs[-1]["val_loss"] / init["val_loss"])
    assert not {"no_validation", "divergence_not_judged"} & {w["warning"] for w in summary["warnings"]}


def test_doctor_try_on_an_own_loop_run_says_it_cannot_build_the_model(cli, tmp_path, one_thread):
    """A run recorded from a plain loop without a factory has no model stab can build: --try says
    so in one line (it said the value '(own loop)' needed quoting for Hydra), before any work."""
    task = _tiny_gpt()
    opt = torch.optim.AdamW(task["model"].parameters(), lr=3e-3)
    with Monitor(task["model"], opt, run_dir=tmp_path / "own", loss=task["loss"], val=task["val"], epochs=2) as m:
        _loop(m, task, epochs=2, steps=4, nan_at=5)
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["verdict"] == "nan"
    r = cli("doctor", tmp_path / "own", "--try", "--runs", tmp_path / "tries", ok=False)
    assert r.exit_code == 2 and "was recorded from your own loop" in " ".join(r.output.split())
    assert "quote" not in r.output and not (tmp_path / "tries").exists()
