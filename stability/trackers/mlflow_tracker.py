"""The MLflow tracker: one MLflow run per job in the sweep's experiment, in the SQLite store
RUNS/mlflow/mlflow.db unless MLFLOW_TRACKING_URI names another; a store that cannot work is
found out in seconds (`_probe_mlflow_store`, `MLFLOW_HTTP_DEFAULTS`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from stability.record.records import Event, Summary
from stability.trackers.base import Tracker, _why
from stability.trackers.metrics import _event_text, summary_metrics

# MLflow's REST client retries a refused or timed-out call 7 times with a growing back-off (minutes
# for a server that is down); a tracker that cannot work must be found out in seconds. The user's
# own settings of these variables win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
