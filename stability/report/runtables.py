"""One run's tables for `stab show` and report.html: gradient norms by module group per epoch,
the epochs, the stages, the events.

    grad_epoch_frame(run)   # mean per epoch, max over all steps, per module group
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from stability.formatting import format_number, nan_place
from stability.record import format as runformat
from stability.record.folder import RunFolder
from stability.report.loading import Run


def is_run_folder(path: Path) -> bool:
    """A folder holding any of `format.RUN_MARKERS` (`RunFolder.is_run`)."""
    return RunFolder(path).is_run()


def grad_epoch_frame(run: Run) -> pd.DataFrame:
    """The grad table's wide view: group x epoch means, plus `max`, the largest step norm over all
    epochs (NaN if any epoch's max is NaN: a group that went NaN is not hidden by its earlier maxima)."""
    return runformat.wide_view(run.grad_table)


def epoch_frame(run: Run) -> pd.DataFrame:
    """Per epoch: steps, non-finite steps (not stepped), loss (over the finite steps), validation
    loss, grad norm mean/max, clip rate, collapsed (the scream check)."""
    cols = {
        "epoch": "epoch",
        "steps": "steps",
        "nonfinite": "non-finite",
        "loss": "loss",
        "val_loss": "val loss",
        "grad_norm_mean": "grad mean",
        "grad_norm_max": "grad max",
        "clip_rate": "clipped",
        "collapsed": "collapsed",
    }
    return pd.DataFrame(
        [{name: e.get(key) for key, name in cols.items()} for e in run.epochs],
        columns=list(cols.values()),
        dtype=object,
    )


def stage_frame(run: Run) -> pd.DataFrame:
    """Per epoch and stage: output RMS, the ratio the RMS match needed, the scale applied after
    clamping, and the share of steps where the clamp bound was hit."""
    rows = []
    for e in run.epochs:
        rms, ratio, scale, clamp = (
            e.get(k) or [] for k in ("stage_rms", "stage_ratio", "stage_scale", "stage_clamp_rate")
        )
        for i in range(max(len(rms), len(ratio), len(scale))):

            def at(xs: list[Any], i: int = i) -> Any:
                return xs[i] if i < len(xs) else None

            rows.append(
                {
                    "epoch": e.get("epoch"),
                    "stage": i,
                    "rms": at(rms),
                    "needed ratio": at(ratio),
                    "scale": at(scale),
                    "clamped": at(clamp),
                }
            )
    return pd.DataFrame(rows, columns=["epoch", "stage", "rms", "needed ratio", "scale", "clamped"], dtype=object)


def event_text(ev: Mapping[str, Any], run_dir: Path | None = None) -> str:
    """The details of one events.jsonl record, in words; a first_nan whose batch and state were
    saved names the command that replays it (`stab replay RUN_DIR`, quoted for a POSIX shell)."""
    kind = ev.get("event")
    f = format_number
    if kind == "first_nan":
        return (
            f"non-finite {ev.get('kind', '?')} first {nan_place(ev)}; "
            f"loss {f(ev.get('loss'))}, grad norm {f(ev.get('grad_norm'))}"
            + (
                f"; batch and state saved in {ev['forensics']}: "
                + (shlex.join(["stab", "replay", str(run_dir)]) if run_dir is not None else "stab replay RUN_DIR")
                if ev.get("forensics")
                else ""
            )
        )
    if kind == "init_eval":
        base = f", no-learning baseline {f(ev.get('baseline_loss'))}" if ev.get("baseline") else ""
        return f"validation loss at initialisation {f(ev.get('val_loss'))}{base}"
    if kind in ("grad_spike", "loss_spike"):
        return f"{'grad norm' if kind == 'grad_spike' else 'loss'} {f(ev.get('value', ev.get('grad_norm')))}"
    if kind == "clamp_saturation":
        return f"stage {ev.get('stage')}: needed ratio {f(ev.get('ratio'))}, clamped to {f(ev.get('scale'))}"
    if kind == "scream":
        s, t = ev.get("scores") or {}, ev.get("target_scores") or {}
        return "output collapsed: " + ", ".join(f"{k} {f(v)} (target {f(t.get(k))})" for k, v in s.items())
    skip = {"event", "epoch", "batch", "step"}
    return ", ".join(f"{k} {f(v)}" for k, v in ev.items() if k not in skip)


def events_frame(run: Run) -> pd.DataFrame:
    """One row per event of `run`, in the order they happened (init_eval first; at a tie, first_nan, scream, spikes, clamp saturation), with its details in words."""
    order = {"first_nan": 0, "scream": 1, "grad_spike": 2, "clamp_saturation": 3}

    def when(e: Mapping[str, Any]) -> tuple[int, int, int]:  # a scream has an epoch, no step: it ends the epoch
        if e.get("event") == "init_eval":  # before the first step
            return (-1, -1, 0)
        epoch, step = e.get("epoch"), e.get("step")
        return (
            epoch if isinstance(epoch, int) else 1 << 62,
            step if isinstance(step, int) else 1 << 62,
            order.get(str(e.get("event")), 9),
        )

    evs = sorted(run.events, key=when)
    return pd.DataFrame(
        [
            {
                "event": e.get("event"),
                "epoch": e.get("epoch"),
                "batch": e.get("batch"),
                "step": e.get("step"),
                "details": event_text(e, run.path),
            }
            for e in evs
        ],
        columns=["event", "epoch", "batch", "step", "details"],
        dtype=object,
    )
