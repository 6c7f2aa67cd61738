"""Trackers (`log=tensorboard|mlflow|wandb`): what each received, read back with its own reader.

One smoke run with all three trackers and an injected NaN trains for real; each tracker's test
reads what it got (TensorBoard's EventAccumulator, `mlflow.MlflowClient`, W&B's offline
transaction log through `wandb leet inspect --json`) and compares it with the run folder, the
record of truth. A tracker whose package is not installed skips its tests; CI installs all three.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOKE, only_run, read_json, read_jsonl

ALL = "log=[tensorboard,mlflow,wandb]"
FACTORS = ("residual", "norm", "clip", "spectral_norm", "qk_norm")


@pytest.fixture(scope="module")
def offline_env():
    """The trackers' defaults: no tracking server, no W&B mode set by the user."""
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT")}
    yield
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, offline_env) -> Path:
    """preset=smoke fault.nan_at_step=6 with every tracker: the first NaN at step 6, then it stops."""
    for name in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(name)
    from typer.testing import CliRunner

    from cli.main import app

    runs = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["run", "--runs", str(runs), *SMOKE, "fault.nan_at_step=6", ALL])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "warning: tracker" not in result.output  # no tracker failed (a path may hold "tracker")
    return only_run(runs)


def same(a: float, b: float) -> bool:
    """Equal, NaN equal to NaN; the trackers may store 32-bit floats."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_run_folder_records_what_went_where(nan_run):
    stored = read_json(nan_run / "trackers.json")
    assert set(stored) == {"tensorboard", "mlflow", "wandb"}
    assert all(v["error"] is None for v in stored.values())
    assert read_json(nan_run / "summary.json")["verdict"] == "nan"


def test_tensorboard_has_every_step_the_params_and_the_first_nan(nan_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(nan_run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps = read_jsonl(nan_run / "metrics.jsonl")
    for key in ("grad/norm", "grad/stage2.layer0.mlp", "loss", "stage2/scale", "lr"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in logged] == [r["step"] for r in steps], key
        assert all(same(v, r[key]) for (_, v), r in zip(logged, steps)), key
    assert math.isnan(acc.Scalars("grad/norm")[-1].value)  # step 6: NaN stays NaN
    epochs = read_jsonl(nan_run / "epochs.jsonl")
    assert [e.value for e in acc.Scalars("epoch/val_loss")][0] == pytest.approx(epochs[0]["val_loss"], rel=1e-6)
    assert "epoch/scream/dominant" in acc.Tags()["scalars"]

    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    )
    assert set(FACTORS) <= set(start.hparams)
    assert start.hparams["norm"].string_value == "post" and start.hparams["fault.nan_at_step"].number_value == 6
    assert "log" not in start.hparams  # operational

    def text(tag: str) -> str:
        return acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()

    first_nan = json.loads(text("event/first_nan/text_summary"))
    assert first_nan["step"] == 6 and first_nan["module"] == "stage2.layer0.mlp"
    assert acc.Tensors("event/first_nan/text_summary")[0].step == 6
    assert text("summary/verdict/text_summary").startswith("**nan**")


def test_mlflow_has_every_step_the_params_and_the_first_nan(nan_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=read_json(nan_run / "trackers.json")["mlflow"]["tracking_uri"])
    assert client.tracking_uri == f"sqlite:///{nan_run.parent.parent / 'mlflow' / 'mlflow.db'}"  # inside --runs
    exp = client.get_experiment_by_name("run")  # `stab run`'s parent folder
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == nan_run.name and run.info.status == "FINISHED"
    assert run.info.run_id == read_json(nan_run / "trackers.json")["mlflow"]["run_id"]
    steps = read_jsonl(nan_run / "metrics.jsonl")
    for key in ("grad/norm", "grad/stage2.layer0.mlp", "time/step_ms"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in logged] == [r["step"] for r in steps], key
        assert all(same(v, r[key]) for (_, v), r in zip(logged, steps)), key
    params = run.data.params
    assert {f: params[f] for f in FACTORS} == {
        "residual": "0.1",
        "norm": "post",
        "clip": "10.0",
        "spectral_norm": "False",
        "qk_norm": "False",
    }
    assert "log" not in params and run.data.tags["stab.log"] == '["tensorboard", "mlflow", "wandb"]'
    tags = run.data.tags
    assert tags["verdict"] == "nan" and "stage2.layer0.mlp" in tags["first_nan"]
    assert json.loads(tags["event.first_nan.step_6"])["module"] == "stage2.layer0.mlp"
    assert run.data.metrics["summary/first_nan_step"] == 6


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's offline transaction log(s), in order, read by W&B's own CLI."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    out = []
    for f in files:
        text = subprocess.run(
            [shutil.which("wandb") or "wandb", "leet", "inspect", "--json", str(f)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        ).stdout  # 900 s: a ceiling against a hang, not a wait
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def test_wandb_offline_has_every_step_the_config_and_the_first_nan(nan_run):
    records = wandb_records(nan_run)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_group"] == "run" and run["display_name"] == nan_run.name and run["project"] == "stab"
    assert run["run_id"] == read_json(nan_run / "trackers.json")["wandb"]["id"]
    assert run["telemetry"]["feature"]["offline"]
    config = run["config"]["update"]
    assert {f: config[f] for f in ("residual", "norm", "clip")} == {"residual": 0.1, "norm": "post", "clip": 10.0}
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = read_jsonl(nan_run / "metrics.jsonl")
    logged = {h["step"]: h["grad/norm"] for h in history if "grad/norm" in h}
    assert sorted(logged) == [r["step"] for r in steps]
    # W&B writes non-finite numbers as the JSON constants NaN / Infinity / -Infinity
    assert all(same(float(logged[r["step"]]), r["grad/norm"]) for r in steps)
    assert logged[6] == "NaN"
    (event,) = [h for h in history if "event/first_nan" in h]
    assert event["step"] == 6 and json.loads(event["event/first_nan"])["module"] == "stage2.layer0.mlp"
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["verdict"] == "nan" and summary["first_nan"]["module"] == "stage2.layer0.mlp"
    assert [r for r in records if r["type"] == "exit"][-1]["exit"].get("exit_code", 0) == 0


def test_nonfinite_values_as_each_tracker_stores_them(nan_run, tmp_path):
    """What a user sees for NaN, +inf and -inf: TensorBoard and W&B keep all three; MLflow's SQL
    store keeps NaN and turns +-inf into the largest double."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stability.trackers import MlflowTracker, TensorBoardTracker, WandbTracker

    values = [math.nan, math.inf, -math.inf, 1.5]
    job = tmp_path / "nonfinite" / "job"
    job.mkdir(parents=True)
    tb = TensorBoardTracker(job, {"norm": "pre"}, {}, resumed=False)
    ml = MlflowTracker(job, nan_run.parent.parent, "nonfinite", {"norm": "pre"}, {}, {}, {})
    wb = WandbTracker(job, "nonfinite", {"norm": "pre"}, {}, {})
    for t in (tb, ml, wb):
        for step, v in enumerate(values):
            t.log({"x": v}, step)
        t.close("completed")

    acc = EventAccumulator(str(job / "tb"))
    acc.Reload()
    tb_values = [e.value for e in acc.Scalars("x")]
    assert math.isnan(tb_values[0]) and tb_values[1:] == [math.inf, -math.inf, 1.5]

    client = MlflowClient(tracking_uri=ml.uri)
    ml_values = [m.value for m in sorted(client.get_metric_history(ml.run_id, "x"), key=lambda m: m.step)]
    assert math.isnan(ml_values[0]) and ml_values[1:] == [sys.float_info.max, -sys.float_info.max, 1.5]

    history = [r["history"]["item"] for r in wandb_records(job) if r["type"] == "history"]
    assert [h["x"] for h in history] == ["NaN", "Infinity", "-Infinity", 1.5]


def test_a_failing_tracker_warns_once_and_the_run_goes_on(cli, tmp_path, monkeypatch, offline_env):
    pytest.importorskip("tensorboard")
    from stability import trackers

    calls = []

    def full_disk(self, metrics, step):
        calls.append(step)
        if len(calls) >= 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoardTracker, "log", full_disk)
    result = cli("run", "--runs", tmp_path, *SMOKE, "train.epochs=2", "log=tensorboard")
    warned = [x for x in result.stderr.splitlines() if x.startswith("warning: tracker")]  # not a path's "tracker"
    assert len(warned) == 1 and warned[0].startswith("warning: tracker tensorboard failed"), result.stderr
    assert "No space left on device" in warned[0]  # one line of stab's, not a Python warning with its source
    assert len(calls) == 3  # switched off at the failure: never called again
    run = only_run(tmp_path)
    assert read_json(run / "status.json")["state"] == "completed"
    assert len(read_jsonl(run / "metrics.jsonl")) == read_json(run / "summary.json")["steps"]
    assert "No space left" in read_json(run / "trackers.json")["tensorboard"]["error"]


@pytest.mark.slow
def test_sweep_groups_its_jobs_and_a_rerun_continues_the_same_tracker_runs(cli, tmp_path, offline_env):
    for name in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(name)
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ("sweep", "--runs", tmp_path, "--name", "grid", *SMOKE, "train.epochs=2", "norm=pre,post", ALL)
    cli(*args)
    jobs = sorted(p for p in (tmp_path / "grid").iterdir() if (p / "summary.json").exists())
    assert [j.name for j in jobs] == ["norm=post,preset=smoke,train.epochs=2", "norm=pre,preset=smoke,train.epochs=2"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grid")
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == [j.name for j in jobs]
    first = {j.name: read_json(j / "trackers.json") for j in jobs}
    assert all(r["run"]["run_group"] == "grid" for j in jobs for r in wandb_records(j) if r["type"] == "run")

    # the first job was interrupted: the same command again re-runs it into the same tracker runs
    job = jobs[0]
    status = read_json(job / "status.json")
    (job / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    cli(*args)
    again = read_json(job / "trackers.json")
    assert again["mlflow"]["run_id"] == first[job.name]["mlflow"]["run_id"] and again["mlflow"]["attempt"] == 2
    assert again["wandb"]["id"] == first[job.name]["wandb"]["id"]
    assert again["wandb"]["next_step"] > first[job.name]["wandb"]["next_step"]
    assert read_json(jobs[1] / "trackers.json") == first[jobs[1].name]  # completed: skipped, untouched
    assert len(client.search_runs([exp.experiment_id])) == 2
    run = client.get_run(again["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stab.attempt"] == "2"
    # W&B: a second offline run of the same id, resumed, its internal steps after the first's
    runs = [r for r in wandb_records(job) if r["type"] == "run"]
    assert len(runs) == 2 and {r["run"]["run_id"] for r in runs} == {again["wandb"]["id"]}
    internal = [r["history"]["step"].get("num", 0) for r in wandb_records(job) if r["type"] == "history"]
    assert internal == sorted(internal) and len(set(internal)) == len(internal)
    # TensorBoard: the re-run's purge marker drops the first attempt's points; each step once
    acc = EventAccumulator(str(job / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = read_jsonl(job / "metrics.jsonl")
    assert [e.step for e in acc.Scalars("grad/norm")] == [r["step"] for r in steps]
    assert all(same(e.value, r["grad/norm"]) for e, r in zip(acc.Scalars("grad/norm"), steps))


def test_bad_tracker_names_and_missing_packages_stop_before_any_work(cli, tmp_path, monkeypatch):
    result = cli("run", "--runs", tmp_path, *SMOKE, "log=tensorbord", ok=False)
    assert result.exit_code == 2
    assert "log='tensorbord' is not allowed: expected one of tensorboard, mlflow, wandb" in result.output
    assert len(result.output.strip().splitlines()) == 1

    from stability import trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    result = cli("run", "--runs", tmp_path, *SMOKE, "log=[tensorboard,wandb]", ok=False)
    assert result.exit_code == 2 and "pip install wandb" in result.output
    assert not (tmp_path / "run").exists()  # nothing started
    result = cli("sweep", "--runs", tmp_path, *SMOKE, "norm=pre,post", "log=wandb", ok=False)
    assert result.exit_code == 2 and "pip install wandb" in result.output


def test_log_is_operational_and_without_it_no_tracker_is_imported(tmp_path):
    from cli.config import compose_run
    from cli.launch import OPERATIONAL

    assert compose_run(["log=[tensorboard,mlflow]"]).identity() == compose_run([]).identity()
    assert compose_run(["log=none"]).log == [] and compose_run(["log=wandb"]).log == ["wandb"]
    assert "log" in OPERATIONAL  # not in a job folder's name

    code = (
        "import sys; from pathlib import Path; from stability.config import RunConfig; "
        "from stability import training; from stability.trackers import open_trackers; "
        f"r = open_trackers(RunConfig(), Path({str(tmp_path)!r}) / 'job'); r.step({{'step': 0, 'loss': 1.0}}); "
        "r.close('completed'); "
        "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "job" / "trackers.json").exists()
