"""`stab doctor RUN [--try]`: what went wrong in a finished run, where first, and what to try.

    stab doctor runs/run/20261129-111902_defaults
    stab doctor runs/sweep/norm=post,residual=0.1 --try --launcher joblib

Reads only the run folder (stab's own run, a sweep job, or a run the monitor API wrote). With
--try, the candidate fixes run as one sweep from the run's exact configuration and seed (each fix
alone, then the best two together; train.stop_early=true, so a fix that fails stops once that is
certain) into RUNS/NAME/, and the doctor prints which fixed it and at what final validation loss
(also in RUNS/NAME/doctor.md and doctor.json). Exit status: 0, 2 for bad input, 1 if a job crashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    RUN_FOLDER,
    check_folder,
    check_not_a_file,
    console,
    styled,
    user_errors,
    verdict_text,
)
from cli.config import UserError
from cli.doctor_try import exact_overrides, model_refusal, run_overrides, try_fixes
from cli.report import frame_table
from stability import doctor as dr
from stability.config import OWN_LOOP
from stability.record import verdicts as vd


def doctor(
    run: Annotated[Path, typer.Argument(help="A finished run folder (stab run, a sweep job, or the monitor API's).")],
    try_: Annotated[
        bool, typer.Option("--try", help="Train the candidate fixes as a sweep and say which fixed it.")
    ] = False,
    fixes: Annotated[
        int,
        typer.Option(
            "--fixes", help="With --try: how many of the ranked fixes to train alone (plus the best two together)."
        ),
    ] = 3,
    runs: Annotated[Path, typer.Option("--runs", help="With --try: folder that holds sweeps.")] = Path("runs"),
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="With --try: the sweep's folder under --runs; default doctor-<run folder>. Same name again = resume.",
        ),
    ] = None,
    launcher: Annotated[
        str, typer.Option("--launcher", help="With --try: basic | joblib | submitit_local | submitit_slurm | ray")
    ] = "basic",
    jobs: Annotated[
        int | None, typer.Option("--jobs", help="With --try: jobs at once for local parallel launchers.")
    ] = None,
) -> None:
    """Say what went wrong in a run and where first, rank the fixes; --try trains them."""
    with user_errors():
        check_folder(run, RUN_FOLDER)
        if try_:
            check_not_a_file(runs)  # before the diagnosis is printed, not after it
        try:
            rec = dr.read_run(run)
        except dr.DoctorError as e:
            raise UserError(str(e)) from None
        if fixes < 1:
            raise UserError(f"--fixes {fixes} is not allowed: expected an integer >= 1")
    base = run_overrides(rec)
    dx = dr.examine(rec, refuse=model_refusal(base) if base is not None else None)
    print_diagnosis(dx)
    if not try_:
        return
    with user_errors():
        if ((rec.config or {}).get("model") or {}).get("_target_") == OWN_LOOP:
            raise UserError(
                f"{run} was recorded from your own loop (Monitor, Lightning or Trainer callback, no factory): "
                "--try trains fixes only for a model stab can build (a stab run, sweep job or model=custom "
                "factory); apply a fix in your loop and train it there"
            )
        if not vd.is_unstable(dx.verdict):
            raise UserError(
                f"{run} ended {dx.verdict or 'without a verdict'}: --try needs an unstable run "
                f"(verdict {', '.join(vd.UNSTABLE)})"
            )
        if not dx.fixes:
            raise UserError(f"no rule proposes a fix for {run}: nothing to try")
        base = base if base is not None else exact_overrides(rec)  # says why it cannot compose
    try_fixes(dx, base, fixes, runs, name or f"doctor-{rec.path.name}"[:120], launcher, jobs)


def no_verdict(rec: dr.RunRecord) -> str:
    """Why a run has no verdict (no summary.json): its state, how far it got, what is read instead."""
    from stability.rundirs import writer_gone
    from stability.sweeps import read_status

    status = read_status(rec.path) if (rec.path / "status.json").exists() else {}
    state = (
        status.get("state")
        if status.get("state") not in (None, "corrupt")
        else "of unknown state (no readable status.json)"
    )
    if state == "running" and writer_gone(rec.path, status):
        state, status = "interrupted", {"error": f"its writer, pid {status.get('pid')}, is gone"}
    total = (rec.config.get("train") or {}).get("epochs") if isinstance(rec.config.get("train"), dict) else None
    why = f" ({status['error']})" if state in ("interrupted", "failed") and status.get("error") else ""
    return (
        f"the run is {state}{why} after {len(rec.epochs)} of {total or '?'} epoch(s) and {len(rec.steps)} step(s), "
        f"and has no summary.json; the findings below come from the steps it recorded"
    )


def print_diagnosis(dx: dr.Diagnosis) -> None:
    """Print `stab doctor`'s diagnosis of one run: the verdict, the findings, the ranked fixes."""
    rec = dx.record
    console.print(styled(("stab doctor", "bold"), f" {rec.path}"), highlight=False)
    if dx.verdict:
        console.print(
            styled("verdict: ", verdict_text(dx.verdict), f"  {rec.summary.get('evidence', '')}"), highlight=False
        )
    else:
        console.print(f"verdict: none: {no_verdict(rec)}", highlight=False)
    first = dx.first
    if first is not None:
        console.print(styled(("what went wrong first: ", "bold"), first.evidence), highlight=False)
    _print_findings(dx)
    if not dx.fixes:
        why = (
            "the failure was injected"
            if any(f.kind == "injected_fault" for f in dx.findings)
            else "the data is non-finite: clean or filter it"
            if any(f.kind == "data_nonfinite" for f in dx.findings)
            else "the model cannot take any fix the rules propose"
            if dx.refused
            else "no rule matches these records"
        )
        if dx.verdict == vd.INCONCLUSIVE:
            why += "; the run is inconclusive: stab cannot tell yet whether it fails (train longer to judge it)"
        console.print(f"no candidate fix: {why}", highlight=False)
    else:
        _print_fixes(dx)
    print_refused(dx)


def _print_findings(dx: dr.Diagnosis) -> None:
    """The findings table, by where each started (step, epoch or the whole run); the verdict's own
    `unstable` finding is left out."""
    import pandas as pd  # here, not at import: `stab --help` loads no pandas

    rows: list[dict[str, Any]] = [
        {
            "where": f"step {f.step}" if f.step is not None else f"epoch {f.epoch}" if f.epoch is not None else "run",
            "finding": f.kind,
            "evidence": f.evidence,
        }
        for f in dx.findings
        if f.kind != "unstable"
    ]
    if rows:
        console.print(frame_table(pd.DataFrame(rows), title="findings (by where they started)"))


def _print_fixes(dx: dr.Diagnosis) -> None:
    """The ranked fixes with why, the finding each answers and its source; the title says whether
    they fix a failure or only answer the warnings of an inconclusive or stable run."""
    import pandas as pd

    rows = [
        {
            "rank": i + 1,
            "fix": x.label,
            "why": x.rule.why,
            "evidence": x.finding.kind + (f" (step {x.finding.step})" if x.finding.step is not None else ""),
            "source": x.rule.source,
        }
        for i, x in enumerate(dx.fixes)
    ]
    title = (
        "candidate fixes, best first"
        if vd.is_unstable(dx.verdict)
        else "the run is inconclusive: stab cannot tell yet whether it fails (train longer to judge it); these "
        "answer its warnings"
        if dx.verdict == vd.INCONCLUSIVE
        else f"the run is {dx.verdict}: nothing to fix; these answer its warnings"
    )
    console.print(frame_table(pd.DataFrame(rows), title=title))


def print_refused(dx: dr.Diagnosis) -> None:
    """One line per fix a rule proposed that the run's model cannot take, with `stab run`'s reason."""
    for x, why in dx.refused:
        console.print(f"not proposed, the model cannot take it: {x.label} ({why})", highlight=False)
