"""`stab doctor RUN --try`: the run's exact configuration as overrides, each candidate fix as a
sweep job from it (from the run's snapshot before its first departure where the fix keeps the
model), the sweep, and the comparison (doctor.json, doctor.md, the printed table).

    stab doctor runs/sweep/norm=post,residual=0.1 --try --launcher joblib
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.common import (
    console,
    fmt,
    styled,
    user_errors,
    verdict_text,
    write_errors,
)
from cli.config import UserError, compose_run, hydra_quote, paths_as_data
from cli.report import frame_table
from stability import doctor as dr
from stability.config import OPERATIONAL_KEYS, SHORT_NAMES, ConfigError, RunConfig, flatten
from stability.record.folder import RunFolder
from stability.storage import atomic_write_text, write_json

EARLY = {"train.stop_early": "true"}


def _value(v: Any) -> str:
    """A config value as a Hydra override value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def exact_overrides(rec: dr.RunRecord) -> list[str]:
    """Overrides that compose the run's exact configuration (same run identity as its
    config.yaml): the ones it was run with, plus `key=value` for every key conf/ now resolves
    differently. UserError where the folder's config is not one stab can train."""
    try:
        want = RunConfig.from_dict(rec.config)
    except (ConfigError, TypeError) as e:
        raise UserError(
            f"{rec.path}/config.yaml is not a configuration stab can train again ({e}); "
            "--try needs a stab run or sweep job"
        ) from None
    base = [o for o in (rec.overrides or []) if not o.lstrip("+~").startswith("hydra")]
    have = compose_run(base)
    if have.identity() == want.identity():
        return base
    ops = tuple(OPERATIONAL_KEYS)
    w, h = flatten(want.to_dict()), flatten(have.to_dict())
    extra = [
        f"{k}={_value(v)}"
        for k, v in w.items()
        if h.get(k) != v and not any(k == o or k.startswith(o + ".") for o in ops)
    ]
    full = merge(base, dict(o.split("=", 1) for o in extra))
    if compose_run(full).identity() != want.identity():
        raise UserError(f"cannot compose {rec.path}'s exact configuration from conf/ (tried: {' '.join(extra)})")
    return full


def run_overrides(rec: dr.RunRecord) -> list[str] | None:
    """`exact_overrides` of the run, or None where its configuration cannot be composed (a monitor
    or Lightning run, or conf/ changed): its fixes are then advice that nothing checks."""
    try:
        return exact_overrides(rec)
    except UserError:
        return None


def model_refusal(base: list[str]) -> Callable[[dict[str, str]], str | None]:
    """`refuse(fix)` for `dr.examine`: the one line `stab run` refuses the run's exact overrides
    (`base`) with the fix with (a short name the chosen model does not read, as `compose_run`
    checks it; a value out of range), or None where the fix composes."""

    def refuse(fix: dict[str, str]) -> str | None:
        try:
            compose_run(merge(base, fix))
        except UserError as e:
            return str(e)
        return None

    return refuse


def merge(base: list[str], extra: dict[str, str]) -> list[str]:
    """`base` overrides with `extra` keys set (a key already in base takes the new value). A short
    name in `extra` whose path `base` sets (`warmup=12` for a run given `train.warmup=10`) sets
    that path: the run reads the path's value, so the short name would be unread and refused. Not
    `residual`, whose path is the cascade's list per stage."""
    out = {o.split("=", 1)[0].lstrip("+"): o for o in base}
    for k, v in extra.items():
        path = SHORT_NAMES[k].path if k in SHORT_NAMES and k != "residual" else None
        key = path if path in out else k
        out[key] = f"{key}={v}"
    return list(out.values())


# Fixes that leave the model's weights the same shape and meaning: they can continue from a snapshot.
REWINDABLE = ("train.", "clip", "warmup", "z_loss", "model.z_loss", "on_spike", "update_clip")


def rewindable(fix: dict[str, str]) -> bool:
    """Whether every override of `fix` changes training only (not the architecture)."""
    return all(any(k == r or k.startswith(r) for r in REWINDABLE) for k in fix)


def rewind_snapshot(dx: dr.Diagnosis) -> Path | None:
    """The run's snapshot taken last before its first departure (`Diagnosis.first`), or None."""
    from stability import snapshots

    first = dx.first
    if first is None or first.step is None:
        return None
    snap = snapshots.before(dx.record.path, first.step)
    return snap.resolve() if snap else None


def fix_overrides(base: list[str], fix: dict[str, str], snap: Path | None) -> list[str]:
    """The overrides of one fix's job: the run's own (`base`, path keys quoted as data) with the
    fix and the early stop; a fix that keeps the model trains from `snap`, whose path is data for
    Hydra (a sweep job's folder has commas, a --runs folder may hold `'` or `${`)."""
    rewind = {"train.rewind_from": hydra_quote(str(snap))} if snap and rewindable(fix) else {}
    return merge(paths_as_data(base), {**fix, **EARLY, **rewind})


def try_fixes(
    dx: dr.Diagnosis, base: list[str], n: int, runs: Path, name: str, launcher: str, jobs: int | None
) -> None:
    """`stab doctor --try`: train the `n` best-ranked fixes of `dx` from the run's overrides `base`
    (from its snapshot before the first departure, where one was kept) as the sweep RUNS/NAME;
    write doctor.json and doctor.md there and print the comparison. Exit 1 if a fix crashed."""
    from cli.sweepview import report_crashes, run_jobs
    from stability.sweep_engine import Sweep

    snap = rewind_snapshot(dx)
    tries, combos = _trainable_fixes(dx, base, n, snap)
    console.print(
        styled(("stab doctor --try", "bold"), f" {len(combos)} fixes from {' '.join(base) or '(defaults)'}"),
        highlight=False,
    )
    if snap:
        console.print(
            f"fixes that keep the model train from the snapshot before the first departure: {snap}", highlight=False
        )
    else:
        console.print(
            "the run kept no snapshot before its first departure (train.snapshot_every=0): "
            "every fix trains from step 0",
            highlight=False,
        )
    done = run_jobs(Sweep(runs, name, launcher, combos, jobs, base))
    report_crashes(done)
    rows = []
    for fix, r in zip(tries, done.records):
        s = RunFolder(done.sweep_dir / r["folder"]).summary()
        rows.append(
            {
                "fix": " ".join(f"{k}={v}" for k, v in fix.items()),
                "verdict": s.get("verdict", "?"),
                "final_val_loss": float(s.get("final_val_loss", math.nan)),
                "wall_s": s.get("wall_s"),
                "stopped_early": bool(s.get("stopped_early")),
                "folder": r["folder"],
            }
        )
    res = dr.outcome(dx, base, rows)
    with write_errors():
        write_json(done.sweep_dir / "doctor.json", res)
        atomic_write_text(done.sweep_dir / "doctor.md", dr.try_markdown(res))
    _print_tries(res)
    console.print(f"written: {done.sweep_dir / 'doctor.md'}", highlight=False)


def _trainable_fixes(
    dx: dr.Diagnosis, base: list[str], n: int, snap: Path | None
) -> tuple[list[dict[str, str]], list[list[str]]]:
    """The `n` best candidate fixes (`dr.candidates`) that compose with the run's model, and each
    one's job overrides (`fix_overrides`); a fix that does not compose is skipped with a line.
    UserError when none does."""
    tries, combos = [], []
    for fix in dr.candidates(dx, n):
        combo = fix_overrides(base, fix, snap)
        try:
            compose_run(combo)  # a fix the run's model cannot take is skipped before any training
        except UserError as e:
            console.print(f"skipped {' '.join(f'{k}={v}' for k, v in fix.items())}: {e}", highlight=False)
            continue
        tries.append(fix)
        combos.append(combo)
    if not combos:
        with user_errors():
            raise UserError(f"none of the fixes for {dx.record.path} can be trained with its model: nothing to try")
    return tries, combos


def _print_tries(res: dict[str, Any]) -> None:
    """The fixes tried (`dr.outcome`): verdict, final validation loss and its gap to the best fix,
    then the one-sentence answer."""
    import pandas as pd

    table = [
        {
            "fix": r["fix"],
            "verdict": r["verdict"],
            "final val loss": fmt(r["final_val_loss"]),
            "vs best fix": f"+{fmt(r['vs_best'])}" if r["vs_best"] is not None else "-",
            "folder": r["folder"],
        }
        for r in res["tries"]
    ]
    console.print(
        frame_table(
            pd.DataFrame(table),
            markup={"verdict": verdict_text},
            title=f"fixes tried from the run's exact config (failed run: val loss {fmt(res['failed_val_loss'])})",
        )
    )
    console.print(res["sentence"], style="bold", markup=False, highlight=False)
