"""The run folder's format, defined once: file names, record types with units, the grad table.

The writer (`stability.record.writer`) and the one reader (`stability.record.folder.RunFolder`)
take file names and keys from here; `docs/run-format.md` describes the same
things for people. `SCHEMA_VERSION` is written into `summary.json` and `status.json`; a folder
without it was written by stab before the version existed (schema 1): its grad table is wide
(`group, e1_mean, e1_max, ...`), everything else is the same. Readers accept both.

    from stability.record import format as rf
    run_dir / rf.METRICS                                   # metrics.jsonl
    table = rf.read_grad_table(run_dir / rf.GRAD_TABLE)   # long: epoch, group, mean, max

Units: a loss is the workload's training objective (cascade: mean squared error on the rescaled
EnCodec latents, unitless; char LM: cross-entropy in nats per character, plus its z-loss term);
gradient norms are L2 norms of the raw gradients (before clipping); RMS values are in the
rescaled latents' units; rates are shares in 0..1; times are seconds unless the key says `_ms`;
timestamps are seconds since the Unix epoch.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:  # the CLI imports this module at start-up: numpy and pandas only when a table is read
    import numpy as np
    import pandas as pd

SCHEMA_VERSION = 2  # 1: the layout before this module (wide grad table, no schema_version)

# --- file names (relative to the run folder) -------------------------------------------------
CONFIG = "config.yaml"        # the resolved configuration
OVERRIDES = "overrides.json"  # {"overrides": [...], "run_id": str}
STATUS = "status.json"        # Status
DATA = "data.json"            # the workload's data description (codec, latent scale, cache, ...)
METRICS = "metrics.jsonl"     # one StepRecord per line
EPOCHS = "epochs.jsonl"       # one EpochRecord per line
EVENTS = "events.jsonl"       # one Event per line
GRAD_TABLE = "grad_norms.csv"  # long: epoch, group, mean, max (schema 1: wide)
SUMMARY = "summary.json"      # Summary
SAMPLES = "samples.txt"       # text workloads: each epoch's greedy generations
FORENSICS = "forensics"       # folder: state.pt, what `stab replay` needs
FORENSICS_STATE = f"{FORENSICS}/state.pt"
SWEEP_INDEX = "sweep.json"    # in a sweep's folder: its jobs, their overrides and states
# The files a run writes as it goes: a re-run of the same folder starts them afresh.
STREAMS = (METRICS, EPOCHS, EVENTS, SUMMARY, GRAD_TABLE, SAMPLES)
RUN_MARKERS = (STATUS, SUMMARY, CONFIG)  # a folder holding any of these is a run folder

# --- metrics.jsonl: the step record -----------------------------------------------------------
STEP, EPOCH, BATCH = "step", "epoch", "batch"  # global step (0-based), epoch (1-based), batch in epoch (0-based)
LOSS = "loss"                 # the step's training loss (see Units), before any loss scaling by a fault
GRAD_NORM = "grad/norm"       # total L2 norm of all gradients, before clipping
CLIPPED = "grad/clipped"      # bool: the clip fired on this step (total norm > train.clip)
LR = "lr"                     # learning rate used for this step's update
FINITE = "finite"             # bool: the loss and every parameter's gradient were finite
STEP_MS = "time/step_ms"      # wall time of the step, milliseconds
TOTAL = "total"               # the grad table's group name for GRAD_NORM
STAGE_STATS = ("rms", "ratio", "scale", "clamped")


def grad_key(group: str) -> str:
    """`grad/<group>`: L2 norm of the gradients of one module group, before clipping."""
    return f"grad/{group}"


def stage_key(stage: int, stat: str) -> str:
    """`stage{i}/{stat}`: the cascade's RMS match of stage i. rms: RMS of the stage's output before
    matching; ratio: the scale the match needed (target RMS / rms); scale: the scale applied after
    the clamp; clamped: bool, the ratio was outside `model.rms_clamp`."""
    return f"stage{stage}/{stat}"


class StepRecord(TypedDict, total=False):
    """One line of metrics.jsonl. Besides these keys: `grad/<group>` (float, one per module group,
    see `grad_key`) and, for workloads with stages, `stage{i}/rms|ratio|scale|clamped`
    (`stage_key`). Non-finite floats are the strings "NaN", "Infinity", "-Infinity"."""
    step: int
    epoch: int
    batch: int
    loss: float
    # "grad/norm", "grad/clipped", "time/step_ms" are not identifiers: see the constants above
    lr: float
    finite: bool


# --- epochs.jsonl: the epoch record -----------------------------------------------------------
class EpochRecord(TypedDict, total=False):
    """One line of epochs.jsonl: the epoch's training aggregates, then its evaluation."""
    epoch: int                     # 1-based
    steps: int                     # steps taken in the epoch
    loss: float                    # mean training loss over the epoch's steps (NaN if any was)
    grad_norm_mean: float          # mean total grad norm over the epoch's steps (NaN if any was)
    grad_norm_max: float           # largest total grad norm of the epoch (NaN if any was)
    clip_rate: float               # share of the epoch's steps on which the clip fired, 0..1
    stage_rms: list[float]         # per stage: mean of stage{i}/rms
    stage_ratio: list[float]       # per stage: mean of stage{i}/ratio
    stage_scale: list[float]       # per stage: mean of stage{i}/scale
    stage_clamp_rate: list[float]  # per stage: share of steps clamped, 0..1
    val_loss: float                # validation loss (the same objective); NaN without validation data
    collapsed: bool | None         # the scream check on the validation batch; None: not checked
    scores: dict[str, float]       # scream scores of the output (dominant, longest_run, distinct_4, seq_rep_4, ...)
    target_scores: dict[str, float]  # the same for the target
    codes_head: list[Any]          # cascade: the first codes of each validation output
    health: dict[str, Any]         # per-layer attention health (stability.health)
    health_summary: dict[str, float]  # attn_entropy_min, attn_logit_max, sink_max, sink_layers, massive_max, grad_sink_max
    samples: list[dict[str, str]]  # text workloads: [{"prompt", "output"}] greedy generations
    audio: list[str]               # cascade listen epochs: WAV paths relative to the run folder


# --- events.jsonl -----------------------------------------------------------------------------
EventName = Literal["first_nan", "clamp_saturation", "grad_explosion", "scream", "grad_spike", "loss_spike",
                    "stopped_early", "rewound"]


class Event(TypedDict, total=False):
    """One line of events.jsonl. `event` names it; the other keys depend on it:
    first_nan: epoch, batch, step, kind (loss|grad), module, where (forward|backward|recorded
      grad norms), loss, grad_norm, forensics (path of the saved state, relative to the run folder);
    clamp_saturation: stage, step, epoch, batch, ratio, scale (the first clamped step of a stage);
    grad_explosion: value (grad norm), ratio (over the run's median step), step, epoch, batch;
    scream: epoch (onset), scores, target_scores;
    grad_spike / loss_spike: step, epoch, batch, value (the first 20 of each; counts in the summary);
    stopped_early: epoch, step, reason (train.stop_early: the verdict can no longer be stable);
    rewound: step, epoch, batch, snapshot (train.rewind_from: the run continued from that snapshot, the
      steps before it are the snapshot's run's records)."""
    event: str
    epoch: int
    batch: int
    step: int


# --- summary.json, status.json ----------------------------------------------------------------
class Summary(TypedDict, total=False):
    """summary.json: what the run found. A crashed run's summary holds only verdict ("failed"),
    evidence, run_id, wall_s and schema_version."""
    schema_version: int
    verdict: str                   # stable | exploding | scream | nan | failed
    evidence: str                  # one sentence: why this verdict
    run_id: str                    # hash of the run's identity (its non-operational config)
    flags: list[dict[str, Any]]    # every finding: {flag, epoch|step, evidence}
    warnings: list[dict[str, Any]]  # {warning, message, ...}: saturated clamp, logit growth, clip never/always, ...
    first_nan: dict[str, Any] | None  # the first_nan event's fields, or None
    scream_epoch: int | None       # onset of the scream, or None
    grad_explosion: dict[str, Any] | None  # the grad_explosion event's fields, or None
    grad_norm_by_epoch: list[float]      # EpochRecord.grad_norm_mean per epoch
    grad_norm_max_by_epoch: list[float]  # EpochRecord.grad_norm_max per epoch
    loss_by_epoch: list[float]
    val_loss_by_epoch: list[float]
    final_loss: float              # the last step's training loss
    final_val_loss: float          # the last epoch's validation loss
    growth_per_epoch: float        # geometric-mean growth of grad_norm_by_epoch over finite epochs
    first_spike_step: int | None   # first grad or loss spike (global step)
    n_grad_spikes: int
    n_loss_spikes: int
    spike_lead_steps: int | None   # steps from the first spike to the first NaN (or the explosion's peak)
    clip_rate: float               # share of all steps clipped, 0..1
    nonfinite_steps: int
    epochs_run: int
    steps: int                     # steps taken (= lines of metrics.jsonl)
    stopped_early: bool            # stopped at a non-finite step (train.on_nan=stop), or once certain to be unstable (train.stop_early)
    stage_rms_last_epoch: list[float] | None
    stage_scale_last_epoch: list[float] | None
    codec: dict[str, Any] | None
    latent_scale: float | None
    device: str
    wall_s: float                  # seconds from start to summary


class Status(TypedDict, total=False):
    """status.json, rewritten at each change of state (padded to 4096 bytes: see storage.write_status)."""
    schema_version: int
    state: str                     # running | completed | failed | interrupted
    run_id: str
    pid: int
    host: str
    started: float                 # Unix time, s
    finished: float | None
    updated: float
    error: str | None
    traceback: str
    verdict: str                   # once completed
    device: str
    threads: int
    torch: str
    python: str


# --- grad_norms.csv ---------------------------------------------------------------------------
GRAD_COLUMNS = ("epoch", "group", "mean", "max")  # one row per epoch and group; 'total' is GRAD_NORM
_WIDE = re.compile(r"^e(\d+)_(mean|max)$")


def grad_rows(epoch: int, groups: Iterable[str], means: np.ndarray, maxes: np.ndarray) -> str:
    """CSV lines (no header) of one epoch of the long grad table; NaN as `NaN`, inf as `inf`, so an
    empty cell only ever means a torn line."""
    return "".join(f"{epoch},{g},{_cell(m)},{_cell(x)}\n" for g, m, x in zip(groups, means, maxes))


def grad_header() -> str:
    return ",".join(GRAD_COLUMNS) + "\n"


def _cell(x: float) -> str:
    """A grad-table cell: 9 significant digits, NaN/inf spelled out (never blank)."""
    from stability.formatting import format_number  # imports numpy: not at CLI start-up

    return format_number(float(x), digits=9)


def read_grad_table(path: Path) -> pd.DataFrame:
    """grad_norms.csv as the long table (columns GRAD_COLUMNS, `epoch` int), whichever layout
    the folder has: long (schema 2) or wide (`group, e1_mean, e1_max, ...`, schema 1, where an
    empty cell was NaN). Rows of a torn last line are dropped. Raises what pandas raises on a file
    that is not CSV (ValueError, pd.errors.ParserError, EmptyDataError) and OSError."""
    import pandas as pd

    text = Path(path).read_text()
    head = text.split("\n", 1)[0].strip().split(",")
    if tuple(head) == GRAD_COLUMNS:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, on_bad_lines="skip")
        whole = (frame.notna() & (frame != "")).all(axis=1)  # NaN is written as `NaN`: an empty cell is a torn line
        frame = frame[whole].copy()
        frame["epoch"] = frame["epoch"].astype(int)
        for col in ("mean", "max"):
            frame[col] = frame[col].astype(float)
        return frame.reset_index(drop=True)
    wide = pd.read_csv(io.StringIO(text), index_col="group")
    return long_from_wide(wide)


def long_from_wide(wide: pd.DataFrame) -> pd.DataFrame:
    """A schema-1 wide table (index group, columns e{N}_mean/e{N}_max) as the long table."""
    import pandas as pd

    rows = []
    epochs = sorted({int(m.group(1)) for c in wide.columns if (m := _WIDE.match(str(c)))})
    for e in epochs:
        for g in wide.index:
            rows.append({"epoch": e, "group": str(g), "mean": float(wide.at[g, f"e{e}_mean"]),
                         "max": float(wide.at[g, f"e{e}_max"])})
    return pd.DataFrame(rows, columns=list(GRAD_COLUMNS))


def wide_view(long: pd.DataFrame) -> pd.DataFrame:
    """The long table as group x epoch: columns e{N} (the epoch's mean) and `max` (the largest
    step norm over all epochs, NaN if any epoch's max is: a group that went NaN is not hidden by
    its earlier maxima). Groups keep their first-seen order ('total' first)."""
    import numpy as np
    import pandas as pd

    if long is None or long.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(long["group"]))
    means = long.pivot(index="group", columns="epoch", values="mean").reindex(order)
    maxes = long.pivot(index="group", columns="epoch", values="max").reindex(order).to_numpy(dtype=float)
    out = means.rename(columns=lambda e: f"e{e}").astype(float)
    out.columns.name = None
    out["max"] = [np.max(row) if row.size else math.nan for row in maxes]  # np.max propagates NaN
    return out


def grad_means(long: pd.DataFrame) -> tuple[list[str], list[int], np.ndarray]:
    """(groups, epochs, means as a (groups, epochs) array) of the long table, for the heatmap."""
    order = list(dict.fromkeys(long["group"]))
    pivot = long.pivot(index="group", columns="epoch", values="mean").reindex(order)
    return order, [int(e) for e in pivot.columns], pivot.to_numpy(dtype=float)
