"""Learning-rate sensitivity of a sweep: how much final loss a configuration loses over the LR grid.

Wortsman et al. 2023 (arXiv 2309.14322, "Small-scale proxies for large-scale Transformer
training instabilities") summarise an LR-vs-loss curve by one number:

    LR sensitivity = E_{lr in grid} [ min(final_loss(lr), initial_loss) - min_{lr in grid} final_loss(lr) ]

A run that diverged (NaN/inf final loss) or ended worse than at initialisation counts as the
initial loss, so one blown-up LR cannot dominate the mean. 0 means every LR of the grid reached
the best loss; "qk_norm flattens the LR curve" reads as a smaller number with qk_norm=true.

    frame = pd.DataFrame([{"qk_norm": "false", "train.lr": 1e-3, "initial_loss": 4.5, "final_loss": 1.9}, ...])
    lr_sensitivity(frame)            # one row per qk_norm value

Initial loss is the first step's loss (the loss at initialisation, before any update):
`initial_loss(run_dir)` reads it from metrics.jsonl, falling back to summary.json's
loss_by_epoch[0] (the first epoch's mean, an underestimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.record.records import number

LR = "train.lr"
RESERVED = (LR, "initial_loss", "final_loss")


def lr_sensitivity(runs: pd.DataFrame, factors: Sequence[str] | None = None, lr: str = LR) -> pd.DataFrame:
    """One row per configuration of `factors` (default: every column but `lr`, initial_loss and
    final_loss), with: n_lr (distinct LRs), lrs, best_lr, best_final_loss, n_diverged (runs whose
    final loss was non-finite or above their initial loss) and lr_sensitivity (NaN below 2 LRs).

    Several runs at one (configuration, LR), e.g. seeds, are averaged after the clamp at the
    initial loss. Sorted by lr_sensitivity, most robust configuration first.
    """
    missing = [c for c in (lr, "initial_loss", "final_loss") if c not in runs.columns]
    if missing:
        raise ValueError(f"lr_sensitivity needs columns {', '.join(missing)}; it has {', '.join(map(str, runs.columns))}")
    factors = [c for c in runs.columns if c not in (lr, "initial_loss", "final_loss")] if factors is None else list(factors)
    df = runs[[*factors, lr, "initial_loss", "final_loss"]].copy()
    lrs = pd.to_numeric(df[lr], errors="coerce")
    if lrs.isna().any():
        bad = sorted(set(df.loc[lrs.isna(), lr].astype(str)))
        raise ValueError(f"lr_sensitivity: column {lr!r} has values that are not numbers: {', '.join(bad)}; "
                         f"pass each run's resolved learning rate (config.yaml train.lr)")
    df[lr] = lrs.astype(float)
    init = pd.to_numeric(df["initial_loss"], errors="coerce").astype(float)
    final = pd.to_numeric(df["final_loss"], errors="coerce").astype(float)
    bad = ~np.isfinite(final) | (final > init)
    df["_loss"] = np.where(bad, init, final)  # min(final, initial), a diverged run counts as initial
    df["_bad"] = bad

    rows = []
    groups = df.groupby(factors, dropna=False, sort=True) if factors else [((), df)]
    for key, part in groups:
        per_lr = part.groupby(lr, sort=True).agg(loss=("_loss", "mean"), bad=("_bad", "sum"))
        finite = per_lr["loss"][np.isfinite(per_lr["loss"])]
        best = float(finite.min()) if len(finite) else math.nan
        best_lr = float(finite.idxmin()) if len(finite) else math.nan
        sens = float((per_lr["loss"] - best).mean()) if len(per_lr) >= 2 and len(finite) else math.nan
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(factors, key)), "n_lr": len(per_lr), "lrs": list(per_lr.index),
                     "best_lr": best_lr, "best_final_loss": best, "n_diverged": int(per_lr["bad"].sum()),
                     "lr_sensitivity": sens})
    out = pd.DataFrame(rows, columns=[*factors, "n_lr", "lrs", "best_lr", "best_final_loss", "n_diverged",
                                      "lr_sensitivity"])
    return out.sort_values("lr_sensitivity", na_position="last", kind="stable").reset_index(drop=True)


def varies_lr(runs: pd.DataFrame, lr: str = LR) -> bool:
    """Whether a sweep's runs cover more than one learning rate (when the summary is worth showing)."""
    return lr in runs.columns and pd.to_numeric(runs[lr], errors="coerce").nunique() > 1


def initial_loss(run_dir: Path) -> float:
    """The loss at initialisation: the first step's loss in metrics.jsonl, else the first
    epoch's mean loss from summary.json, else NaN."""
    folder = RunFolder(run_dir)
    first = folder.first_step()
    if first is not None and rf.LOSS in first:
        return number(first[rf.LOSS])
    losses = folder.summary().loss_by_epoch
    return number(losses[0]) if losses else math.nan
