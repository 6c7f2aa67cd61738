"""The run folder's writer: the one object that writes a run's files, as the run goes.

The training loop hands it one record per step and one per epoch and never formats or writes a
file itself (torchtitan's metrics processor: `log(metrics, step)` / `close()`). The writer:
- appends step records to metrics.jsonl in batches (every `flush_steps` steps and at each epoch
  end), already serialised, so it never holds more than one batch of them;
- accumulates the epoch's aggregates as steps arrive (`EpochStats`: loss sum, grad-norm sum and
  max per group and total, clip and clamp counts, stage sums), so an epoch's record and its rows of
  the grad table cost O(groups), whatever the number of steps or epochs before;
- appends each epoch's rows to grad_norms.csv (long: epoch, group, mean, max), its record to
  epochs.jsonl and its generations to samples.txt;
- writes events.jsonl, status.json and summary.json, the latter from `Summarizer` (the detectors,
  fed the same records);
- hands every record to its observer (`stability.observe.Observer`: the trackers' `Recorder`).

Memory that grows with the run: 8 bytes per step (the summarizer's total grad norms) and one slim
record per epoch. `RunWriter(..., write=False)` computes the same and writes nothing: the writer a
process that does not own the folder (a non-zero rank) gets.

    w = RunWriter(run_dir, observer)
    w.start(cfg.to_dict(), overrides, cfg.identity())
    w.open(names, n_stages, Summarizer(cfg.detect, cfg.train.clip))
    w.step(rec) ...; stats = w.close_epoch(); w.epoch({**stats, **evaluation})
    summary = w.finish(extra_fields)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stability.observe import Observer
from stability.record import format as rf
from stability.record.records import EpochRecord, Event, Summary
from stability.record.summarizer import Summarizer
from stability.storage import append_jsonl, append_text, dumps, read_json, write_json, write_status, write_yaml

FLUSH_STEPS = 256  # step records appended to metrics.jsonl per write


class EpochStats:
    """Running aggregates of one epoch's steps. The loss is the mean over the finite steps (those
    the optimizer took; `nonfinite` counts the others), so one skipped step does not hide the
    epoch's loss. The grad-norm means and maxima propagate NaN, as `np.mean` and `np.max` over the
    steps would: the epoch of a non-finite step shows as NaN in the grad-norm table."""

    def __init__(self, epoch: int, groups: Sequence[str], n_stages: int) -> None:
        self.epoch, self.n_stages = epoch, n_stages
        self.keys = [rf.GRAD_NORM, *(rf.grad_key(g) for g in groups)]  # 'total' first, as in the table
        self.stage_keys = [rf.stage_key(i, s) for s in ("rms", "ratio", "scale", "clamped") for i in range(n_stages)]
        self.steps = 0
        self.loss = 0.0
        self.nonfinite = 0  # steps whose loss or a gradient was non-finite: not stepped, not in `loss`
        self.clipped = 0
        self.grad_sum = np.zeros(len(self.keys))
        self.grad_max = np.full(len(self.keys), -math.inf)
        self.stage_sum = np.zeros(4 * n_stages)  # rms..., ratio..., scale..., clamped...

    def add(self, rec: Mapping[str, Any]) -> None:
        """Add one step record to the sums and maxima (grad norms, loss, clip and clamp counts)."""
        g = np.fromiter((rec[k] for k in self.keys), dtype=float, count=len(self.keys))
        self.grad_sum += g
        np.maximum(self.grad_max, g, out=self.grad_max)  # propagates NaN
        if rec.get(rf.FINITE, True):
            self.loss += rec[rf.LOSS]
        else:
            self.nonfinite += 1
        self.clipped += bool(rec.get(rf.CLIPPED))
        if self.n_stages:
            self.stage_sum += np.fromiter((rec[k] for k in self.stage_keys), dtype=float, count=len(self.stage_keys))
        self.steps += 1

    def means(self) -> np.ndarray:
        """Mean grad norm per group and total over the epoch's steps (NaN for none), shape (len(keys),)."""
        return self.grad_sum / self.steps if self.steps else np.full(len(self.keys), math.nan)

    def maxes(self) -> np.ndarray:
        """Largest grad norm per group and total over the epoch's steps (NaN for none), shape (len(keys),)."""
        return self.grad_max if self.steps else np.full(len(self.keys), math.nan)

    def record(self) -> dict[str, Any]:
        """The epoch record's training part (see `records.EpochRecord`)."""
        n, S = self.steps, self.n_stages
        stage = self.stage_sum / n if n else np.full(4 * S, math.nan)
        return {
            "epoch": self.epoch,
            "steps": n,
            "loss": self.loss / (n - self.nonfinite) if n > self.nonfinite else math.nan,
            "nonfinite": self.nonfinite,
            "grad_norm_mean": float(self.means()[0]),
            "grad_norm_max": float(self.maxes()[0]),
            "clip_rate": self.clipped / n if n else math.nan,
            "stage_rms": [float(v) for v in stage[:S]],
            "stage_ratio": [float(v) for v in stage[S : 2 * S]],
            "stage_scale": [float(v) for v in stage[2 * S : 3 * S]],
            "stage_clamp_rate": [float(v) for v in stage[3 * S :]],
        }


class RunWriter:
    """Owns one run folder's files (see the module docstring). With `write=False` every file
    operation is skipped and the aggregates, events and summary are still computed."""

    def __init__(
        self, run_dir: Path, observer: Observer | None = None, write: bool = True, flush_steps: int = FLUSH_STEPS
    ) -> None:
        self.dir, self.observer, self.writes, self.flush_steps = (
            Path(run_dir),
            observer if observer is not None else Observer(),
            write,
            flush_steps,
        )
        self.groups: list[str] = []
        self.n_stages = 0
        self.summarizer: Summarizer | None = None
        self.stats: EpochStats | None = None  # the epoch in progress
        self.lines: list[str] = []  # serialised step records not yet appended
        self.grad_header = False

    def path(self, name: str) -> Path:
        """The path of the run folder's file `name`."""
        return self.dir / name

    # --- the folder ---------------------------------------------------------------------------
    def start(self, config: dict[str, Any], overrides: Sequence[str], run_id: str) -> None:
        """A fresh start in the folder: an earlier attempt's streams and forensics go, the
        resolved config and the overrides are written."""
        if not self.writes:
            return
        for stale in rf.STREAMS:
            self.path(stale).unlink(missing_ok=True)
        shutil.rmtree(self.path(rf.FORENSICS), ignore_errors=True)  # an earlier attempt's NaN is not this run's
        write_yaml(self.path(rf.CONFIG), config)
        write_json(self.path(rf.OVERRIDES), {"overrides": list(overrides), "run_id": run_id})

    def status(self, fresh: bool = False, **fields: Any) -> None:
        """Update status.json with `fields` (a fresh one with `fresh`); padded, and written in place
        if the disk is full (`storage.write_status`)."""
        if not self.writes:
            return
        path = self.path(rf.STATUS)
        status = read_json(path) if path.exists() and not fresh else {}
        status.update(fields, schema_version=rf.SCHEMA_VERSION, updated=time.time())
        write_status(path, status)

    def data(self, info: dict[str, Any]) -> None:
        """data.json: the workload's facts (data, codec, model size, ...)."""
        if self.writes:
            write_json(self.path(rf.DATA), info)

    def _summarizer(self) -> Summarizer:
        if self.summarizer is None:
            raise RuntimeError("RunWriter.open() was not called")
        return self.summarizer

    def open(self, groups: Sequence[str], n_stages: int, summarizer: Summarizer) -> None:
        """The run's layout, known once the workload is built: module groups and stages."""
        self.groups, self.n_stages, self.summarizer = list(groups), n_stages, summarizer

    # --- as the run goes ----------------------------------------------------------------------
    def step(self, rec: Mapping[str, Any]) -> None:
        """One step record (`steplayout.StepRecord`): aggregated, buffered for metrics.jsonl, given
        to the detectors and the trackers."""
        if self.stats is None or self.stats.epoch != rec[rf.EPOCH]:
            self.stats = EpochStats(rec[rf.EPOCH], self.groups, self.n_stages)
        self.stats.add(rec)
        if self.writes:
            self.lines.append(_line(rec))
            if len(self.lines) >= self.flush_steps:
                self.flush()
        for ev in self._summarizer().step(rec):
            self.event(ev)
        self.observer.step(rec)

    def event(self, ev: Mapping[str, Any]) -> None:
        """One event (`records.Event`, its name under "event"), appended at once."""
        ev = Event(ev)
        if self.writes:
            append_jsonl(self.path(rf.EVENTS), [ev])
        self._summarizer().event(ev)
        self.observer.event(ev)

    def flush(self) -> None:
        """Append the buffered step records to metrics.jsonl."""
        if self.lines:
            lines, self.lines = "".join(self.lines), []
            append_text(self.path(rf.METRICS), lines)

    def close_epoch(self) -> dict[str, Any]:
        """End the epoch's steps: flush them, append its rows to the grad table; returns the
        epoch record's training part (`EpochStats.record`)."""
        stats = self.stats or EpochStats(0, self.groups, self.n_stages)
        self.flush()
        self._grad_rows(stats)
        self.stats = None
        return stats.record()

    def epoch(self, erec: Mapping[str, Any]) -> None:
        """The whole epoch record (`records.EpochRecord`: aggregates and evaluation): epochs.jsonl,
        samples.txt, the detectors, the trackers."""
        erec = EpochRecord(erec)
        if self.writes:
            append_jsonl(self.path(rf.EPOCHS), [erec])
            if erec.get("samples"):  # a text workload's greedy generations, readable with `cat`
                append_text(
                    self.path(rf.SAMPLES),
                    "".join(
                        f"=== epoch {erec['epoch']}, prompt {i}: {s['prompt']!r}\n{s['output']}\n"
                        for i, s in enumerate(erec["samples"])
                    ),
                )
        self._summarizer().epoch(erec)
        self.observer.epoch(erec)

    def abort(self) -> None:
        """The run is ending badly (Ctrl-C, SIGTERM, a crash): keep every step recorded so far,
        and the unfinished epoch's rows of the grad table."""
        self.flush()
        if self.stats is not None and self.stats.steps:
            self._grad_rows(self.stats)
            self.stats = None

    def finish(self, **fields: Any) -> Summary:
        """The detectors' findings and their closing events, and summary.json (with `fields`:
        run_id, steps, device, wall_s, ...); returns the summary."""
        found, events = self._summarizer().finish(fields.pop("injected_nan_step", None))
        for ev in events:
            self.event(ev)
        summary = Summary({"schema_version": rf.SCHEMA_VERSION, **found, **fields})
        self.summary(summary)
        return summary

    def summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json (`records.Summary`), and the trackers' summary."""
        if self.writes:
            write_json(self.path(rf.SUMMARY), summary)
        self.observer.summary(Summary(summary))

    def _grad_rows(self, stats: EpochStats) -> None:
        if not self.writes or not stats.steps:
            return
        text = rf.grad_rows(stats.epoch, [rf.TOTAL, *self.groups], stats.means(), stats.maxes())
        if not self.grad_header:
            text, self.grad_header = rf.grad_header() + text, True
        append_text(self.path(rf.GRAD_TABLE), text)


def _line(rec: Any) -> str:
    """One JSON line of a step record (a `steplayout.StepRecord` or a dict); the fast path when every
    float is finite (most steps), strict JSON always."""
    if not isinstance(rec, dict):
        rec = rec.as_dict()
    try:
        return json.dumps(rec, allow_nan=False) + "\n"
    except (ValueError, TypeError):  # a non-finite float, or a numpy scalar
        return dumps(rec) + "\n"
