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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module at start-up: numpy and pandas only when a table is read
    import numpy as np
    import pandas as pd

SCHEMA_VERSION = 2  # 1: the layout before this module (wide grad table, no schema_version)

# --- file names (relative to the run folder) -------------------------------------------------
CONFIG = "config.yaml"  # the resolved configuration
OVERRIDES = "overrides.json"  # {"overrides": [...], "run_id": str}
STATUS = "status.json"  # Status
DATA = "data.json"  # the workload's data description (codec, latent scale, cache, ...)
METRICS = "metrics.jsonl"  # one StepRecord per line
EPOCHS = "epochs.jsonl"  # one EpochRecord per line
EVENTS = "events.jsonl"  # one Event per line
GRAD_TABLE = "grad_norms.csv"  # long: epoch, group, mean, max (schema 1: wide)
SUMMARY = "summary.json"  # Summary
SAMPLES = "samples.txt"  # text workloads: each epoch's greedy generations
FORENSICS = "forensics"  # folder: state.pt, what `stab replay` needs
FORENSICS_STATE = f"{FORENSICS}/state.pt"
SWEEP_INDEX = "sweep.json"  # in a sweep's folder: its jobs, their overrides and states
# The files a run writes as it goes: a re-run of the same folder starts them afresh.
STREAMS = (METRICS, EPOCHS, EVENTS, SUMMARY, GRAD_TABLE, SAMPLES)
RUN_MARKERS = (STATUS, SUMMARY, CONFIG)  # a folder holding any of these is a run folder

# --- metrics.jsonl: the step record -----------------------------------------------------------
STEP, EPOCH, BATCH = "step", "epoch", "batch"  # global step (0-based), epoch (1-based), batch in epoch (0-based)
LOSS = "loss"  # the step's training loss (see Units), before any loss scaling by a fault
GRAD_NORM = "grad/norm"  # total L2 norm of all gradients, before clipping
CLIPPED = "grad/clipped"  # bool: the clip fired on this step (total norm > train.clip)
LR = "lr"  # learning rate used for this step's update
FINITE = "finite"  # bool: the loss and every parameter's gradient were finite
STEP_MS = "time/step_ms"  # wall time of the step, milliseconds
TOTAL = "total"  # the grad table's group name for GRAD_NORM
STAGE_STATS = ("rms", "ratio", "scale", "clamped")


def grad_key(group: str) -> str:
    """`grad/<group>`: L2 norm of the gradients of one module group, before clipping."""
    return f"grad/{group}"


def stage_key(stage: int, stat: str) -> str:
    """`stage{i}/{stat}`: the cascade's RMS match of stage i. rms: RMS of the stage's output before
    matching; ratio: the scale the match needed (target RMS / rms); scale: the scale applied after
    the clamp; clamped: bool, the ratio was outside `model.rms_clamp`."""
    return f"stage{stage}/{stat}"


# The records themselves, typed and frozen: the step's is `stability.steplayout.StepRecord` (packed
# and unpacked by the run's StepLayout); epoch, event, summary and status are in
# `stability.record.records`, each key with its unit.


# --- grad_norms.csv ---------------------------------------------------------------------------
GRAD_COLUMNS = ("epoch", "group", "mean", "max")  # one row per epoch and group; 'total' is GRAD_NORM
_WIDE = re.compile(r"^e(\d+)_(mean|max)$")


def grad_rows(epoch: int, groups: Iterable[str], means: np.ndarray, maxes: np.ndarray) -> str:
    """CSV lines (no header) of one epoch of the long grad table; NaN as `NaN`, inf as `inf`, so an
    empty cell only ever means a torn line."""
    return "".join(f"{epoch},{g},{_cell(m)},{_cell(x)}\n" for g, m, x in zip(groups, means, maxes))


def grad_header() -> str:
    """The long grad table's header line (GRAD_COLUMNS)."""
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
            rows.append(
                {
                    "epoch": e,
                    "group": str(g),
                    "mean": float(wide.at[g, f"e{e}_mean"]),
                    "max": float(wide.at[g, f"e{e}_max"]),
                }
            )
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
