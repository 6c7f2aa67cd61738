"""How numbers read in every table stab prints or writes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def format_number(x: Any, digits: int = 3) -> str:
    """Numbers for reading: NaN and inf as such, missing as '-', never blank or zero."""
    if x is None:
        return "-"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def nan_place(ev: Mapping[str, Any]) -> str:
    """Where a first_nan event says the non-finite value started, in words: `in X (located, forward
    pass)` or `not located (not reproduced; candidates: a, b)` (`stability.forensics`); an event
    written before attribution existed (no `how`) as it said; with `; the input batch itself holds
    NaN or inf (the data)` where the event's `batch_finite` is False."""
    if ev.get("batch_finite") is False:  # the batch itself held NaN or inf: say so first
        return _nan_place(ev) + "; the input batch itself holds NaN or inf (the data)"
    return _nan_place(ev)


def _nan_place(ev: Mapping[str, Any]) -> str:
    how = ev.get("how")
    if how is None:
        return f"in {ev.get('module', '?')}"
    if how == "located":
        return f"in {ev.get('module')} (located, {ev.get('where')} pass)"
    names = ", ".join(c["group"] for c in ev.get("candidates") or []) or "none"
    return f"not located ({how}; candidates: {names})"
