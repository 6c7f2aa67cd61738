"""The report's answer: per factor and value, the unstable share of the runs judged with its
Wilson interval, Fisher's exact test of each factor, the one-sentence answer; and the same per
configuration (seeds pooled).

    table, sentence = answer(runs, keys)   # unstable share per factor value, and the decisive factor
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import pandas as pd

from stability.formatting import format_number
from stability.record import verdicts as vd
from stability.report.factors import (
    ALPHA,
    _value_order,
    design_factors,
    factor_test,
    factor_value,
    median_interval,
    runs_needed,
    share_interval,
)
from stability.report.loading import Run, _float

UNSTABLE = vd.UNSTABLE  # verdicts that count as "unstable" in the answer
NOT_JUDGED = (vd.INCONCLUSIVE,)  # a verdict that says the run could not be judged: counted apart
DECISIVE = ALPHA  # a factor is decisive when Fisher's exact test on its unstable counts gives p below this


def _max_grad(run: Run) -> float:
    finite = [g for g in run.series("grad_norm_max_by_epoch") if math.isfinite(g)]
    return max(finite) if finite else math.nan


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _interval_text(lo: float, hi: float, coverage: float | None = None) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    cov = f" ({coverage:.0%})" if coverage is not None and math.isfinite(coverage) and coverage < 0.95 - 1e-9 else ""
    return f"{_ranked_text(lo)}..{_ranked_text(hi)}{cov}"


def _ranked_text(x: float) -> str:
    """A median or bound of values where NaN and inf ranked as the worst (`median_interval`'s
    `nonfinite_worst`): `non-finite` for those, the number otherwise."""
    return "non-finite" if isinstance(x, float) and math.isinf(x) else format_number(x)


def _share_row(mine: Sequence[Run], apart: int) -> dict[str, Any]:
    """unstable k/n with its Wilson interval, the runs not counted, the median final validation
    loss and the median largest grad norm with their order-statistic intervals."""
    bad = sum(r.verdict in UNSTABLE for r in mine)
    n = len(mine)
    lo, hi = share_interval(bad, n)
    # a final validation loss that went NaN or inf ranks as the worst loss, not a missing one
    med, mlo, mhi, cov = median_interval([_float(r.summary.get("final_val_loss")) for r in mine], nonfinite_worst=True)
    gmed, glo, ghi, gcov = median_interval([_max_grad(r) for r in mine])
    return {
        "unstable": f"{bad}/{n}",
        "unstable_share": bad / n if n else math.nan,
        "95% interval": f"{lo:.0%}..{hi:.0%}" if n else "-",
        "not counted": apart,
        "median final val loss": med,
        "val loss interval": _interval_text(mlo, mhi, cov),
        "median max grad norm": gmed,
        "grad norm interval": _interval_text(glo, ghi, gcov),
    }


def _counted(r: Run) -> bool:
    """A run that counts towards the unstable share: judged, not inconclusive, and no borderline
    finding that could change its verdict (`verdicts.in_doubt`: a NaN run near the divergence
    threshold is still a NaN run)."""
    return r.verdict not in NOT_JUDGED and not vd.in_doubt(
        r.verdict, r.summary.get("borderline"), r.summary.get("flags")
    )


ANSWER_COLUMNS = [
    "factor",
    "value",
    "unstable",
    "unstable_share",
    "95% interval",
    "not counted",
    "median final val loss",
    "val loss interval",
    "median max grad norm",
    "grad norm interval",
]


def answer(runs: Sequence[Run], keys: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """The report's opening: per factor and value, unstable runs (`UNSTABLE`) out of the runs
    judged, with a 95% Wilson interval (statsmodels); runs `inconclusive` or flagged
    `borderline` are counted apart ("not counted") and never make a factor decisive; the median
    final validation loss and the median largest grad norm with order-statistic intervals
    (`factors.median_interval`: with fewer than 6 runs the interval is the range and its
    coverage is shown). `seed` is replication, never a factor. A factor is decisive only when
    Fisher's exact test (scipy) on its unstable counts gives p < 0.05 (Bonferroni-corrected over
    the pairs of values); with too few runs per value for any split to pass, the sentence says
    the answer is untested and how many seeds it would need."""
    facs = design_factors(keys)
    judged = [r for r in runs if vd.is_judged(r.verdict)]
    counted = [r for r in judged if _counted(r)]
    seeds = len({factor_value(r, "seed") for r in counted}) if "seed" in keys else 1
    rows: list[dict[str, Any]] = []
    findings = _Findings()
    for k in facs:
        counts = _factor_rows(k, judged, counted, rows)
        if len(counts) >= 2:
            findings.add(k, counts, seeds)
    aside = _not_counted_aside(runs, judged)
    sentence = _answer_sentence(facs, judged, counted, seeds, aside, findings)
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS), sentence


def _factor_rows(
    k: str, judged: Sequence[Run], counted: Sequence[Run], rows: list[dict[str, Any]]
) -> list[tuple[str, int, int]]:
    """Append one answer row per value of factor `k` to `rows`; return (value, unstable runs,
    runs counted) per value, for `factor_test`."""
    values = sorted({factor_value(r, k) for r in judged}, key=_value_order)
    counts = []
    for v in values:
        mine = [r for r in counted if factor_value(r, k) == v]
        apart = sum(factor_value(r, k) == v for r in judged) - len(mine)
        bad = sum(r.verdict in UNSTABLE for r in mine)
        counts.append((v, bad, len(mine)))
        rows.append({"factor": k, "value": v, **_share_row(mine, apart)})
    return counts


class _Findings:
    """What Fisher's exact test said of each factor, in words, with the key each list is sorted
    by: decisive (by p), untested for too few runs (by the spread of the share, widest first),
    tested and not significant (likewise)."""

    def __init__(self) -> None:
        self.decisive: list[tuple[float, str]] = []
        self.untested: list[tuple[float, str]] = []
        self.tested: list[tuple[float, str]] = []

    def add(self, k: str, counts: Sequence[tuple[str, int, int]], seeds: int) -> None:
        """File factor `k` (its (value, unstable, runs) counts; `seeds` replicates per
        configuration) under what its test said; nothing when no two values have runs."""
        t = factor_test(counts)
        if t["lo"] is None:
            return
        lo, hi = t["lo"], t["hi"]
        text = f"{k}: {lo[1]}/{lo[2]} unstable at {lo[0]} vs {hi[1]}/{hi[2]} at {hi[0]}"
        spread = hi[1] / hi[2] - lo[1] / lo[2]
        if t["decisive"]:
            self.decisive.append(
                (
                    t["p"],
                    f"{text} (Fisher's exact p = {t['p']:.2g}"
                    + (f", Bonferroni over {t['pairs']} pairs)" if t["pairs"] > 1 else ")"),
                )
            )
        elif spread > 0 and min(lo[2], hi[2]) < t["needed"]:
            per_seed = max(1.0, min(lo[2], hi[2]) / max(1, seeds))
            self.untested.append(
                (
                    -spread,
                    f"{text}: untested, {min(lo[2], hi[2])} run(s) per value; Fisher's exact test "
                    f"needs at least {t['needed']} per value even for a clean split, i.e. about "
                    f"{math.ceil(t['needed'] / per_seed)} seeds",
                )
            )
        elif spread > 0:
            self.tested.append((-spread, f"{text} (Fisher's exact p = {t['p']:.2g}, not significant)"))


def _why_inconclusive(r: Run) -> str:
    """The reason of the run's inconclusive flag: `undertrained`, `never_learned`, or too short."""
    return next((f.get("reason") or "" for f in r.summary.get("flags") or [] if f.get("flag") == vd.INCONCLUSIVE), "")


def _not_counted_aside(runs: Sequence[Run], judged: Sequence[Run]) -> str:
    """`; 2 inconclusive (...) not counted; 1 crashed (failed) not counted`: the runs left out of
    the unstable share, by why; empty when every run counted."""
    crashed = sum(r.verdict == "failed" for r in runs)
    reasons = [_why_inconclusive(r) for r in judged if r.verdict in NOT_JUDGED]
    n_under, n_never = reasons.count("undertrained"), reasons.count("never_learned")
    n_inc = len(reasons) - n_under - n_never
    n_border = sum(
        r.verdict not in NOT_JUDGED
        and bool(vd.in_doubt(r.verdict, r.summary.get("borderline"), r.summary.get("flags")))
        for r in judged
    )
    others = len(runs) - len(judged) - crashed  # still running, interrupted, unreadable
    return "".join(
        f"; {n} {what} not counted"
        for n, what in (
            (n_inc, "inconclusive (too short to judge)"),
            (
                n_under,
                "inconclusive (undertrained: the output stayed collapsed to the end while the validation loss "
                "still fell, so a scream is not ruled out; train longer)",
            ),
            (n_never, "inconclusive (never learned: the output was collapsed from initialisation to the end)"),
            (n_border, "borderline (a value within detect.band of its threshold)"),
            (crashed, "crashed (failed)"),
            (others, "without a verdict"),
        )
        if n
    )


def _answer_sentence(
    facs: Sequence[str],
    judged: Sequence[Run],
    counted: Sequence[Run],
    seeds: int,
    aside: str,
    findings: _Findings,
) -> str:
    """The report's one-sentence answer: no verdict yet, all runs alike (`_unanimous`), the
    decisive factors, the factors still untested, or that no single factor separates the runs."""
    n_bad = sum(r.verdict in UNSTABLE for r in counted)
    if not judged:
        return f"No run has a verdict yet{aside}."
    if not counted:
        return f"No run could be judged{aside}."
    if n_bad == 0:
        return _unanimous(
            facs,
            counted,
            seeds,
            aside,
            "stable",
            "no factor changed the verdict at these settings (compare the validation losses below)",
        )
    if n_bad == len(counted):
        return _unanimous(facs, counted, seeds, aside, "unstable", "no value of any factor fixed it")
    if findings.decisive:
        decisive = sorted(findings.decisive, key=lambda t: t[0])
        return f"Decisive: {'; '.join(t for _, t in decisive)}{aside}."
    if findings.untested:
        untested = sorted(findings.untested, key=lambda t: t[0])
        return f"{n_bad}/{len(counted)} runs unstable{aside}; no factor is decisive yet: {'; '.join(t for _, t in untested)}."
    tested = findings.tested
    return f"{n_bad}/{len(counted)} runs unstable{aside}; no single factor separates them" + (
        f": {'; '.join(t for _, t in sorted(tested))}." if tested else "."
    )


def _unanimous(facs: Sequence[str], counted: Sequence[Run], seeds: int, aside: str, what: str, claim: str) -> str:
    """All counted runs agree (`what`: stable or unstable): with fewer runs per value than a test
    needs, the claim is untested; the sentence gives the Wilson interval of the share and the
    seeds it needs."""
    per_value = [
        sum(factor_value(r, k) == v for r in counted)
        for k in facs
        for v in {factor_value(r, k) for r in counted}
        if len({factor_value(r, k) for r in counted}) > 1
    ]
    where = "per value" if per_value else "of this configuration"
    m, needed = min(per_value or [len(counted)]), runs_needed()
    k_bad = m if what == "unstable" else 0
    lo, hi = share_interval(k_bad, m)
    n = len(counted)
    everyone = f"The one judged run is {what}" if n == 1 else f"All {n} judged runs are {what}"
    if m >= needed:
        return f"{everyone}{aside}: {claim}."
    per_seed = max(1.0, m / max(1, seeds))
    return (
        f"{everyone}{aside}: untested, {m} run(s) {where}: {k_bad}/{m} unstable is a 95% "
        f"interval of {lo:.0%}..{hi:.0%} (Wilson); at least {needed} runs per value, i.e. about "
        f"{math.ceil(needed / per_seed)} seeds (seed=0,1,...), before Fisher's exact test can say "
        f"whether a factor changes the verdict."
    )


def configurations(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """One row per configuration (the values of every factor but `seed`): its replicates (runs,
    seeds), unstable k/n with a 95% Wilson interval, runs not counted (inconclusive, borderline),
    the verdicts, and the median final validation loss and largest grad norm with their
    order-statistic intervals."""
    facs = design_factors(keys)
    judged = [r for r in runs if vd.is_judged(r.verdict)]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in judged:
        groups.setdefault(tuple(factor_value(r, k) for k in facs), []).append(r)
    rows = []
    for key in sorted(groups, key=lambda t: [_value_order(v) for v in t]):
        mine = groups[key]
        counted = [r for r in mine if _counted(r)]
        verdicts = sorted({r.verdict for r in mine})
        rows.append(
            {
                **dict(zip(facs, key)),
                "runs": len(mine),
                "verdicts": ", ".join(f"{sum(r.verdict == v for r in mine)} {v}" for v in verdicts),
                **_share_row(counted, len(mine) - len(counted)),
            }
        )
    return pd.DataFrame(rows)


def answer_display(table: pd.DataFrame) -> pd.DataFrame:
    """`answer`'s table as strings."""
    out = table.drop(columns=["unstable_share"]).astype(object)
    counted = [int(str(u).split("/")[1]) for u in table["unstable"]]  # "k/n": n runs counted
    for col in ("median final val loss", "median max grad norm"):
        # no run counted: nothing to take a median of ("-"), which a NaN would misread as NaN losses
        out[col] = [_ranked_text(v) if n else "-" for v, n in zip(table[col], counted)]
    out["not counted"] = [str(v) if v else "-" for v in table["not counted"]]
    return out
