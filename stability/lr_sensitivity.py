"""Learning-rate sensitivity of a sweep: how much final loss a configuration loses over the LR grid.

Wortsman et al. 2023 (arXiv 2309.14322, "Small-scale proxies for large-scale Transformer
training instabilities") summarise an LR-vs-loss curve by one number:

    LR sensitivity = E_{lr in grid} [ min(final_loss(lr), initial_loss) - min_{lr in grid} final_loss(lr) ]

A run that diverged (NaN/inf final loss) or ended worse than at initialisation counts as the
initial loss, so one blown-up LR cannot dominate the mean. 0 means every LR of the grid reached
the best loss; "qk_norm flattens the LR curve" reads as a smaller number with qk_norm=true.

    frame = pd.DataFrame([{"qk_norm": "false", "train.lr": 1e-3, "initial_loss": 4.5, "final_loss": 1.9}, ...])
    lr_sensitivity(frame)            # one row per qk_norm value

The initial loss is the validation loss at initialisation, measured before the first step
(summary.json's val_loss_init, the init_eval event): the final loss it caps is a validation loss
too, so the two are measured on the same data. (The first training batch's loss, used before,
is another batch: on the cascade smoke preset 23.4 against 25.4 on validation, so every run that
barely moved counted as diverged.) Runs recorded before init_eval existed fall back to the first
step's loss, and say so (`initial_loss_source`). Every term is >= 0, so the sensitivity is too.

With a `stable` column (the run's verdict was not unstable), a configuration with no stable run
in the grid gets a warning: its sensitivity is then only the cap (every LR failed), and a small
number there means "fails everywhere", not "robust".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stability.record import format as rf

LR = "train.lr"
RESERVED = (LR, "initial_loss", "final_loss", "stable")


COLUMNS = ("n_lr", "lrs", "best_lr", "best_final_loss", "n_diverged", "n_stable_lr", "lr_sensitivity", "warning")


def lr_sensitivity(runs: pd.DataFrame, factors: Sequence[str] | None = None, lr: str = LR) -> pd.DataFrame:
    """One row per configuration of `factors` (default: every column but `lr`, initial_loss and
    final_loss), with: n_lr (distinct LRs), lrs, best_lr, best_final_loss, n_diverged (runs whose
    final loss was non-finite or above their initial loss) and lr_sensitivity (NaN below 2 LRs).

    Several runs at one (configuration, LR), e.g. seeds, are averaged after the clamp at the
    initial loss. Sorted by lr_sensitivity, most robust configuration first. Raises ValueError
    naming a missing column or the values of `lr` that are not numbers.
    """
    factors = [c for c in runs.columns if c not in (lr, *RESERVED)] if factors is None else list(factors)
    df = _clamped(runs, factors, lr)
    groups = df.groupby(factors, dropna=False, sort=True) if factors else [((), df)]
    rows = [_configuration(factors, key, part, lr) for key, part in groups]
    out = pd.DataFrame(rows, columns=[*factors, *COLUMNS])
    return out.sort_values("lr_sensitivity", na_position="last", kind="stable").reset_index(drop=True)


def _clamped(runs: pd.DataFrame, factors: list[str], lr: str) -> pd.DataFrame:
    """The runs' factors, numeric `lr`, and each run's loss clamped at its initial loss (`_loss`;
    `_bad`: diverged, its final loss non-finite or above the initial; `_stable`: the verdict, or
    True without a `stable` column). Raises ValueError on a missing column or a non-numeric lr."""
    missing = [c for c in (lr, "initial_loss", "final_loss") if c not in runs.columns]
    if missing:
        raise ValueError(
            f"lr_sensitivity needs columns {', '.join(missing)}; it has {', '.join(map(str, runs.columns))}"
        )
    df = runs[[*factors, lr, "initial_loss", "final_loss"]].copy()
    df["_stable"] = runs["stable"].astype(bool) if "stable" in runs.columns else True
    lrs = pd.to_numeric(df[lr], errors="coerce")
    if lrs.isna().any():
        bad = sorted(set(df.loc[lrs.isna(), lr].astype(str)))
        raise ValueError(
            f"lr_sensitivity: column {lr!r} has values that are not numbers: {', '.join(bad)}; "
            f"pass each run's resolved learning rate (config.yaml train.lr)"
        )
    df[lr] = lrs.astype(float)
    init = pd.to_numeric(df["initial_loss"], errors="coerce").astype(float)
    final = pd.to_numeric(df["final_loss"], errors="coerce").astype(float)
    bad = ~np.isfinite(final) | (final > init)
    df["_loss"] = np.where(bad, init, final)  # min(final, initial), a diverged run counts as initial
    df["_bad"] = bad
    return df


def _configuration(factors: list[str], key: Any, part: pd.DataFrame, lr: str) -> dict[str, Any]:
    """One configuration's row (see `lr_sensitivity`): its runs `part` averaged per LR, the best
    LR and loss, the sensitivity (the mean excess over the best, NaN below 2 LRs), the counts."""
    per_lr = part.groupby(lr, sort=True).agg(loss=("_loss", "mean"), bad=("_bad", "sum"), stable=("_stable", "all"))
    finite = per_lr["loss"][np.isfinite(per_lr["loss"])]
    best = float(finite.min()) if len(finite) else math.nan
    best_lr = float(finite.idxmin()) if len(finite) else math.nan
    sens = float((per_lr["loss"] - best).clip(lower=0).mean()) if len(per_lr) >= 2 and len(finite) else math.nan
    key = key if isinstance(key, tuple) else (key,)
    n_stable = int(per_lr["stable"].sum())
    warning = (
        "no stable learning rate in the grid: the sensitivity measures a configuration that fails everywhere"
        if n_stable == 0
        else ""
    )
    return {
        **dict(zip(factors, key)),
        "n_lr": len(per_lr),
        "lrs": list(per_lr.index),
        "best_lr": best_lr,
        "best_final_loss": best,
        "n_diverged": int(per_lr["bad"].sum()),
        "n_stable_lr": n_stable,
        "lr_sensitivity": sens,
        "warning": warning,
    }


def varies_lr(runs: pd.DataFrame, lr: str = LR) -> bool:
    """Whether a sweep's runs cover more than one learning rate (when the summary is worth showing)."""
    return lr in runs.columns and pd.to_numeric(runs[lr], errors="coerce").nunique() > 1


def initial_loss(run_dir: Path) -> float:
    """The loss at initialisation (see the module docstring): the validation loss before the
    first step (summary.json val_loss_init, else the init_eval event of events.jsonl), else, for
    a run recorded before that existed, the first step's training loss in metrics.jsonl, else the
    first epoch's mean loss from summary.json, else NaN."""
    return initial_loss_source(run_dir)[0]


def initial_loss_source(run_dir: Path) -> tuple[float, str]:
    """(`initial_loss`, where it came from: "validation at init" | "first training step" |
    "first epoch's mean" | "none")."""
    run_dir = Path(run_dir)
    try:
        v = float(json.loads((run_dir / rf.SUMMARY).read_text()).get("val_loss_init", math.nan))
        if math.isfinite(v):
            return v, "validation at init"
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    try:
        with open(run_dir / rf.EVENTS, encoding="utf-8") as f:
            for line in f:
                ev = json.loads(line)
                if ev.get("event") == "init_eval" and math.isfinite(float(ev.get("val_loss", math.nan))):
                    return float(ev["val_loss"]), "validation at init"
    except (OSError, ValueError, TypeError):
        pass
    try:
        with open(run_dir / rf.METRICS, encoding="utf-8") as f:
            first = f.readline()
        if first.strip():
            return float(json.loads(first)["loss"]), "first training step"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        losses = json.loads((run_dir / rf.SUMMARY).read_text())["loss_by_epoch"]
        return float(losses[0]), "first epoch's mean"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return math.nan, "none"
