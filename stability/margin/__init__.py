"""Stability margin: the largest learning rate at which each configuration still trains stably.

`search`: bracketing then bisection on one log grid of learning rates, every configuration one
probe per round (`find_margins`). `result`: what a search found, as margin.json's dict, its
sentence and margin.md. See `search`'s docstring for the grid and the probe counts.

    margins = find_margins(["pre", "post"], probe, lo=1e-3, hi=1e-1, tolerance=1.5, steps=10)
    res = result(margins, lo, hi, tolerance, wall_s, concurrency)
"""

from stability.margin.result import (
    borderline_text,
    comparison,
    factor_ratios,
    markdown,
    non_monotone_text,
    probe_text,
    result,
    sensitivity,
    sensitivity_floor,
)
from stability.margin.search import (
    LR_MAX,
    Margin,
    Probe,
    Search,
    find_margins,
    grid_size,
    promised_probes,
    replicate,
)

__all__ = [
    "LR_MAX",
    "Margin",
    "Probe",
    "Search",
    "borderline_text",
    "comparison",
    "factor_ratios",
    "find_margins",
    "grid_size",
    "markdown",
    "non_monotone_text",
    "probe_text",
    "promised_probes",
    "replicate",
    "result",
    "sensitivity",
    "sensitivity_floor",
]
