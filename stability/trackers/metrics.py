"""What a run-folder record becomes for a tracker: named numbers (`step_metrics`,
`epoch_metrics`, `summary_metrics`), the run's params (`run_params`) and an event as text.

    step_metrics({"step": 3, "loss": 2.1, "grad/norm": 0.8, "finite": True})   # {"loss": 2.1, ..., "finite": 1.0}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stability.config import OPERATIONAL_KEYS, SHORT_NAMES, RunConfig, flatten
from stability.record import verdicts as vd

# Record keys that are coordinates, not measurements.
_COORDS = ("step", "epoch", "batch")
# Per-epoch lists indexed by stage: epoch/stage{i}/<name>.
_STAGE_LISTS = {"stage_rms": "rms", "stage_ratio": "ratio", "stage_scale": "scale", "stage_clamp_rate": "clamp_rate"}


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
