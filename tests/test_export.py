"""`stab export RUN_OR_SWEEP --to tensorboard|mlflow|wandb`: a finished run's records sent after
the fact through the trackers' own code, read back with each tracker's own reader, and a second
export that sends nothing twice."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest

from stability import export as ex
from stability.storage import read_jsonl as read_records
from tests import test_trackers
from tests.conftest import SMOKE, only_run, read_json, read_jsonl
from tests.test_trackers import same, wandb_records

offline_env = test_trackers.offline_env  # the fixture: no tracking server, no W&B mode set


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, latent_cache) -> Path:
    """preset=smoke with a NaN at step 6 that the run skips (train.on_nan=skip), no tracker."""
    from typer.testing import CliRunner

    from cli.main import app

    runs = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["run", "--runs", str(runs), *SMOKE, "fault.nan_at_step=6", "train.on_nan=skip"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return only_run(runs)


@pytest.fixture
def run_copy(plain_run, tmp_path) -> Path:
    dest = tmp_path / "runs" / "run" / plain_run.name
    shutil.copytree(plain_run, dest)
    return dest


def test_tensorboard_export_has_every_step_once_after_two_exports(cli, run_copy, offline_env):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = cli("export", run_copy, "--to", "tensorboard")
    steps = read_jsonl(run_copy / "metrics.jsonl")
    assert f"sent {len(steps)} steps" in first.output
    second = cli("export", run_copy, "--to", "tensorboard")
    assert "up to date, nothing sent" in second.output
    acc = EventAccumulator(str(run_copy / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in ("loss", "grad/norm", "grad/stage2.layer0.mlp"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in logged] == [r["step"] for r in steps], key  # each once
        assert all(same(v, r[key]) for (_, v), r in zip(logged, steps)), key
    assert math.isnan(acc.Scalars("loss")[6].value)
    first_nan = json.loads(acc.Tensors("event/first_nan/text_summary")[0].tensor_proto.string_val[0].decode())
    assert first_nan["step"] == 6
    assert len(acc.Scalars("epoch/val_loss")) == len(read_jsonl(run_copy / "epochs.jsonl"))


def test_mlflow_export_is_idempotent_and_sends_only_what_is_new(cli, run_copy, offline_env):
    """Exported when it had two epochs, then again when it had all four: every step once."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    full = {name: (run_copy / name).read_text() for name in ("metrics.jsonl", "epochs.jsonl", "summary.json")}
    status = read_json(run_copy / "status.json")
    (run_copy / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in full["metrics.jsonl"].splitlines() if json.loads(line)["epoch"] <= 2)
    )
    (run_copy / "epochs.jsonl").write_text("".join(full["epochs.jsonl"].splitlines(keepends=True)[:2]))
    (run_copy / "summary.json").unlink()
    (run_copy / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    part = cli("export", run_copy.parent.parent, "--to", "mlflow")  # the folder of runs
    n_part = len(read_jsonl(run_copy / "metrics.jsonl"))
    assert f"sent {n_part} steps, 2 epochs" in part.output
    for name, text in full.items():
        (run_copy / name).write_text(text)
    (run_copy / "status.json").write_text(json.dumps(status))
    rest = cli("export", run_copy, "--to", "mlflow")
    steps = read_jsonl(run_copy / "metrics.jsonl")
    assert f"sent {len(steps) - n_part} steps, 2 epochs" in rest.output and "the summary" in rest.output
    assert "nothing sent" in cli("export", run_copy, "--to", "mlflow").output

    stored = read_json(run_copy / "trackers.json")
    client = MlflowClient(tracking_uri=stored["mlflow"]["tracking_uri"])
    run_id = stored["mlflow"]["run_id"]
    for key in ("grad/norm", "loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in logged] == [r["step"] for r in steps], key
        assert all(same(v, r[key]) for (_, v), r in zip(logged, steps)), key
    assert len(client.get_metric_history(run_id, "epoch/val_loss")) == 4
    run = client.get_run(run_id)
    assert run.data.tags["verdict"] == read_json(run_copy / "summary.json")["verdict"]
    assert run.info.status == "FINISHED"


def test_wandb_export_twice_has_every_step_once(cli, run_copy, offline_env):
    pytest.importorskip("wandb")
    cli("export", run_copy, "--to", "wandb")
    assert "nothing sent" in cli("export", run_copy, "--to", "wandb").output
    records = wandb_records(run_copy)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = read_jsonl(run_copy / "metrics.jsonl")
    logged = [(h["step"], h["grad/norm"]) for h in history if "grad/norm" in h]
    assert [s for s, _ in logged] == [r["step"] for r in steps]
    assert all(same(float(v), r["grad/norm"]) for (_, v), r in zip(logged, steps))
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == read_json(run_copy / "trackers.json")["wandb"]["id"]


def test_a_run_logged_live_is_not_sent_again(cli, tmp_path, offline_env):
    pytest.importorskip("tensorboard")
    cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=1", "log=tensorboard")
    run = only_run(tmp_path)
    before = sorted(p.name for p in (run / "tb").iterdir())
    assert "tensorboard: up to date, nothing sent" in cli("export", run, "--to", "tensorboard").output
    assert sorted(p.name for p in (run / "tb").iterdir()) == before


def test_bad_target_and_bad_folder_stop_before_any_work(cli, run_copy):
    result = cli("export", run_copy, "--to", "tensorbord", ok=False)
    assert result.exit_code == 2
    assert "Unsupported export target: 'tensorbord' (allowed: tensorboard, mlflow, wandb" in result.output
    assert not (run_copy / "trackers.json").exists()
    result = cli("export", run_copy / "nope", "--to", "mlflow", ok=False)
    assert result.exit_code == 2 and "nope: no such folder" in result.output


def test_a_running_run_is_refused_with_its_reason(cli, run_copy):
    """A folder whose writer is alive (no lease, the status's pid is this process)."""
    from stability.rundirs import LEASE

    (run_copy / LEASE).unlink(missing_ok=True)
    status = read_json(run_copy / "status.json")
    (run_copy / "status.json").write_text(
        json.dumps({**status, "state": "running", "pid": os.getpid(), "host": socket.gethostname()})
    )
    result = cli("export", run_copy, "--to", "tensorboard", ok=False)
    assert result.exit_code == 1 and "still running" in result.output
    assert not (run_copy / "tb").exists()


def test_the_registry_takes_a_new_target(cli, run_copy, tmp_path, monkeypatch):
    """What a bad-step format adds: a Target whose send writes a file; the CLI routes to it."""

    def send(run, out):
        steps, _ = read_records(run.path / "metrics.jsonl")
        bad = [s["step"] for s in steps if not s["finite"]]
        (out / "bad.json").write_text(json.dumps(bad))
        return f"wrote {len(bad)} bad steps"

    monkeypatch.setitem(ex.TARGETS, "badsteps", ex.Target("badsteps", "bad steps as JSON", send))
    result = cli("export", run_copy, "--to", "badsteps", "--out", tmp_path)
    assert "wrote 1 bad steps" in result.output
    assert json.loads((tmp_path / "bad.json").read_text()) == [6]
