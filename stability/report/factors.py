"""What differs between runs: the factors of a report, each run's value of them, its label.

keys = factors(runs)                 # e.g. ["norm", "residual"]
factor_value(run, "residual")        # "0.1", from the run's resolved config
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stability.config import OPERATIONAL_KEYS, SHORT_NAMES, flatten
from stability.record.verdicts import is_judged
from stability.report.loading import Run

UNSET = "(default)"  # a factor a run did not override


# The short names and where each is read in a resolved config (the last stage's residual).
ALIAS_PATHS = {name: short.path for name, short in SHORT_NAMES.items()}


def _operational(key: str) -> bool:
    """Keys that say where or how a run ran, never what it computed: not factors."""
    return key in OPERATIONAL_KEYS or key.split(".")[0] == "hydra"


def factors(runs: Sequence[Run]) -> list[str]:
    """The keys whose values differ between runs: override keys (compared on the runs' resolved
    values, so `norm=post` and the default post-norm are one value), or config paths where a
    run's overrides are unknown (no overrides.json and no sweep.json entry). Operational keys
    (device, threads, trackers, hydra.*) are never factors."""
    if len(runs) < 2:
        return []
    if all(r.overrides is not None for r in runs):
        keys = [k for k in dict.fromkeys(k for r in runs for k in r.params) if not _operational(k)]
        by_path = {ALIAS_PATHS.get(k, k): k for k in reversed(keys)}  # `clip` and `train.clip` are one factor
        keys = [k for k in keys if by_path[ALIAS_PATHS.get(k, k)] == k]
        differ = [k for k in keys if len({factor_value(r, k) for r in runs}) > 1]
        if differ or len({json.dumps(r.config, sort_keys=True, default=str) for r in runs}) <= 1:
            return differ
    flat = [flatten(r.config or {}, keep_empty=True) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if not _operational(k) and len({repr(f.get(k)) for f in flat}) > 1]


def _canonical(v: Any) -> str:
    """One spelling per value: `10`, `10.0` and `1e1` -> `10`; quotes dropped; null/none -> `none`;
    booleans lower case."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    text = str(v).strip().strip("'\"")
    if text.lower() in ("none", "null"):
        return "none"
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        x = float(text)
    except ValueError:
        return text
    return f"{x:g}" if math.isfinite(x) else text


def factor_value(run: Run, key: str) -> str:
    """A run's value of a factor: the value its resolved config holds at that key (for a short
    name, where the model reads it), else its override, else UNSET; spelled canonically. A key
    the run did not set that has no effect in it (`Run.inert`) is UNSET too: a custom model's run
    without a fault holds the cascade's default fault.nan_module, which names no module of it."""
    flat = run.flat
    path = ALIAS_PATHS.get(key, key)
    if path in run.inert and key not in run.params and path not in run.params:
        return UNSET
    if path in flat:
        v = flat[path]
        return _canonical(v[-1] if key == "residual" and isinstance(v, list) and v else v)
    params = run.params
    if key in params:
        return _canonical(params[key])
    return UNSET


class _Absent:
    """A key one config has and the other lacks (e.g. a run recorded before the key existed)."""

    def __repr__(self) -> str:
        return "(absent)"

    __str__ = __repr__


ABSENT = _Absent()


def config_diff(defaults: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, default, this run's value) for every leaf that differs, in the config's order;
    a key only one side has gives ABSENT on the other."""
    a, b = flatten(defaults, keep_empty=True), flatten(actual, keep_empty=True)
    rows = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if not _same(va, vb):
            rows.append((key, va, vb))
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def labels(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, str]:
    """Short names for runs (by `rel`): the differing overrides each sets (`residual=0.1 norm=pre`),
    or the config values where factors are config paths; the folder is added where names collide."""
    override_keys = {k for r in runs for k in r.params}
    base = {}
    for r in runs:
        params = r.params
        mine = [k for k in keys if k in params or k not in override_keys]
        base[r.rel] = " ".join(f"{k}={factor_value(r, k)}" for k in mine)
    count: dict[str, int] = {}
    for name in base.values():
        count[name] = count.get(name, 0) + 1
    return {
        rel: (name if name and count[name] == 1 else f"{name} ({rel})".strip() if name else rel)
        for rel, name in base.items()
    }


def _value_order(v: str) -> tuple[int, float, str]:
    if v == UNSET:
        return (2, 0.0, v)
    try:
        x = float(v)
    except ValueError:
        return (1, 0.0, v)
    return (0, x, v) if not math.isnan(x) else (1, 0.0, v)


def sort_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Run]:
    """By folder group (sweep), then by factor values (numbers numerically)."""
    return sorted(runs, key=lambda r: (r.group, [_value_order(factor_value(r, k)) for k in keys], r.rel))


# --- statistics: seeds are replication ---------------------------------------------------------

REPLICATE = ("seed",)  # keys whose values are replicates of one configuration, never factors
ALPHA = 0.05  # significance level of the tests and 1 - the level of the intervals


def design_factors(keys: Sequence[str]) -> list[str]:
    """The factors of a report that are treatments (every key but the replicate keys: `seed`)."""
    return [k for k in keys if k not in REPLICATE]


def replicates(runs: Sequence[Run], keys: Sequence[str]) -> tuple[list[Run], list[Run]]:
    """The runs that count as replicates, and the repeats left out: of the runs that agree on
    every factor in `keys` (seed included, so they are one configuration trained with one seed
    more than once: `stab run` twice into one folder, or a probe and a sweep job spelt apart),
    only the one that finished last counts. Counting a repeat would be pseudo-replication: the
    same seed gives the same run, and two copies of one run are not two pieces of evidence.
    Runs that are not judged (running, failed, interrupted) are kept as they are: the tables
    leave them out anyway. Both lists keep the order of `runs`."""
    latest: dict[tuple[str, ...], Run] = {}
    for r in runs:
        if not is_judged(r.verdict):
            continue
        key = tuple(factor_value(r, k) for k in keys)
        if key not in latest or _finished(r) >= _finished(latest[key]):
            latest[key] = r
    kept = {id(r) for r in latest.values()}
    return (
        [r for r in runs if id(r) in kept or not is_judged(r.verdict)],
        [r for r in runs if is_judged(r.verdict) and id(r) not in kept],
    )


def repeats_text(repeats: Sequence[Run]) -> str:
    """One sentence naming the runs `replicates` left out."""
    shown = ", ".join(r.rel for r in repeats[:3]) + (", ..." if len(repeats) > 3 else "")
    return (
        f"{len(repeats)} run(s) repeat the configuration and seed of another run ({shown}): "
        "each configuration and seed is counted once (the run that finished last); use another "
        "seed (seed=1,2,...) to replicate."
    )


def _finished(run: Run) -> float:
    t = run.status.get("finished")
    return float(t) if isinstance(t, (int, float)) else -math.inf


def share_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval (statsmodels) of a share k/n at level 1 - alpha; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def median_interval(
    values: Sequence[float], level: float = 1 - ALPHA, *, nonfinite_worst: bool = False
) -> tuple[float, float, float, float]:
    """(median, lo, hi, coverage) of the finite `values`: the distribution-free order-statistic
    interval [x_(j), x_(n+1-j)] for the median, the narrowest symmetric one whose coverage
    (1 - 2 P(Binom(n, 1/2) <= j - 1), scipy) reaches `level`. Below 6 values none does: the
    interval is then [min, max] and `coverage` says how much it covers (3 values: 75%, 5: 94%).
    With `nonfinite_worst` a NaN or inf value ranks above every finite one (+inf: a loss that went
    NaN is the worst loss, not a missing one), so that a median over seeds where most runs went
    NaN is inf rather than the one finite run's; without it non-finite values are left out.
    NaNs for no value to rank."""
    if nonfinite_worst:
        values = [v if math.isfinite(v) else math.inf for v in values]
        x = sorted(values)
    else:
        x = sorted(v for v in values if math.isfinite(v))
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    med = float(np.median(x))
    if n == 1:
        return med, x[0], x[0], 0.0
    from scipy.stats import binom

    best = (x[0], x[-1], float(1 - 2 * binom.cdf(0, n, 0.5)))
    for j in range(2, n // 2 + 1):
        cov = float(1 - 2 * binom.cdf(j - 1, n, 0.5))
        if cov < level:
            break
        best = (x[j - 1], x[n - j], cov)
    return med, best[0], best[1], best[2]


def fisher_p(bad_a: int, n_a: int, bad_b: int, n_b: int) -> float:
    """Two-sided Fisher's exact test (scipy) of unstable counts bad_a/n_a against bad_b/n_b."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[bad_a, n_a - bad_a], [bad_b, n_b - bad_b]])[1])


def runs_needed(alpha: float = ALPHA, pairs: int = 1) -> int:
    """The fewest runs per value at which even a clean split (0/m unstable against m/m) reaches
    Fisher's two-sided p < alpha / pairs (Bonferroni over `pairs` comparisons): 4 at 0.05."""
    m = 1
    while fisher_p(0, m, m, m) >= alpha / pairs:
        m += 1
    return m


def factor_test(counts: Sequence[tuple[str, int, int]], alpha: float = ALPHA) -> dict[str, Any]:
    """Whether a factor's values differ in their unstable share. counts: (value, unstable, runs
    judged) per value. The value with the lowest share against the one with the highest, by
    Fisher's exact test, Bonferroni-corrected over the value pairs when there are more than two.
    Returns {"lo", "hi" (the two (value, bad, n)), "p" (corrected), "decisive" (p < alpha),
    "pairs", "needed" (runs per value a clean split needs)}; p is NaN with fewer than 2 values
    with runs."""
    have = [c for c in counts if c[2] > 0]
    pairs = max(1, len(have) * (len(have) - 1) // 2)
    out: dict[str, Any] = {
        "lo": None,
        "hi": None,
        "p": math.nan,
        "decisive": False,
        "pairs": pairs,
        "needed": runs_needed(alpha, pairs),
    }
    if len(have) < 2:
        return out
    lo = min(have, key=lambda c: c[1] / c[2])
    hi = max(have, key=lambda c: c[1] / c[2])
    p = min(1.0, fisher_p(lo[1], lo[2], hi[1], hi[2]) * pairs)
    out.update(lo=lo, hi=hi, p=p, decisive=bool(p < alpha and hi[1] / hi[2] > lo[1] / lo[2]))
    return out
