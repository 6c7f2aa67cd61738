"""`stab margin [OPTIONS] [OVERRIDES...]`: the largest stable learning rate of each configuration.

    stab margin norm=pre,post residual=0.1,0.3                 # the default preset's 2x2 grid
    stab margin --launcher joblib --jobs 2 norm=pre,post margin.tolerance=1.25
    stab margin preset=smoke norm=pre,post margin.lo=1e-2 margin.hi=1
    stab margin preset=smoke norm=pre,post seed=0,1,2     # each probe: 3 seeds, unstable if any seed is

Each probe is a normal sweep job (train.stop_early=true: it stops once it is certain to end
unstable) in RUNS/NAME/<overrides>/, so the same command again resumes, every launcher works and
`stab report RUNS/NAME` reads the probes. One round of the search (every configuration's next
probe) is launched as one sweep. The result is printed and written to RUNS/NAME/margin.md and
margin.json. Exit status as `stab sweep`'s: 0 unless a probe crashed, 2 for bad input.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import launch
from cli.common import check_writable, console, fmt, seconds, styled, user_errors, write_errors
from cli.config import UserError, compose_run, shell_command
from cli.report import frame_table
from stability.record import verdicts as vd
from stability.record.folder import RunFolder
from stability.storage import atomic_write_text, write_json

if TYPE_CHECKING:
    from stability import margin as mg
    from stability.config import MarginConfig

EARLY = "train.stop_early=true"


def margin(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Hydra overrides; comma lists are the configurations compared, e.g. norm=pre,post residual=0.1,0.3"
        ),
    ] = None,
    runs: Annotated[Path, typer.Option("--runs", help="Folder that holds sweeps.")] = Path("runs"),
    name: Annotated[
        str, typer.Option("--name", help="The margin search's folder under --runs. Same name again = resume.")
    ] = "margin",
    launcher: Annotated[
        str, typer.Option("--launcher", help="basic | joblib | submitit_local | submitit_slurm | ray")
    ] = "basic",
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", help="Probes at once for local parallel launchers; default: 2 for those, 1 for basic."),
    ] = None,
) -> None:
    """Find each configuration's largest stable learning rate (bracketing, then bisection on a log scale)."""
    from stability import margin as mg  # pandas: loaded once the command runs, not by `stab --help`

    overrides = list(overrides or [])
    with user_errors():
        plan = _plan(overrides, runs, name, launcher, jobs)
    settings = plan.settings
    sweep_dir = (runs / name).resolve()
    K = mg.grid_size(settings.lo, settings.hi, settings.tolerance)
    console.print(
        styled(
            ("stab margin", "bold"),
            f" {len(plan.combos)} configuration(s), lr {settings.lo:g}..{settings.hi:g} "
            f"in {K} steps of x{(settings.hi / settings.lo) ** (1 / K):.3g}; at most "
            f"{min(mg.promised_probes(settings.lo, settings.hi, settings.tolerance), settings.steps)} probes each when the "
            f"boundary is inside -> {sweep_dir}",
        ),
        highlight=False,
    )
    prober = _Prober(plan, runs, name, launcher, jobs, overrides, sweep_dir)
    t0 = time.time()
    margins = mg.find_margins(plan.labels, prober.probe, settings.lo, settings.hi, settings.tolerance, settings.steps)
    res = mg.result(margins, settings.lo, settings.hi, settings.tolerance, time.time() - t0, prober.concurrency)
    with write_errors():
        write_json(sweep_dir / "margin.json", res)
        atomic_write_text(sweep_dir / "margin.md", mg.markdown(res))
    print_result(res)
    console.print(
        f"written: {sweep_dir / 'margin.md'}, {sweep_dir / 'margin.json'} ({shell_command('stab', 'report', sweep_dir)} for every probe)",
        highlight=False,
    )


@dataclass
class _Plan:
    """A margin search, checked: the configurations compared and their labels, the seeds each
    probe trains, the margin.* settings and the Hydra arguments passed to every sweep."""

    hydra_args: list[str]  # hydra.* overrides, for the launcher
    seeds: list[str | None]  # seed=0,1,2 split into one probe run each; [None]: the config's own seed
    combos: list[list[str]]  # every configuration's overrides (comma lists expanded)
    probe_combos: list[list[str]]  # the same without margin.* keys: what a probe trains
    labels: list[str]  # each configuration named by what differs (`config_labels`)
    settings: MarginConfig  # margin.* of the first configuration (lo, hi, tolerance, steps)


def _plan(overrides: list[str], runs: Path, name: str, launcher: str, jobs: int | None) -> _Plan:
    """Check every argument before any probe runs (one-line UserError naming a bad one): the name,
    launcher and --jobs; no train.lr or train.stop_early (the search sets them); every
    configuration composes at margin.lo; --runs is writable."""
    hydra_args = [o for o in overrides if o.startswith(("hydra.", "hydra/", "+hydra."))]
    task_args = [o for o in overrides if o not in hydra_args]
    if "/" in name or not name.strip() or name.strip(".") == "":
        raise UserError(f"--name {name!r} is not allowed: expected a plain folder name")
    launch.check_launcher(launcher)
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs} is not allowed: expected an integer >= 1")
    keys = {o.split("=", 1)[0].lstrip("+~") for o in task_args}
    for bad in ("train.lr", "train.stop_early"):
        if bad in keys:
            raise UserError(
                f"{bad} is not allowed here: stab margin sets it for each probe "
                "(choose the learning rates searched with margin.lo, margin.hi, margin.tolerance)"
            )
    seed_args = [o for o in task_args if o.split("=", 1)[0].lstrip("+~") == "seed"]
    task_args = [o for o in task_args if o not in seed_args]
    seeds: list[str | None] = [x.strip() for o in seed_args for x in o.split("=", 1)[1].split(",")] or [None]
    combos = launch.expand(task_args)
    settings = compose_run(combos[0]).margin  # margin.* values, checked (one line naming a bad one)
    probe_combos = [[o for o in c if not o.lstrip("+~").startswith("margin.")] for c in combos]
    labels = config_labels(probe_combos)
    for c in probe_combos:  # every configuration is valid before any probe runs
        compose_run(c + [f"train.lr={settings.lo:g}", EARLY])
    check_writable(runs)  # before the plan is printed
    return _Plan(hydra_args, seeds, combos, probe_combos, labels, settings)


class _Prober:
    """`probe(batch)` for `margin.find_margins`: one round of the search, each (configuration,
    learning rate) of `batch` trained for every seed, as one sweep; exit 1 if a probe crashed.
    `concurrency` is the most jobs a round ran at once."""

    def __init__(
        self,
        plan: _Plan,
        runs: Path,
        name: str,
        launcher: str,
        jobs: int | None,
        overrides: list[str],
        sweep_dir: Path,
    ) -> None:
        self.plan, self.runs, self.name, self.launcher, self.jobs = plan, runs, name, launcher, jobs
        self.overrides, self.sweep_dir = overrides, sweep_dir
        self.by_label = dict(zip(plan.labels, plan.probe_combos))
        self.concurrency = 1

    def probe(self, batch: list[tuple[str, float]]) -> list[mg.Probe]:
        """One probe per (configuration label, learning rate): each seed's verdict at that lr
        (`read_probe`), pooled by `margin.replicate` when seeds were given."""
        from cli.sweepview import report_crashes, run_jobs
        from stability import margin as mg
        from stability.sweep_engine import Sweep

        seeds = self.plan.seeds
        jobs_ = [
            self.by_label[c] + ([f"seed={x}"] if x is not None else []) + [f"train.lr={lr:g}", EARLY]
            for c, lr in batch
            for x in seeds
        ]
        done = run_jobs(
            Sweep(self.runs, self.name, self.launcher, jobs_, self.jobs, self.overrides), self.plan.hydra_args
        )
        report_crashes(done)  # a probe that crashed says nothing about stability: stop here (exit 1)
        self.concurrency = max(self.concurrency, int(_concurrency_of(done)))
        out = []
        for i, (_, lr) in enumerate(batch):  # each seed's run of this (configuration, lr): one probe
            recs = done.records[i * len(seeds) : (i + 1) * len(seeds)]
            replicates = [read_probe(self.sweep_dir / rec["folder"], lr) for rec in recs]
            out.append(replicates[0] if seeds == [None] else mg.replicate(lr, replicates))
        return out


def _concurrency_of(done: Any) -> int:
    try:
        return int(RunFolder(done.sweep_dir / done.records[0]["folder"]).status().concurrency or 1)
    except (IndexError, KeyError, TypeError, ValueError):
        return 1


def config_labels(combos: list[list[str]]) -> list[str]:
    """Each configuration named by the overrides that differ between them ("norm=pre residual=0.1");
    one configuration: all its overrides, or "defaults"."""
    if len(combos) == 1:
        return [" ".join(combos[0]) or "defaults"]
    common = set.intersection(*(set(c) for c in combos))
    return [" ".join(o for o in c if o not in common) for c in combos]


def read_probe(run_dir: Path, lr: float) -> mg.Probe:
    """A finished probe's verdict and losses from its run folder (summary.json, metrics.jsonl)."""
    from stability import margin as mg
    from stability.lr_sensitivity import initial_loss

    s = RunFolder(run_dir).summary()
    verdict = s.get("verdict") or "?"
    return mg.Probe(
        lr=lr,
        stable=not vd.is_unstable(verdict),
        verdict=verdict,
        folder=run_dir.name,
        final_val_loss=float(s.get("final_val_loss", math.nan)),
        initial_loss=initial_loss(run_dir),
        wall_s=float(s.get("wall_s", math.nan)),
        stopped_early=bool(s.get("stopped_early")),
        borderline=[str(b.get("what", "?")) for b in vd.in_doubt(verdict, s.get("borderline"), s.get("flags"))]
        + [str(w["warning"]) for w in s.get("warnings") or [] if w.get("warning") in ("undertrained", "never_learned")],
    )


def print_result(res: dict[str, Any]) -> None:
    """Print the margin table (each configuration's largest stable learning rate) and its sentence."""
    import pandas as pd

    from stability import margin as mg

    rows = [
        {
            "configuration": c["config"],
            "margin (largest stable lr)": c["text"],
            "smallest unstable lr": fmt(c["unstable_lr"]) if c["unstable_lr"] else "-",
            "status": c["status"],
            "x least stable": fmt(c["ratio"]) if c["ratio"] else "-",
            "grid share above": f"{c['grid_share_unstable']:.0%}",
            "LR sensitivity floor": fmt(c["lr_sensitivity_floor"]),
            "LR sensitivity (probes)": fmt(c["lr_sensitivity"]),
            "probes (lr verdict)": "; ".join(mg.probe_text(p) for p in c["probes"]),
        }
        for c in res["configs"]
    ]
    console.print(
        frame_table(
            pd.DataFrame(rows),
            title=f"stability margin: lr {res['lo']:g}..{res['hi']:g}, grid x{res['grid_ratio']:.3g}",
        )
    )
    if res["sentence"]:
        console.print(res["sentence"], style="bold", markup=False, highlight=False)
    for line in res.get("non_monotone", []) + res.get("borderline", []):
        console.print(f"  {line}", style="yellow", markup=False, highlight=False)
    for line in res["by_factor"]:
        console.print(f"  {line}", markup=False, highlight=False)
    cost = res["cost"]
    console.print(
        f"cost: {cost['probes']} probe runs in {cost['rounds']} rounds ({cost['stopped_early']} stopped early), "
        f"{seconds(cost['wall_s'])} wall; an exhaustive grid of the same resolution: {cost['exhaustive_runs']} "
        f"runs, about {seconds(cost['exhaustive_train_s_estimate'])} of training at the median full run "
        f"({fmt(cost['median_full_run_s'])} s)",
        markup=False,
        highlight=False,
    )
