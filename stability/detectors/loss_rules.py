"""The divergence rules of `verdict.diagnose`: which loss a run is judged on and against what
(`loss_reference`), the `diverged` finding, and the warnings of what could not be judged.

Validation against validation: the last validation loss against the validation loss at
initialisation, else against the workload's no-learning baseline; a run without validation data
is judged on its last epoch's mean training loss against the first step's, taken before any
update (Wortsman et al. 2023, arXiv 2309.14322, count a run that ended worse than it started as a
complete failure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stability.detectors.findings import Findings
from stability.detectors.series import as_float, divergence


@dataclass(frozen=True)
class Loss:
    """The loss divergence is judged on: `vals` per epoch (the validation loss; the mean training
    loss where the run has no validation data), named `name`, against `reference` (named
    `ref_name`: the validation loss at initialisation, else the no-learning baseline, else the
    first step's training loss; NaN: none), and where it ended (`last`, `ratio` = last/reference)."""

    vals: list[Any]
    name: str
    reference: float
    ref_name: str
    init_val: float
    baseline: float
    has_val: bool
    last: float
    ratio: float

    def fields(self) -> dict[str, float]:
        """{"val_loss_init", "baseline_loss", "loss_ratio"}: the loss as `diagnose` returns it."""
        return {"val_loss_init": self.init_val, "baseline_loss": self.baseline, "loss_ratio": self.ratio}


def loss_reference(epochs: Sequence[dict[str, Any]], init: dict[str, Any], first_train_loss: float) -> Loss:
    """What divergence compares (`Loss`): validation against validation where the run has it."""
    vals = [e.get("val_loss", math.nan) for e in epochs]
    init_val = as_float(init.get("val_loss"))
    baseline = as_float(init.get("baseline_loss"))
    first_train = as_float(first_train_loss)
    has_val = any(math.isfinite(as_float(v)) for v in vals)
    name = "validation loss"
    if math.isfinite(init_val):
        reference, ref_name = init_val, "its validation loss at initialisation"
    elif math.isfinite(baseline):
        reference, ref_name = baseline, f"the no-learning baseline ({init.get('baseline') or 'baseline'})"
    elif not has_val and math.isfinite(first_train):
        # No validation data (a monitor, Trainer or Lightning run without `val`): the training loss
        # against the first step's, taken before any update, so still the loss at initialisation
        vals = [as_float(e.get("loss", math.nan)) for e in epochs]
        name = "mean training loss of the last epoch (no validation data)"
        reference, ref_name = first_train, "the first step's training loss"
    else:
        reference, ref_name = math.nan, ""
    last, ratio = divergence(vals, reference) if vals else (math.nan, math.nan)
    return Loss(vals, name, reference, ref_name, init_val, baseline, has_val, last, ratio)


def unjudged(loss: Loss) -> list[dict[str, Any]]:
    """The warnings of what could not be judged: `no_validation` (no scream check; divergence on
    the training loss or not at all), `divergence_not_judged` (nothing to compare with)."""
    if not loss.has_val:
        return [
            {
                "warning": "no_validation",
                "message": "no validation data: the scream check did not run"
                + (
                    f", and divergence was judged on the training loss against {loss.ref_name}"
                    if math.isfinite(loss.reference)
                    else ", and divergence was not judged (no loss at initialisation to compare with)"
                ),
            }
        ]
    if not math.isfinite(loss.reference):
        return [
            {
                "warning": "divergence_not_judged",
                "message": "no validation loss at initialisation and no no-learning baseline: whether the run "
                "ended worse than it started was not judged",
            }
        ]
    return []


def judge_divergence(
    found: Findings, loss: Loss, epochs: Sequence[dict[str, Any]], first_nan: dict[str, Any] | None
) -> None:
    """The `diverged` finding: the loss ended above its reference, or non-finite (not after a NaN:
    that is the `nan` finding); an end within `band` of the reference is borderline."""
    last, ratio = loss.last, loss.ratio
    if not first_nan and loss.vals and (ratio > 1.0 or (not math.isfinite(last) and math.isfinite(ratio))):
        found.flags.append(
            {
                "flag": "diverged",
                "epoch": epochs[-1]["epoch"],
                "ratio": ratio,
                "evidence": f"{loss.name} ended at {last:.4g}, above {loss.ref_name} {loss.reference:.4g} "
                f"({ratio:.3g}x): the run ended worse than it started",
            }
        )
    if math.isfinite(ratio) and found.lo <= ratio <= found.hi:
        found.borderline.append(
            {
                "what": "final loss",
                "value": ratio,
                "threshold": 1.0,
                "message": f"{loss.name} ended at {last:.4g}, within {found.band:.0%} of {loss.ref_name} "
                f"{loss.reference:.4g}: cannot tell a run that barely learned from one that diverged",
            }
        )


def warn_above_baseline(found: Findings, loss: Loss, init: dict[str, Any]) -> None:
    """The `above_baseline` warning: a run not diverged whose validation loss ended above the
    workload's no-learning baseline (it learned less than that baseline predicts)."""
    init_val, baseline, last = loss.init_val, loss.baseline, loss.last
    if (
        math.isfinite(init_val)
        and math.isfinite(baseline)
        and math.isfinite(last)
        and last > baseline
        and not any(f["flag"] == "diverged" for f in found.flags)
    ):
        found.warnings.append(
            {
                "warning": "above_baseline",
                "baseline": baseline,
                "last": last,
                "message": f"validation loss ended at {last:.4g}, above the no-learning baseline "
                f"{baseline:.4g} ({init.get('baseline') or 'baseline'}): the model has not "
                "learned more than that baseline predicts",
            }
        )
