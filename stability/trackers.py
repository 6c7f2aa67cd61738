"""Trackers: TensorBoard, MLflow and Weights & Biases receive the records the run folder gets.

    stab run preset=smoke log=tensorboard                  # RUN/tb/  ->  tensorboard --logdir runs/run
    stab sweep log=[tensorboard,mlflow,wandb] norm=pre,post

The training loop hands every record it writes to the run folder (each step's record, each
epoch's, each event, the summary) to one `Recorder`, which flattens it into named numbers and
fans it out to the chosen trackers behind torchtitan's small logger interface (`log(metrics,
step)`, `close()`, a no-op base). Nothing here measures: the records are host values already,
so a tracker adds no host sync. A library is imported only when its tracker is asked for; with
`log: []` (the default) none is.

Where each tracker writes, for a job RUNS/NAME/JOB/ (a sweep NAME; `stab run` uses NAME = run):
  tensorboard  event files in RUNS/NAME/JOB/tb/; RUNS/NAME is the parent folder of the sweep's runs
  mlflow       experiment NAME, run JOB, in the SQLite store RUNS/mlflow/mlflow.db (artifacts in
               RUNS/mlflow/artifacts/) unless MLFLOW_TRACKING_URI names another store
  wandb        project stab (or WANDB_PROJECT), group NAME, run JOB, offline unless WANDB_MODE is set;
               its files in RUNS/NAME/JOB/wandb/, or in WANDB_DIR/wandb/ when WANDB_DIR is set
RUN/trackers.json keeps each tracker's run id, so a re-run of the job continues the same tracker run.

Non-finite values are sent as they are. TensorBoard stores NaN, +inf and -inf (as 32-bit floats);
MLflow's SQL store keeps NaN and turns +-inf into +-1.7976931348623157e308, the largest double;
W&B writes NaN, Infinity and -Infinity into its history. Every step also carries `finite` (0/1)
and the first NaN is an event, so a non-finite step is visible whatever a chart makes of it.

A tracker that raises (its store full or gone) is switched off with one warning and noted in
trackers.json; the run goes on, and its folder stays the record of truth. The warning is one line
on the `stab.trackers` logger (the CLI prints it as `warning: ...`). A store that cannot work is
found out in seconds: a SQLite MLflow store is probed for writing before MLflow's 100 s retry
loop, an HTTP one gets short retries (`MLFLOW_HTTP_DEFAULTS`, unless set), and TensorBoard's
writer thread no longer prints a traceback beside that warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stability.config import OPERATIONAL_KEYS, SHORT_NAMES, TRACKERS, ConfigError, RunConfig, flatten
from stability.observe import Observer
from stability.record import verdicts as vd
from stability.record.records import Event, Summary
from stability.storage import read_json, write_json

PIP = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> module and pip package
STORE_FILE = "trackers.json"
# Record keys that are coordinates, not measurements.
_COORDS = ("step", "epoch", "batch")
# Per-epoch lists indexed by stage: epoch/stage{i}/<name>.
_STAGE_LISTS = {"stage_rms": "rms", "stage_ratio": "ratio", "stage_scale": "scale", "stage_clamp_rate": "clamp_rate"}


class TrackerWarning(UserWarning):
    """A tracker failed and was switched off; the run folder has every record."""


log = logging.getLogger("stab.trackers")  # the CLI prints it as one `warning:` line (cli.common.warn)
# MLflow's REST client retries a refused or timed-out call 7 times with a growing back-off (minutes
# for a server that is down); a tracker that cannot work must be found out in seconds. The user's
# own settings of these variables win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _why(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its text (SQLAlchemy adds more)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _probe_mlflow_store(uri: str) -> None:
    """Fail in well under a second, in one line, where MLflow would retry for about 100 s: a SQLite
    store that cannot be opened for writing (a read-only mount or file, a folder that cannot be
    made). MLflow tries to create its engine 10 times, sleeping 0.1 (2^k - 1) s between tries and
    logging a multi-line warning each time (`mlflow.store.db.utils.create_sqlalchemy_engine_with_retry`).
    Other SQL stores are left to MLflow; an HTTP store gets `MLFLOW_HTTP_DEFAULTS`."""
    if uri.startswith(("http://", "https://")):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        return
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if path in ("", ":memory:"):
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=5)
        try:
            con.execute("BEGIN IMMEDIATE")  # takes the write lock: refused on a read-only store
            con.rollback()
        finally:
            con.close()
    except (OSError, sqlite3.Error) as e:
        raise OSError(f"the MLflow store {uri} cannot be written: {_why(e)}") from None


WANDB_REACH_S = 5.0  # seconds to open a connection to the W&B server before calling it unreachable


def _probe_wandb_server(base_url: str, timeout: float = WANDB_REACH_S) -> None:
    """Fail in seconds, in one line, where `wandb.init` in online mode without a network retries
    for its `init_timeout` (90 s) and then raises a multi-line CommError: open one TCP connection
    to the server's host and port (a name that does not resolve fails at once, a host that does
    not answer after `timeout` s). Raises OSError naming the server and the cause."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = e.strerror if isinstance(e, socket.gaierror) else _why(e)
        raise OSError(
            f"the W&B server {base_url} cannot be reached ({why}); WANDB_MODE=offline keeps the run to sync later"
        ) from None


def _quiet_tensorboard_threads() -> None:
    """TensorBoard writes event files in a thread that re-raises a write error (a full disk) after
    storing it for the writer's next call, so Python printed a thread traceback before stab's own
    warning. The error still reaches the next `add_summary`/`close`, which the Recorder turns into
    one warning; only the duplicate traceback is dropped. Other threads' errors print as before."""
    previous = threading.excepthook
    if getattr(previous, "stab_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and getattr(args.thread, "exception", None) is not None:
            return
        previous(args)

    hook.stab_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def check_installed(names: Sequence[str]) -> None:
    """Refuse, before any work, a tracker whose package is not installed (no import: a spec lookup)."""
    for name in names:
        if importlib.util.find_spec(PIP[name]) is None:
            raise ConfigError(
                f"log={name} needs the {PIP[name]} package, which is not installed: "
                f"pip install {PIP[name]} (or pip install -e '.[trackers]' for all three)"
            )


# -- what a record becomes ---------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def step_metrics(rec: Mapping[str, Any]) -> dict[str, float]:
    """A step record's measurements under their run-folder names (`loss`, `grad/norm`,
    `grad/<group>`, `grad/clipped`, `stage{i}/rms`, ..., `lr`, `time/step_ms`, `finite`, `epoch`);
    booleans as 0/1."""
    out = {k: _number(v) for k, v in rec.items() if k not in ("step", "batch")}
    return {k: v for k, v in out.items() if v is not None}


def epoch_metrics(erec: Mapping[str, Any]) -> dict[str, float]:
    """An epoch record's numbers under `epoch/`: loss, val_loss, grad norm mean/max, clip rate,
    per-stage RMS/ratio/scale/clamp rate, scream scores of output and target, collapsed, and the
    health summary. Per-layer health, codes and samples stay in the run folder."""
    out: dict[str, float] = {"epoch/epoch": float(erec["epoch"])}
    for key, value in erec.items():
        if key in _STAGE_LISTS and isinstance(value, list):
            out.update(
                {f"epoch/stage{i}/{_STAGE_LISTS[key]}": float(v) for i, v in enumerate(value) if _number(v) is not None}
            )
        elif key in ("scores", "target_scores", "health_summary") and isinstance(value, dict):
            prefix = {"scores": "scream", "target_scores": "scream_target", "health_summary": "health"}[key]
            out.update({f"epoch/{prefix}/{k}": x for k, v in value.items() if (x := _number(v)) is not None})
        elif key == "collapsed" and value is not None:
            out["epoch/scream/collapsed"] = float(value)
        elif key not in ("epoch", "steps") and (x := _number(value)) is not None:
            out[f"epoch/{key}"] = x
    return out


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary's numbers under `summary/` (final loss, spikes, clip rate, first NaN step, ...),
    and `summary/stable` (1 when the verdict is stable) for a compare view that wants a number."""
    out = {
        f"summary/{k}": x for k, v in summary.items() if (x := _number(v)) is not None and k not in ("latent_scale",)
    }
    if summary.get("first_nan"):
        out["summary/first_nan_step"] = float(summary["first_nan"]["step"])
    if summary.get("scream_epoch") is not None:
        out["summary/scream_epoch"] = float(summary["scream_epoch"])
    out["summary/stable"] = float(summary.get("verdict") == vd.STABLE)
    return out


def _scalar(v: Any) -> str | float | int | bool:
    """A param value as the trackers take it: numbers and bools as they are, the rest as text."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else json.dumps(v)


def run_params(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, operational): the resolved config flattened to dotted keys plus the short names,
    without the operational keys (device, threads, cache, log), which come back separately: they
    may change between attempts of a run, and MLflow refuses a param whose value changes."""
    flat = {k: _scalar(v) for k, v in flatten(cfg.to_dict()).items()}
    operational = {k: flat.pop(k) for k in OPERATIONAL_KEYS if k in flat}
    short = {name: _scalar(s.read(cfg)) for name, s in SHORT_NAMES.items() if s.read(cfg) is not None}
    return {**short, **flat}, operational


def _event_text(rec: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in rec.items() if k != "event"}, default=str)


# -- the loggers ---------------------------------------------------------------------------------


class Tracker:
    """One tracker's logger; the base does nothing (torchtitan's `log(metrics, step)`/`close()`)."""

    name = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Named numbers at training step `step` (`step_metrics`, `epoch_metrics`, `summary_metrics`)."""

    def event(self, rec: Event, step: int) -> None:
        """One event (first_nan, grad_spike, ...) at training step `step`."""

    def summary(self, summary: Summary, step: int) -> None:
        """The run's summary (verdict, evidence, flags, warnings) at its last step."""

    def flush(self) -> None:
        """Send what is buffered (called at each epoch's end)."""

    def close(self, state: str) -> None:
        """The run ended in `state` (completed, failed, interrupted): finish the tracker's run."""

    def state(self) -> dict[str, Any]:
        """What trackers.json keeps for this tracker (its run id), to continue it on a re-run."""
        return {}


class TensorBoardTracker(Tracker):
    """Event files in RUN/tb/. Each step is one event holding all its scalars (one scalar per
    event costs 10x more); params are the HParams plugin's session start; events and the verdict
    are text. A re-run starts with TensorBoard's purge marker at step 0, so TensorBoard drops the
    earlier attempt's points and shows this attempt's in the same run."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, params: dict[str, Any], operational: dict[str, Any], resumed: bool) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from torch.utils.tensorboard.summary import text
        from torch.utils.tensorboard.writer import FileWriter

        self._summary, self._text = Summary, text
        _quiet_tensorboard_threads()
        self.logdir = run_dir / "tb"
        self.writer = FileWriter(str(self.logdir), flush_secs=30)
        if resumed:
            self.writer.add_event(Event(step=0, session_log=SessionLog(status=SessionLog.START)))
        self.writer.add_summary(hparams.hparams_pb(params, trial_id=run_dir.name), 0)
        self.writer.add_summary(text("config/operational", f"```\n{json.dumps(operational, indent=1)}\n```"), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One event holding every scalar of `metrics` at `step`."""
        S = self._summary
        self.writer.add_summary(S(value=[S.Value(tag=k, simple_value=v) for k, v in metrics.items()]), step)

    def event(self, rec: Event, step: int) -> None:
        """The event as text under event/NAME."""
        self.writer.add_summary(self._text(f"event/{rec['event']}", _event_text(rec)), step)

    def summary(self, summary: Summary, step: int) -> None:
        """The verdict, flags and warnings as text (summary/verdict), its numbers as HParams metrics."""
        lines = [f"**{summary['verdict']}**: {summary.get('evidence', '')}"]
        lines += [f"- flag {f['flag']}: {f['evidence']}" for f in summary.get("flags") or []]
        lines += [f"- warning: {w['message']}" for w in summary.get("warnings") or []]
        self.writer.add_summary(self._text("summary/verdict", "\n".join(lines)), step)
        self.log(summary_metrics(summary), step)  # final loss, first NaN step, ...: HParams' metric columns

    def close(self, state: str) -> None:
        """HParams' session end (success only for `completed`), then close the event file."""
        from tensorboard.plugins.hparams import api_pb2, metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        # HParams has no "interrupted": an interrupted run is a failure to finish
        status = api_pb2.STATUS_SUCCESS if state == "completed" else api_pb2.STATUS_FAILURE
        end = HParamsPluginData(
            session_end_info=SessionEndInfo(status=status, end_time_secs=time.time()),
            version=metadata.PLUGIN_DATA_VERSION,
        )
        S = self._summary
        self.writer.add_summary(
            S(value=[S.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))])
        )
        self.writer.close()

    def state(self) -> dict[str, Any]:
        """The event files' folder, relative to the run folder."""
        return {"logdir": "tb"}


class MlflowTracker(Tracker):
    """One MLflow run per job in the sweep's experiment. Step metrics are buffered and sent with
    `log_batch` at each epoch's end (as metrics.jsonl is written), so the step pays no database
    write. A re-run reopens the same MLflow run (id in trackers.json): MLflow keeps every value it
    was sent, so the steps of both attempts are there, the later ones newer (tag stab.attempt)."""

    name = "mlflow"
    _BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self,
        run_dir: Path,
        runs_root: Path,
        group: str,
        params: dict[str, Any],
        operational: dict[str, Any],
        previous: dict[str, Any],
        tags: dict[str, str],
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or self._local_store(runs_root)
        local = "MLFLOW_TRACKING_URI" not in os.environ
        _probe_mlflow_store(self.uri)
        with _store_lock(runs_root / "mlflow" if local else None):
            self.client = MlflowClient(tracking_uri=self.uri)  # creates the local store's tables once
            exp = self.client.get_experiment_by_name(group)
            if exp is None:
                try:
                    artifacts = (runs_root / "mlflow" / "artifacts").resolve().as_uri() if local else None
                    experiment_id = self.client.create_experiment(group, artifact_location=artifacts)
                except Exception:  # created meanwhile by another job of the sweep (a remote store)
                    again = self.client.get_experiment_by_name(group)
                    if again is None:
                        raise
                    experiment_id = again.experiment_id
            else:
                experiment_id = exp.experiment_id
        attempt = int(previous.get("attempt", 0)) + 1
        run_id = previous.get("run_id") if previous.get("tracking_uri") == self.uri else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self.run_id, self.attempt = run_id, attempt
        self.pending: list[Any] = []  # mlflow Metric entities not yet sent
        tags = {
            **tags,
            **{f"stab.{k}": str(v) for k, v in operational.items()},
            "stab.attempt": str(attempt),
            "stab.run_dir": str(run_dir.resolve()),
        }
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params per log_batch call
            self.client.log_batch(run_id, params=items[i : i + 100])
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    @staticmethod
    def _local_store(runs_root: Path) -> str:
        folder = (runs_root / "mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffered; sent by `flush` (at each epoch's end, or every 10 batches' worth)."""
        ms = int(time.time() * 1000)
        self.pending.extend(self._metric(k, v, ms, step) for k, v in metrics.items())
        if len(self.pending) >= 10 * self._BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics with `log_batch`, at most _BATCH per call."""
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), self._BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + self._BATCH])

    def event(self, rec: Event, step: int) -> None:
        """A tag per event and step, and a 1 at that step on the chart event/NAME."""
        # one tag per event and step (spikes recur), and a 1 at that step on the event's own chart
        self.client.set_tag(self.run_id, f"event.{rec['event']}.step_{step}", _event_text(rec)[:5000])
        self.log({f"event/{rec['event']}": 1.0}, step)

    def summary(self, summary: Summary, step: int) -> None:
        """Tags: verdict, evidence, first_nan, flag.*, warning.*; the summary's numbers as metrics."""
        tags = {"verdict": summary["verdict"], "evidence": str(summary.get("evidence", ""))[:5000]}
        if summary.get("first_nan"):
            nan = summary["first_nan"]
            tags["first_nan"] = f"epoch {nan['epoch']} batch {nan['batch']} step {nan['step']} in {nan['module']}"
        for f in summary.get("flags") or []:
            tags[f"flag.{f['flag']}"] = str(f.get("evidence", ""))[:5000]
        for w in summary.get("warnings") or []:
            tags[f"warning.{w.get('warning', 'warning')}"] = str(w.get("message", ""))[:5000]
        self.client.log_batch(self.run_id, tags=[self._tag(k, v) for k, v in tags.items()])
        self.log(summary_metrics(summary), step)

    def close(self, state: str) -> None:
        """Flush, then end the MLflow run as FINISHED, FAILED or KILLED (interrupted)."""
        self.flush()
        status = {"completed": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(self.run_id, status=status)

    def state(self) -> dict[str, Any]:
        """The MLflow run id, its store and the attempt number."""
        return {"run_id": self.run_id, "tracking_uri": self.uri, "attempt": self.attempt}


class WandbTracker(Tracker):
    """One W&B run per job, grouped by sweep, offline unless WANDB_MODE says otherwise. Charts use
    stab's `step` as their x-axis (`define_metric`); W&B's own step only grows, across attempts too
    (its next value is kept in trackers.json), so a re-run continues the same run (same id,
    resume="allow") without W&B dropping its points as out of order."""

    name = "wandb"

    def __init__(
        self, run_dir: Path, group: str, params: dict[str, Any], operational: dict[str, Any], previous: dict[str, Any]
    ) -> None:
        import wandb

        self.id = previous.get("id") or uuid.uuid4().hex[:8]
        # W&B's files go where W&B users put them (WANDB_DIR), else into the run folder
        self.dir = os.environ.get("WANDB_DIR") or str(run_dir)
        self.next = int(previous.get("next_step", 0))
        mode = os.environ.get("WANDB_MODE") or "offline"
        if mode in ("online", "run", "shared"):
            # WANDB_BASE_URL as wandb.init reads it now; the process-wide setup() singleton keeps the value
            # of its first call (an earlier run in this process), else W&B's settings file
            _probe_wandb_server(os.environ.get("WANDB_BASE_URL") or str(wandb.setup().settings.base_url))
        self.run = wandb.init(
            project=None if os.environ.get("WANDB_PROJECT") else "stab",
            group=group,
            name=run_dir.name,
            id=self.id,
            resume="allow",
            dir=self.dir,
            config={**params, **operational},
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def _log(self, data: dict[str, Any], step: int) -> None:
        self.run.log({**data, "step": step}, step=self.next)
        self.next += 1

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One W&B history row, with stab's `step` as its x-axis."""
        self._log(metrics, step)

    def event(self, rec: Event, step: int) -> None:
        """A history row event/NAME (text); the first of each kind also in the run's summary."""
        self._log({f"event/{rec['event']}": _event_text(rec)}, step)
        if f"first/{rec['event']}" not in self.run.summary.keys():  # noqa: SIM118 (W&B's Summary has no __contains__); the first of each kind, in the summary
            self.run.summary[f"first/{rec['event']}"] = {k: v for k, v in rec.items() if k != "event"}

    def summary(self, summary: Summary, step: int) -> None:
        """The summary's numbers as a history row; verdict, evidence, flags, ... in W&B's summary."""
        self._log(summary_metrics(summary), step)
        keep = (
            "verdict",
            "evidence",
            "flags",
            "warnings",
            "first_nan",
            "scream_epoch",
            "final_loss",
            "final_val_loss",
            "grad_norm_by_epoch",
        )
        self.run.summary.update({k: summary[k] for k in keep if k in summary})

    def close(self, state: str) -> None:
        """Finish the W&B run (exit code 0 only for `completed`)."""
        self.run.finish(exit_code=0 if state == "completed" else 1)

    def state(self) -> dict[str, Any]:
        """The W&B run id, its next internal step and where its files are."""
        return {
            "id": self.id,
            "next_step": self.next,
            "dir": "wandb" if "WANDB_DIR" not in os.environ else str(Path(self.dir) / "wandb"),
        }


# -- the fan-out --------------------------------------------------------------------------------


class Recorder(Observer):
    """Hands each run-folder record to every tracker. A tracker that raises is dropped with one
    warning (and the error in trackers.json); the others and the run go on. With no tracker every
    call returns at once."""

    def __init__(
        self, trackers: Sequence[Tracker] = (), run_dir: Path | None = None, warn: Callable[[str], None] | None = None
    ) -> None:
        self.trackers = list(trackers)
        self.run_dir = run_dir
        self.warn = warn or log.warning
        self.errors: dict[str, str] = {}
        self.last_step = 0

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # the store is full, gone, locked: the run folder has it all
                self.trackers.remove(t)
                self.errors[t.name] = f"{type(e).__name__}: {e}"
                self.warn(
                    f"tracker {t.name} failed and is off for the rest of this run "
                    f"({_why(e)}); the run folder has every record"
                )
                self.save()

    def step(self, rec: Mapping[str, Any]) -> None:
        """The step record's numbers (`step_metrics`) to every tracker, at its step."""
        if self.trackers:
            self.last_step = rec["step"]
            metrics = step_metrics(rec)
            self._each(lambda t: t.log(metrics, rec["step"]))

    def epoch(self, erec: Mapping[str, Any]) -> None:
        """The epoch record's numbers (`epoch_metrics`) at the last step, then flush and trackers.json."""
        if self.trackers:
            metrics = epoch_metrics(erec)
            self._each(lambda t: t.log(metrics, self.last_step))
            self._each(lambda t: t.flush())
            self.save()

    def event(self, ev: Mapping[str, Any]) -> None:
        """The event to every tracker, at its own step (else the last step)."""
        if self.trackers:
            rec = ev if isinstance(ev, Event) else Event(ev)
            step = rec.get("step", self.last_step)
            self._each(lambda t: t.event(rec, step))

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The summary to every tracker, at the last step."""
        if self.trackers:
            s = summary if isinstance(summary, Summary) else Summary(summary)
            self._each(lambda t: t.summary(s, self.last_step))

    def close(self, state: str) -> None:
        """Close every tracker with the run's final state; trackers.json once more."""
        if self.trackers or self.errors:
            self._each(lambda t: t.close(state))
            self.save()

    def save(self) -> None:
        """trackers.json: each tracker's run id (to continue it on a re-run) and any error."""
        if self.run_dir is None:
            return
        try:
            stored = _read_store(self.run_dir)
            for t in self.trackers:
                stored[t.name] = {**stored.get(t.name, {}), **t.state(), "error": None}
            for name, error in self.errors.items():
                stored.setdefault(name, {})["error"] = error
            write_json(self.run_dir / STORE_FILE, stored)
        except OSError:  # the run folder's own writes will say what is wrong with the disk
            pass


def _read_store(run_dir: Path) -> dict[str, Any]:
    try:
        return dict(read_json(run_dir / STORE_FILE))
    except (OSError, ValueError):
        return {}


class _store_lock:
    """A file lock around creating the local MLflow store: a sweep's concurrent jobs would race
    on SQLite's table creation."""

    def __init__(self, folder: Path | None) -> None:
        self.lock = None
        if folder is not None:
            from filelock import FileLock

            folder.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(folder / ".store.lock"))

    def __enter__(self) -> None:
        if self.lock:
            self.lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        if self.lock:
            self.lock.release()


def open_trackers(
    cfg: RunConfig, run_dir: Path, overrides: Sequence[str] = (), warn: Callable[[str], None] | None = None
) -> Recorder:
    """The Recorder for `cfg.log`: nothing imported when it is empty. The sweep (group) is the run
    folder's parent, the MLflow store goes beside the sweeps (RUNS/mlflow/). A tracker that cannot
    start warns and is left out, like one that fails later."""
    run_dir = Path(run_dir)
    recorder = Recorder([], run_dir, warn)
    if not cfg.log:
        return recorder
    group, runs_root = run_dir.resolve().parent.name, run_dir.resolve().parent.parent
    previous = _read_store(run_dir)
    params, operational = run_params(cfg)
    tags = {"stab.run_id": cfg.identity(), "stab.overrides": " ".join(overrides)[:5000], "stab.sweep": group}
    makers = {
        "tensorboard": lambda: TensorBoardTracker(run_dir, params, operational, resumed="tensorboard" in previous),
        "mlflow": lambda: MlflowTracker(
            run_dir, runs_root, group, params, operational, previous.get("mlflow", {}), tags
        ),
        "wandb": lambda: WandbTracker(run_dir, group, params, operational, previous.get("wandb", {})),
    }
    for name in cfg.log:
        try:
            recorder.trackers.append(makers[name]())
        except Exception as e:
            recorder.errors[name] = f"{type(e).__name__}: {e}"
            recorder.warn(
                f"tracker {name} could not start ({_why(e)}); the run goes on without it, its folder has every record"
            )
    recorder.save()
    return recorder


__all__ = [
    "TRACKERS",
    "MlflowTracker",
    "Recorder",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "check_installed",
    "epoch_metrics",
    "open_trackers",
    "run_params",
    "step_metrics",
    "summary_metrics",
]
