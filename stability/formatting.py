"""How numbers read in every table stab prints or writes."""

from __future__ import annotations

import math
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
