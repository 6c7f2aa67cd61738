"""The fan-out: one `Recorder` hands each run-folder record to every tracker of `log=` and drops a
tracker that fails with one warning; `open_trackers` starts them; RUN/trackers.json keeps each
tracker's run id so that a re-run continues it.

    recorder = open_trackers(cfg, run_dir, overrides)   # nothing imported when cfg.log is empty
    recorder.step(rec); recorder.epoch(erec); recorder.close("completed")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stability.config import RunConfig
from stability.observe import Observer
from stability.record.records import Event, Summary
from stability.storage import read_json, write_json
from stability.trackers.base import Tracker, _why, log
from stability.trackers.metrics import epoch_metrics, run_params, step_metrics
from stability.trackers.mlflow_tracker import MlflowTracker
from stability.trackers.tensorboard_tracker import TensorBoardTracker
from stability.trackers.wandb_tracker import WandbTracker

STORE_FILE = "trackers.json"


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
