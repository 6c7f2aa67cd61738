"""The report's tables over runs as data frames: the overview, runs.csv, the factor summary and
the learning-rate sensitivity (the answer is `answer.py`, one run's tables for `stab show`
`runtables.py`). NaN and inf stay NaN and inf; display frames hold strings.

    over = overview(runs, keys)          # the printed table
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from stability.formatting import format_number
from stability.lr_sensitivity import initial_loss, lr_sensitivity, varies_lr
from stability.record import verdicts as vd
from stability.report.answer import UNSTABLE
from stability.report.factors import (
    _value_order,
    design_factors,
    factor_value,
)
from stability.report.loading import Run, _float


def first_nan_text(nan: Mapping[str, Any] | None) -> str:
    """`e3 b205 stage2.layer0.mlp`: 1-based epoch, 0-based batch within it, module group."""
    if not nan:
        return "-"
    if nan.get("how") not in (None, "located"):  # not located: the likeliest candidate, marked as such
        top = (nan.get("candidates") or [{}])[0].get("group")
        return f"e{nan.get('epoch', '?')} b{nan.get('batch', '?')} {top + '?' if top else '?'} ({nan['how']})"
    return f"e{nan.get('epoch', '?')} b{nan.get('batch', '?')} {nan.get('module') or '?'}"


def _series_text(values: Sequence[float], keep: int = 8) -> str:
    cells = [format_number(v) for v in values]
    if len(cells) > keep:  # the start and the end; runs.csv has all of them
        cells = [*cells[:3], "…", *cells[-(keep - 4) :]]
    return " ".join(cells) or "-"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return format_number(seconds)
    if seconds < 10:
        return f"{seconds:.2g} s"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def overview(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """The printed table: one row per run, as display strings (NaN/inf spelled out)."""
    ids = [(r.group, *(factor_value(r, k) for k in keys)) for r in runs]
    show_run = not keys or len(set(ids)) < len(ids)  # the factors do not tell the runs apart
    show_group = not show_run and len({r.group for r in runs}) > 1
    show_state = any(r.state not in ("completed", "failed") for r in runs)  # failed: the verdict says so
    rows = []
    for r in runs:
        row: dict[str, str] = {}
        if show_run:
            row["run"] = r.rel
        elif show_group:
            row["sweep"] = r.group or "."
        row.update({k: factor_value(r, k) for k in keys})
        if show_state:
            row["state"] = r.state
        maxes = r.series("grad_norm_max_by_epoch")
        scream = r.scream_epoch
        wall = r.wall_s
        row.update(
            {
                "verdict": r.verdict,
                "first NaN": first_nan_text(r.first_nan),
                # warning time: steps between the first grad/loss spike and the first NaN
                "spike lead": f"{r.summary['spike_lead_steps']} steps"
                if r.summary.get("spike_lead_steps") is not None
                else "-",
                "scream": f"e{scream}" if scream is not None else "-",
                "grad norm per epoch": _series_text(r.series("grad_norm_by_epoch")),
                "max, last epoch": format_number(maxes[-1]) if maxes else "-",
                "final loss": format_number(r.final_loss),
                "max attn logit": format_number(_health(r).get("attn_logit_max")),
                "wall": _duration(wall),
            }
        )
        rows.append(row)
    frame = pd.DataFrame(rows)
    optional = [c for c in ("spike lead", "max attn logit") if c in frame and (frame[c] == "-").all()]
    return frame.drop(columns=optional)  # columns with nothing to say for these runs


def _health(run: Run) -> dict[str, Any]:
    """The last evaluated epoch's health summary (attention entropy, max logit, sinks, ...)."""
    return next((e["health_summary"] for e in reversed(run.epochs) if e.get("health_summary")), {})


_HEALTH_FIELDS = ("attn_entropy_min", "attn_logit_max", "sink_max", "sink_layers", "massive_max", "grad_sink_max")
_SUMMARY_FIELDS = (
    "evidence",
    "scream_epoch",
    "final_loss",
    "final_val_loss",
    "growth_per_epoch",
    "first_spike_step",
    "spike_lead_steps",
    "n_grad_spikes",
    "n_loss_spikes",
    "clip_rate",
    "nonfinite_steps",
    "epochs_run",
    "steps",
    "stopped_early",
    "latent_scale",
    "device",
    "wall_s",
)
_NAN_FIELDS = ("epoch", "batch", "step", "kind", "how", "module", "where", "loss", "grad_norm")


def runs_frame(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """runs.csv: one row per run with every number; NaN/inf kept, None (not applicable) as None."""
    n_epochs = max((len(r.series("grad_norm_by_epoch")) for r in runs), default=0)
    n_stages = max((len(r.summary.get("stage_rms_last_epoch") or []) for r in runs), default=0)
    fixed = {"path", "sweep", "run_id", "state", "verdict", "warnings", "overrides", "error"}
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "path": r.rel,
            "sweep": r.group,
            "run_id": r.summary.get("run_id") or r.status.get("run_id"),
            "state": r.state,
            "verdict": r.verdict,
        }
        for k in keys:
            row[f"override.{k}" if k in fixed else k] = factor_value(r, k)
        row["overrides"] = " ".join(r.overrides) if r.overrides is not None else None
        row["last_finite_grad_norm"] = r.last_finite_grad
        nan = r.first_nan or {}
        row.update({f"first_nan_{f}": nan.get(f) for f in _NAN_FIELDS})
        for f in _SUMMARY_FIELDS:
            row[f] = r.summary.get(f)
        if "scream_epoch" not in r.summary:
            row["scream_epoch"] = r.scream_epoch
        if "final_loss" not in r.summary and r.epochs:
            row["final_loss"] = r.final_loss
        if row["wall_s"] is None:
            row["wall_s"] = r.wall_s
        codec = r.summary.get("codec") or r.data.get("codec") or {}
        row.update({f"codec_{k}": codec.get(k) for k in ("weights", "seed", "checksum")})
        row["steps_recorded"] = r.steps_recorded
        health = _health(r)
        row.update({f"health_{k}": health.get(k) for k in _HEALTH_FIELDS})
        for key, name in (
            ("grad_norm_by_epoch", "grad_mean"),
            ("grad_norm_max_by_epoch", "grad_max"),
            ("loss_by_epoch", "loss"),
            ("val_loss_by_epoch", "val_loss"),
        ):
            s = r.series(key)
            row.update({f"{name}_e{e}": (s[e - 1] if e <= len(s) else None) for e in range(1, n_epochs + 1)})
        for key, name in (("stage_rms_last_epoch", "rms"), ("stage_scale_last_epoch", "scale")):
            s = r.summary.get(key) or []
            row.update({f"stage{i}_{name}_last": (_float(s[i]) if i < len(s) else None) for i in range(n_stages)})
        row["error"] = r.status.get("error")
        row["warnings"] = "; ".join(r.warnings)
        rows.append(row)
    # object dtype keeps None (not applicable: no NaN happened) apart from NaN (a NaN result), and ints as ints
    return pd.DataFrame(rows, dtype=object)


def factor_summary(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """For each factor and value: runs, share per verdict, median of the last finite grad norm.
    `seed` is replication, not a factor (`design_factors`): it has no rows here."""
    rows = []
    others = sorted({r.verdict for r in runs} - set(vd.ORDER))
    for k in design_factors(keys):
        values = sorted({factor_value(r, k) for r in runs}, key=_value_order)
        for v in values:
            mine = [r for r in runs if factor_value(r, k) == v]
            row: dict[str, Any] = {"factor": k, "value": v, "runs": len(mine)}
            for verdict in (*vd.ORDER, *others):
                row[verdict] = sum(r.verdict == verdict for r in mine) / len(mine)
            finite = [g for g in (r.last_finite_grad for r in mine) if math.isfinite(g)]
            row["median last grad norm"] = statistics.median(finite) if finite else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def factor_display(summary: pd.DataFrame) -> pd.DataFrame:
    """factor_summary as strings: shares in percent, the median as a number."""
    out = summary.copy()
    for col in out.columns:
        if col in ("factor", "value", "runs"):
            out[col] = out[col].astype(str)
        elif col == "median last grad norm":
            out[col] = [format_number(v) for v in out[col]]
        else:
            out[col] = [f"{round(100 * v)}%" for v in out[col]]
    return out


def lr_summary(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame | None:
    """Wortsman et al.'s LR sensitivity per configuration of the other factors, when the
    completed runs cover more than one learning rate; None otherwise."""
    done = [r for r in runs if r.config and r.summary.get("verdict") not in (None, "failed")]
    others = [k for k in design_factors(keys) if k not in ("train.lr", "lr")]  # seeds: averaged per LR
    frame = pd.DataFrame(
        [
            {
                **{k: factor_value(r, k) for k in others},
                "train.lr": (r.config or {})["train"]["lr"],
                "initial_loss": initial_loss(r.path),  # validation loss at init, as the final one
                # validation loss, not the last training batch's (one batch is noisy)
                "final_loss": _float(r.summary.get("final_val_loss")),
                "stable": r.verdict not in UNSTABLE,
            }
            for r in done
        ]
    )
    if frame.empty or not varies_lr(frame):
        return None
    return lr_sensitivity(frame, factors=others)


def lr_display(table: pd.DataFrame) -> pd.DataFrame:
    """The LR-sensitivity table for reading: 3 significant digits, the LR grid as text."""
    shown = table.copy()
    for col in ("best_lr", "best_final_loss", "lr_sensitivity"):
        if col in shown:
            shown[col] = shown[col].map(format_number)
    if "lrs" in shown:
        shown["lrs"] = shown["lrs"].map(
            lambda v: ", ".join(format_number(float(x)) for x in v) if isinstance(v, (list, tuple)) else str(v)
        )
    return shown
