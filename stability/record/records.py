"""The run's records as typed, frozen values: epoch, event, summary and status.

Each record is a read-only mapping of the keys exactly as they are written on disk (so a file's
keys never depend on this module, and a folder written by an older stab reads the same), with a
typed attribute for each key this version knows, its unit in the comment. A key the file lacks
reads as the attribute's default; a key this version does not know stays in the mapping.

    s = Summary.of(read_json(run_dir / SUMMARY))
    s.verdict, s.final_val_loss      # typed: 'nan', 2.31
    s["verdict"], dict(s)            # the keys as written
    s.verdict = "stable"             # AttributeError: records are frozen

Writers take plain mappings; `dict(record)` is what goes to the file. The step record is
`steplayout.StepRecord`, packed and unpacked by the run's `StepLayout`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from copy import copy
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
R = TypeVar("R", bound="Record")


class key(Generic[T]):
    """A typed attribute of a record that reads one file key (`name`, default: the attribute's
    own name), `default` where the file lacks it or holds null."""

    def __init__(self, default: T, name: str | None = None) -> None:
        self.default, self.name = default, name

    def __set_name__(self, owner: type, attr: str) -> None:
        self.name = self.name or attr

    @overload
    def __get__(self, obj: None, owner: type) -> key[T]: ...
    @overload
    def __get__(self, obj: Record, owner: type) -> T: ...

    def __get__(self, obj: Record | None, owner: type) -> T | key[T]:
        if obj is None:
            return self
        value = obj._data.get(self.name)  # type: ignore[arg-type]
        if value is not None:
            return value
        return copy(self.default) if isinstance(self.default, (list, dict)) else self.default  # a caller's own


class Record(Mapping[str, Any]):
    """A frozen record: a read-only mapping of a file's keys with typed attributes (`key`)."""

    __slots__ = ("_data",)
    _data: Mapping[str, Any]

    def __init__(self, data: Mapping[str, Any] | None = None, **fields: Any) -> None:
        object.__setattr__(self, "_data", MappingProxyType({**(data or {}), **fields}))

    @classmethod
    def of(cls: type[R], data: Any) -> R:
        """The record of a parsed file or line; anything but a mapping (a damaged file) reads as empty."""
        return cls(data if isinstance(data, Mapping) else {})

    def __getitem__(self, k: str) -> Any:
        return self._data[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__} is frozen: make a new one with {type(self).__name__}(old, {name}=...)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._data)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (dict(self._data),)


def number(x: Any) -> float:
    """A recorded number as float: NaN/inf kept (JSON's "NaN" strings are parsed by `storage.loads`),
    a missing or non-numeric value is NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --- epochs.jsonl -------------------------------------------------------------------------------
class EpochRecord(Record):
    """One line of epochs.jsonl: the epoch's training aggregates, then its evaluation."""

    epoch = key(0)  # 1-based
    steps = key(0)  # steps taken in the epoch
    loss = key(math.nan)  # mean training loss over the epoch's finite steps (NaN if none was)
    nonfinite = key(0)  # the epoch's steps with a non-finite loss or gradient: not stepped, not in `loss`
    grad_norm_mean = key(math.nan)  # mean total grad norm over the epoch's steps (NaN if any was)
    grad_norm_max = key(math.nan)  # largest total grad norm of the epoch (NaN if any was)
    clip_rate = key(math.nan)  # share of the epoch's steps on which the clip fired, 0..1
    stage_rms: key[list[float]] = key([])  # per stage: mean of stage{i}/rms
    stage_ratio: key[list[float]] = key([])  # per stage: mean of stage{i}/ratio
    stage_scale: key[list[float]] = key([])  # per stage: mean of stage{i}/scale
    stage_clamp_rate: key[list[float]] = key([])  # per stage: share of steps clamped, 0..1
    val_loss = key(math.nan)  # validation loss (the same objective); NaN without validation data
    collapsed: key[bool | None] = key(None)  # the scream check on the validation batch; None: not checked
    scores: key[dict[str, float]] = key({})  # scream scores of the output (dominant, longest_run, distinct_4, ...)
    target_scores: key[dict[str, float]] = key({})  # the same for the target
    codes_head: key[list[Any]] = key([])  # cascade: the first codes of each validation output
    health: key[dict[str, Any]] = key({})  # per-layer attention health (stability.health)
    health_summary: key[dict[str, float]] = key({})  # attn_entropy_min, attn_logit_max, sink_max, ...
    samples: key[list[dict[str, str]]] = key([])  # text workloads: [{"prompt", "output"}] greedy generations
    audio: key[list[str]] = key([])  # cascade listen epochs: WAV paths relative to the run folder


# --- events.jsonl -------------------------------------------------------------------------------
EVENT_NAMES = (
    "first_nan",
    "clamp_saturation",
    "grad_explosion",
    "scream",
    "grad_spike",
    "loss_spike",
    "stopped_early",
    "rewound",
)


class Event(Record):
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

    event = key("")  # one of EVENT_NAMES
    epoch: key[int | None] = key(None)
    batch: key[int | None] = key(None)
    step: key[int | None] = key(None)
    module: key[str | None] = key(None)  # first_nan: the module group where it started
    value = key(math.nan)  # grad_explosion, spikes: the norm or loss


# --- summary.json, status.json ------------------------------------------------------------------
class Summary(Record):
    """summary.json: what the run found. A crashed run's summary holds only verdict ("failed"),
    evidence, run_id, wall_s and schema_version."""

    schema_version = key(1)  # absent: written before the schema had a version
    verdict = key("?")  # a name of `verdicts.SEVERITY`; "?" where the file has none
    evidence = key("")  # one sentence: why this verdict
    run_id = key("")  # hash of the run's identity (its non-operational config)
    flags: key[list[dict[str, Any]]] = key([])  # every finding: {flag, epoch|step, evidence}
    warnings: key[list[dict[str, Any]]] = key([])  # {warning, message, ...}: saturated clamp, clip never/always, ...
    first_nan: key[dict[str, Any] | None] = key(None)  # the first_nan event's fields, or None
    scream_epoch: key[int | None] = key(None)  # onset of the scream, or None
    grad_explosion: key[dict[str, Any] | None] = key(None)  # the grad_explosion event's fields, or None
    grad_norm_by_epoch: key[list[float]] = key([])  # EpochRecord.grad_norm_mean per epoch
    grad_norm_max_by_epoch: key[list[float]] = key([])  # EpochRecord.grad_norm_max per epoch
    loss_by_epoch: key[list[float]] = key([])
    val_loss_by_epoch: key[list[float]] = key([])
    final_loss = key(math.nan)  # the last step's training loss
    final_val_loss = key(math.nan)  # the last epoch's validation loss
    growth_per_epoch = key(math.nan)  # geometric-mean growth of grad_norm_by_epoch over finite epochs
    first_spike_step: key[int | None] = key(None)  # first grad or loss spike (global step)
    n_grad_spikes = key(0)
    n_loss_spikes = key(0)
    spike_lead_steps: key[int | None] = key(
        None
    )  # steps from the first spike to the first NaN (or the explosion's peak)
    clip_rate = key(math.nan)  # share of all steps clipped, 0..1
    nonfinite_steps = key(0)
    epochs_run = key(0)
    steps: key[int | None] = key(None)  # steps taken (= lines of metrics.jsonl)
    stopped_early = key(False)  # stopped at a non-finite step (train.on_nan=stop) or once certain to be unstable
    stage_rms_last_epoch: key[list[float] | None] = key(None)
    stage_scale_last_epoch: key[list[float] | None] = key(None)
    codec: key[dict[str, Any] | None] = key(None)
    latent_scale: key[float | None] = key(None)
    device = key("")
    wall_s = key(math.nan)  # seconds from start to summary


class Status(Record):
    """status.json, rewritten at each change of state (padded to 4096 bytes: see storage.write_status)."""

    schema_version = key(1)
    state = key("unknown")  # running | completed | failed | interrupted; unknown: no or unreadable file
    run_id = key("")
    pid: key[int | None] = key(None)
    host = key("?")
    started: key[float | None] = key(None)  # Unix time, s
    finished: key[float | None] = key(None)
    updated: key[float | None] = key(None)
    error: key[str | None] = key(None)
    traceback = key("")
    verdict: key[str | None] = key(None)  # once completed
    device = key("")
    threads: key[int | None] = key(None)
    torch = key("")
    python = key("")
    job_num: key[int | None] = key(None)  # a sweep job: its number in the sweep
    concurrency: key[int | None] = key(None)  # a sweep job: jobs running at once
    gpu_slot: key[int | None] = key(None)  # a sweep job: the GPU it was given, if any
    owner: key[str | None] = key(None)  # a sweep job: the sweep process that started it (pid:start)
