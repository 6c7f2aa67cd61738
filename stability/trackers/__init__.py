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

A package by job: `base` (the `Tracker` interface, the installed check), `metrics` (what a record
becomes), one module per tracker (`tensorboard_tracker`, `mlflow_tracker`, `wandb_tracker`) and
`recorder` (the fan-out and trackers.json). Import from here: `from stability.trackers import
open_trackers`.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (tests patch trackers.importlib.util.find_spec)

from stability.config import TRACKERS
from stability.trackers.base import PIP, Tracker, TrackerWarning, check_installed
from stability.trackers.metrics import epoch_metrics, run_params, step_metrics, summary_metrics
from stability.trackers.mlflow_tracker import MLFLOW_HTTP_DEFAULTS, MlflowTracker
from stability.trackers.recorder import STORE_FILE, Recorder, open_trackers
from stability.trackers.tensorboard_tracker import TensorBoardTracker
from stability.trackers.wandb_tracker import WANDB_REACH_S, WandbTracker

__all__ = [
    "MLFLOW_HTTP_DEFAULTS",
    "PIP",
    "STORE_FILE",
    "TRACKERS",
    "WANDB_REACH_S",
    "MlflowTracker",
    "Recorder",
    "TensorBoardTracker",
    "Tracker",
    "TrackerWarning",
    "WandbTracker",
    "check_installed",
    "epoch_metrics",
    "open_trackers",
    "run_params",
    "step_metrics",
    "summary_metrics",
]
