"""The report's tables as data frames: the overview, runs.csv, the factor summary and the answer,
the learning-rate sensitivity, and one run's tables for `stab show`. NaN and inf stay NaN and
inf; display frames hold strings.

    over = overview(runs, keys)          # the printed table
    table, sentence = answer(runs, keys) # unstable share per factor value, and the decisive factor
"""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from stability.formatting import format_number, nan_place
from stability.lr_sensitivity import initial_loss, lr_sensitivity, varies_lr
from stability.record import format as runformat
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
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
    """For each factor and value: runs, share per verdict, median of the last finite grad norm."""
    rows = []
    others = sorted({r.verdict for r in runs} - set(vd.ORDER))
    for k in keys:
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


# --- one run (`stab show`) ---------------------------------------------------------------------


def is_run_folder(path: Path) -> bool:
    """A folder holding any of `format.RUN_MARKERS` (`RunFolder.is_run`)."""
    return RunFolder(path).is_run()


def grad_epoch_frame(run: Run) -> pd.DataFrame:
    """The grad table's wide view: group x epoch means, plus `max`, the largest step norm over all
    epochs (NaN if any epoch's max is NaN: a group that went NaN is not hidden by its earlier maxima)."""
    return runformat.wide_view(run.grad_table)


def epoch_frame(run: Run) -> pd.DataFrame:
    """Per epoch: steps, non-finite steps (not stepped), loss (over the finite steps), validation
    loss, grad norm mean/max, clip rate, collapsed (the scream check)."""
    cols = {
        "epoch": "epoch",
        "steps": "steps",
        "nonfinite": "non-finite",
        "loss": "loss",
        "val_loss": "val loss",
        "grad_norm_mean": "grad mean",
        "grad_norm_max": "grad max",
        "clip_rate": "clipped",
        "collapsed": "collapsed",
    }
    return pd.DataFrame(
        [{name: e.get(key) for key, name in cols.items()} for e in run.epochs],
        columns=list(cols.values()),
        dtype=object,
    )


def stage_frame(run: Run) -> pd.DataFrame:
    """Per epoch and stage: output RMS, the ratio the RMS match needed, the scale applied after
    clamping, and the share of steps where the clamp bound was hit."""
    rows = []
    for e in run.epochs:
        rms, ratio, scale, clamp = (
            e.get(k) or [] for k in ("stage_rms", "stage_ratio", "stage_scale", "stage_clamp_rate")
        )
        for i in range(max(len(rms), len(ratio), len(scale))):

            def at(xs: list[Any], i: int = i) -> Any:
                return xs[i] if i < len(xs) else None

            rows.append(
                {
                    "epoch": e.get("epoch"),
                    "stage": i,
                    "rms": at(rms),
                    "needed ratio": at(ratio),
                    "scale": at(scale),
                    "clamped": at(clamp),
                }
            )
    return pd.DataFrame(rows, columns=["epoch", "stage", "rms", "needed ratio", "scale", "clamped"], dtype=object)


def event_text(ev: Mapping[str, Any], run_dir: Path | None = None) -> str:
    """The details of one events.jsonl record, in words; a first_nan whose batch and state were
    saved names the command that replays it (`stab replay RUN_DIR`, quoted for a POSIX shell)."""
    kind = ev.get("event")
    f = format_number
    if kind == "first_nan":
        return (
            f"non-finite {ev.get('kind', '?')} first {nan_place(ev)}; "
            f"loss {f(ev.get('loss'))}, grad norm {f(ev.get('grad_norm'))}"
            + (
                f"; batch and state saved in {ev['forensics']}: "
                + (shlex.join(["stab", "replay", str(run_dir)]) if run_dir is not None else "stab replay RUN_DIR")
                if ev.get("forensics")
                else ""
            )
        )
    if kind == "init_eval":
        base = f", no-learning baseline {f(ev.get('baseline_loss'))}" if ev.get("baseline") else ""
        return f"validation loss at initialisation {f(ev.get('val_loss'))}{base}"
    if kind in ("grad_spike", "loss_spike"):
        return f"{'grad norm' if kind == 'grad_spike' else 'loss'} {f(ev.get('value', ev.get('grad_norm')))}"
    if kind == "clamp_saturation":
        return f"stage {ev.get('stage')}: needed ratio {f(ev.get('ratio'))}, clamped to {f(ev.get('scale'))}"
    if kind == "scream":
        s, t = ev.get("scores") or {}, ev.get("target_scores") or {}
        return "output collapsed: " + ", ".join(f"{k} {f(v)} (target {f(t.get(k))})" for k, v in s.items())
    skip = {"event", "epoch", "batch", "step"}
    return ", ".join(f"{k} {f(v)}" for k, v in ev.items() if k not in skip)


def events_frame(run: Run) -> pd.DataFrame:
    """One row per event of `run`, in the order they happened (init_eval first; at a tie, first_nan, scream, spikes, clamp saturation), with its details in words."""
    order = {"first_nan": 0, "scream": 1, "grad_spike": 2, "clamp_saturation": 3}

    def when(e: Mapping[str, Any]) -> tuple[int, int, int]:  # a scream has an epoch, no step: it ends the epoch
        if e.get("event") == "init_eval":  # before the first step
            return (-1, -1, 0)
        epoch, step = e.get("epoch"), e.get("step")
        return (
            epoch if isinstance(epoch, int) else 1 << 62,
            step if isinstance(step, int) else 1 << 62,
            order.get(str(e.get("event")), 9),
        )

    evs = sorted(run.events, key=when)
    return pd.DataFrame(
        [
            {
                "event": e.get("event"),
                "epoch": e.get("epoch"),
                "batch": e.get("batch"),
                "step": e.get("step"),
                "details": event_text(e, run.path),
            }
            for e in evs
        ],
        columns=["event", "epoch", "batch", "step", "details"],
        dtype=object,
    )
