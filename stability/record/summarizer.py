"""The detectors, fed as a run goes: from step and epoch records to events and the summary.

`Summarizer` sees each step record once and keeps what the detectors need, not the records:
running spike baselines (the last `detect.spike_window` values), the largest finite grad norm and
where it was, counts (steps, clipped, non-finite), the first clamped step of each stage, and one
float64 per step, the total grad norm, for the run-wide median of `detectors.series.peak_norm` and the
exploding run's peak in `detectors.series.spike_lead` (8 bytes per step: 0.8 MB for 100,000 steps).
Epoch records are kept in slim form (the fields `detectors.verdict.diagnose` reads), one per epoch.

    s = Summarizer(cfg.detect, clip=cfg.train.clip)
    for rec in steps: events = s.step(rec)      # clamp_saturation events as they happen
    s.epoch(epoch_record); s.event(first_nan_event)
    fields, events = s.finish()                 # verdict, flags, spikes, ... and the closing events
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from typing import Any

import numpy as np

from stability.config import DetectConfig
from stability.detectors.series import SpikeDetector, growth_per_epoch, spike_lead
from stability.detectors.verdict import diagnose
from stability.record import format as rf
from stability.record.records import EpochRecord, Event

MAX_SPIKE_EVENTS = 20  # spike events written per kind; the counts are in the summary
_EPOCH_FIELDS = (
    "epoch",
    "loss",
    "grad_norm_mean",
    "grad_norm_max",
    "clip_rate",
    "stage_rms",
    "stage_scale",
    "stage_clamp_rate",
    "val_loss",
    "collapsed",
    "scores",
    "target_scores",
    "health_summary",
)


class Summarizer:
    """Streaming detectors of one run (see the module docstring). Memory: O(window + epochs) plus
    8 bytes per step."""

    def __init__(self, detect: DetectConfig, clip: float | None) -> None:
        self.dc, self.clip = detect, clip
        window = (detect.spike_window, detect.spike_z, detect.spike_warmup, detect.spike_ratio)
        self.spike_detectors = {
            "grad_spike": SpikeDetector(*window),
            "loss_spike": SpikeDetector(*window),
        }
        self.spikes: dict[str, list[dict[str, Any]]] = {"grad_spike": [], "loss_spike": []}  # the first few
        self.n_spikes = {"grad_spike": 0, "loss_spike": 0}
        self.first_spike_step: int | None = None
        self.norms = array("d")  # total grad norm per step, in step order
        self.peak: dict[str, Any] | None = None  # largest finite total grad norm: value, step, epoch, batch
        self.n_steps = self.n_clipped = self.n_nonfinite = 0
        self.last_loss = math.nan
        self.first_loss = (
            math.nan
        )  # the first step's loss, before any update: divergence's reference without validation
        self.clamp_seen: set[int] = set()
        self.epochs: list[dict[str, Any]] = []
        self.first_nan: dict[str, Any] | None = None
        self.init: dict[str, Any] | None = None  # the evaluation before the first step (init_eval)

    def step(self, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Take one step record; returns the events it raises now (a stage's first clamped step)."""
        g, loss = rec[rf.GRAD_NORM], rec[rf.LOSS]
        self.norms.append(g)
        self.n_steps += 1
        self.n_clipped += bool(rec.get(rf.CLIPPED))
        self.n_nonfinite += not rec[rf.FINITE]
        if self.n_steps == 1:
            self.first_loss = loss
        self.last_loss = loss
        if math.isfinite(g) and (self.peak is None or g > self.peak["value"]):
            self.peak = {"value": g, "step": rec[rf.STEP], "epoch": rec[rf.EPOCH], "batch": rec[rf.BATCH]}
        for kind, value in (("grad_spike", g), ("loss_spike", loss)):
            if self.spike_detectors[kind].push(value):
                self.n_spikes[kind] += 1
                if self.first_spike_step is None:
                    self.first_spike_step = rec[rf.STEP]
                if len(self.spikes[kind]) < MAX_SPIKE_EVENTS:
                    self.spikes[kind].append(
                        {
                            "event": kind,
                            "step": rec[rf.STEP],
                            "epoch": rec[rf.EPOCH],
                            "batch": rec[rf.BATCH],
                            "value": value,
                        }
                    )
        events = []
        i = 0
        while (clamped := rec.get(rf.stage_key(i, "clamped"))) is not None:
            if clamped and i not in self.clamp_seen:
                self.clamp_seen.add(i)
                events.append(
                    {
                        "event": "clamp_saturation",
                        "stage": i,
                        "step": rec[rf.STEP],
                        "epoch": rec[rf.EPOCH],
                        "batch": rec[rf.BATCH],
                        "ratio": rec[rf.stage_key(i, "ratio")],
                        "scale": rec[rf.stage_key(i, "scale")],
                    }
                )
            i += 1
        return events

    def event(self, ev: Event) -> None:
        """Take an event raised outside the step record (the loop's first_nan)."""
        if ev.get("event") == "first_nan" and self.first_nan is None:
            self.first_nan = {k: v for k, v in ev.items() if k != "event"}
        elif ev.get("event") == "init_eval" and self.init is None:
            self.init = {k: v for k, v in ev.items() if k != "event"}

    def epoch(self, erec: EpochRecord) -> None:
        """Take one epoch record (its aggregates and evaluation)."""
        self.epochs.append({k: erec[k] for k in _EPOCH_FIELDS if k in erec})

    def finish(self, injected_nan_step: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the summary's findings, the events found at the end: grad_explosion, scream, spikes).
        `injected_nan_step`: fault.nan_at_step, named in a `nan` verdict's evidence."""
        peak = self._peak()
        diag = self._diagnose(peak)
        if diag["verdict"] == "nan" and injected_nan_step is not None:  # say so: this NaN was put there on purpose
            diag["evidence"] += f" (injected: fault.nan_at_step={injected_nan_step})"
        return self._fields(diag, peak), self._closing_events(peak, diag["scream_epoch"])

    def _diagnose(self, peak: dict[str, Any] | None) -> dict[str, Any]:
        """`verdict.diagnose` on what the run fed in, with the run's detect thresholds."""
        dc = self.dc
        return diagnose(
            self.epochs,
            self.first_nan,
            self.clip,
            dc.explode_factor,
            dc.explode_window,
            dc.scream.min_epochs,
            dc.scream.learning,
            dc.clamp_warn,
            dc.logit_growth,
            peak,
            init=self.init,
            band=dc.band,
            scream=dc.scream,
            attn_logit_level=dc.attn_logit_max,
            attn_entropy_level=dc.attn_entropy_min,
            first_train_loss=self.first_loss,
        )

    def _closing_events(self, peak: dict[str, Any] | None, scream_epoch: int | None) -> list[dict[str, Any]]:
        """The events found at the end, in order: the grad explosion (`peak`), the scream's onset
        with its scores, the first spikes of each kind (grad, then loss)."""
        events: list[dict[str, Any]] = []
        if peak is not None:
            events.append({"event": "grad_explosion", **peak})
        if scream_epoch is not None:
            onset = next(e for e in self.epochs if e["epoch"] == scream_epoch)
            events.append(
                {
                    "event": "scream",
                    "epoch": scream_epoch,
                    "scores": onset.get("scores"),
                    "target_scores": onset.get("target_scores"),
                }
            )
        return events + self.spikes["grad_spike"] + self.spikes["loss_spike"]

    def _fields(self, diag: dict[str, Any], peak: dict[str, Any] | None) -> dict[str, Any]:
        """The summary's findings: the diagnosis, the per-epoch series, the step counts."""
        epochs = self.epochs
        scream_epoch = diag["scream_epoch"]
        norms = [e["grad_norm_mean"] for e in epochs]
        return {
            "verdict": diag["verdict"],
            "evidence": diag["evidence"],
            "flags": diag["flags"],
            "warnings": diag["warnings"],
            "borderline": diag["borderline"],
            # the loss at initialisation on the validation data, the workload's no-learning baseline, and the
            # last validation loss over the first (or the baseline, without it): > 1 is `diverged`
            "val_loss_init": diag["val_loss_init"],
            "baseline_loss": diag["baseline_loss"],
            "baseline": (self.init or {}).get("baseline"),
            "loss_ratio": diag["loss_ratio"],
            "first_nan": self.first_nan,
            "scream_epoch": scream_epoch,
            "grad_explosion": peak,
            "grad_norm_by_epoch": norms,
            "grad_norm_max_by_epoch": [e["grad_norm_max"] for e in epochs],
            "loss_by_epoch": [e["loss"] for e in epochs],
            "val_loss_by_epoch": [e["val_loss"] for e in epochs],
            "final_loss": self.last_loss,
            "final_val_loss": epochs[-1]["val_loss"] if epochs else math.nan,
            "growth_per_epoch": growth_per_epoch(norms),
            "first_spike_step": self.first_spike_step,
            "n_grad_spikes": self.n_spikes["grad_spike"],
            "n_loss_spikes": self.n_spikes["loss_spike"],
            # how many steps the first spike came before the event (the first NaN, else for an exploding
            # run its largest grad norm): the warning time a user had
            "spike_lead_steps": spike_lead(
                self.first_spike_step, self.first_nan, diag["verdict"], np.frombuffer(self.norms, dtype=float)
            ),
            "clip_rate": self.n_clipped / self.n_steps if self.n_steps else math.nan,
            "nonfinite_steps": self.n_nonfinite,
            "epochs_run": len(epochs),
            "stage_rms_last_epoch": epochs[-1].get("stage_rms") if epochs else None,
            "stage_scale_last_epoch": epochs[-1].get("stage_scale") if epochs else None,
        }

    def _peak(self) -> dict[str, Any] | None:
        """`detectors.series.peak_norm` on the run's step norms: the largest finite one, if it exceeds
        the median finite step norm by more than `detect.explode_step_factor`."""
        x = np.frombuffer(self.norms, dtype=float)
        ok = np.isfinite(x)
        if self.peak is None or ok.sum() < 2:
            return None
        med = float(np.median(x[ok]))
        ratio = self.peak["value"] / med if med > 0 else math.inf
        if ratio <= self.dc.explode_step_factor:
            return None
        return {
            "value": self.peak["value"],
            "ratio": ratio,
            "step": self.peak["step"],
            "epoch": self.peak["epoch"],
            "batch": self.peak["batch"],
        }
