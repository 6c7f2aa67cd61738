"""Make the README's measured figures and example outputs, and check that none has gone stale.

    python scripts/readme_figures.py --check                  # fast, no training: fails on a stale block
    python scripts/readme_figures.py --make charlm_lr_grid    # re-run its commands, rewrite its block
    python scripts/readme_figures.py --mark-stale             # stale blocks become `not-remade`, visibly
    python scripts/readme_figures.py --list

A block of README.md is written only by this script, between two markers:

    <!-- figure charlm_lr_grid: made inputs=0123abcd4567 -->
    ...the generated text...
    <!-- /figure charlm_lr_grid -->

`inputs` is a hash of the figure's commands (`FIGURES` below) and of the code files that produce
its numbers (`code`: the detectors, the model, its presets, ...): a Python file by its syntax tree
with docstrings, comments and function annotations left out, a YAML file by its values
(`code_text`), so that documenting, typing or reformatting the code does not stale a figure while
any change of what it does does; any other file by its bytes. `--check`
recomputes it without re-running anything and fails on a `made` block whose hash differs: the
code that produced the figure has changed since, so the figure may no longer be what the
command prints. Re-make it (`--make NAME`), or, where that is too expensive for the machine at
hand, `--mark-stale`: the block's status becomes `not-remade` and it opens with a visible note
saying so, so that a stale figure is never stated as fact. A block marked `not-remade` passes the
check only with that note. The README names the machine and its load next to each made figure.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = re.compile(
    r"<!-- figure (?P<name>[\w.-]+): (?P<status>made|not-remade) inputs=(?P<hash>[0-9a-f]{12}) -->\n"
    r"(?P<body>.*?)<!-- /figure (?P=name) -->",
    re.S,
)
STALE_NOTE = "> **Not re-made** with the code as it is now"


@dataclass(frozen=True)
class Figure:
    """One README block: the `stab` commands that make it (each a list of CLI arguments, RUNS in
    them replaced by a fresh folder), the code files (glob patterns, relative to the repository)
    whose text its numbers depend on, and `render(runs_folder, seconds per command) -> text`."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    code: tuple[str, ...]
    render: Callable[[Path, list[float]], str] = field(compare=False)


def code_text(path: Path) -> bytes:
    """What of a code file a figure depends on: a Python file's syntax tree (`ast.dump`) with
    every docstring and every function's type annotations removed (comments and formatting never
    reach the tree), so that documenting, typing or reformatting it leaves it unchanged and any
    change of behaviour does not; a YAML file as its parsed values (comments and layout left out);
    any other file (or one that does not parse) as its bytes. Annotations of module and class
    attributes stay: they are evaluated (dataclass fields)."""
    data = path.read_bytes()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:  # its values, not its comments or layout
            return json.dumps(yaml.safe_load(data), sort_keys=True, default=str).encode()
        except yaml.YAMLError:
            return data
    if path.suffix != ".py":
        return data
    try:
        tree = ast.parse(data)
    except SyntaxError:
        return data
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            for a in [
                *node.args.posonlyargs,
                *node.args.args,
                *node.args.kwonlyargs,
                node.args.vararg,
                node.args.kwarg,
            ]:
                if a is not None:
                    a.annotation = None
            node.body = [_unannotated(s) for s in node.body]
    return ast.dump(tree, include_attributes=False).encode()


def _unannotated(stmt: ast.stmt) -> ast.stmt:
    """A function body's `x: T = v` as `x = v` (a local annotation is never evaluated), `x: T`
    alone as `pass`; any other statement as it is (nested bodies are walked on their own)."""
    if not isinstance(stmt, ast.AnnAssign):
        return stmt
    if stmt.value is None:
        return ast.Pass()
    return ast.Assign(targets=[stmt.target], value=stmt.value, lineno=0)


def inputs_hash(fig: Figure, root: Path = ROOT) -> str:
    """12 hex digits of sha256 over the figure's commands and its code files' names and
    `code_text` (a Python file's syntax tree without docstrings or annotations, a YAML file's values)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(c) for c in fig.commands]).encode())
    for pattern in fig.code:
        for path in sorted(glob.glob(str(root / pattern), recursive=True)):
            h.update(os.path.relpath(path, root).encode())
            h.update(code_text(Path(path)))
    return h.hexdigest()[:12]


# --- rendering --------------------------------------------------------------------------------


def _summaries(folder: Path) -> list[dict]:
    out = []
    for s in sorted(folder.glob("*/summary.json")):
        summary = json.loads(s.read_text())
        overrides = (
            json.loads((s.parent / "overrides.json").read_text()) if (s.parent / "overrides.json").exists() else []
        )
        overrides = overrides.get("overrides", []) if isinstance(overrides, dict) else overrides
        out.append({"overrides": dict(o.split("=", 1) for o in overrides if "=" in o), **summary})
    return out


def _num(v: object) -> str:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


GRID_LRS = (0.001, 0.01, 0.1, 1.0, 10.0)  # margin.lo=1e-3, margin.hi=10, margin.tolerance=10: these points


def _lr_of(run: dict) -> float:
    return float(run["overrides"]["train.lr"])


def _cell(rs: list[dict], star: str) -> str:
    """One grid cell over its seeds: the verdicts (`2 diverged, 1 scream`), the median last
    validation loss / validation loss at initialisation, the borderline and early-stopped counts."""
    import statistics

    verdicts = [r["verdict"] for r in rs]
    counts = ", ".join(f"{verdicts.count(v)} {v}" if len(rs) > 1 else v for v in dict.fromkeys(verdicts))
    notes = [
        f"{n} {what}" if len(rs) > 1 else what
        for what, n in (
            ("borderline", sum(bool(r.get("borderline")) for r in rs)),
            ("stopped early", sum(bool(r.get("stopped_early")) for r in rs)),
        )
        if n
    ]

    def med(key: str) -> str:
        vals = [float(r[key]) if r.get(key) is not None else math.nan for r in rs]
        # a loss that went NaN or inf ranks worst, as in the report's medians
        return _num(statistics.median([v if math.isfinite(v) else math.inf for v in vals])) if vals else "-"

    return f"{counts}{star}{' (' + ', '.join(notes) + ')' if notes else ''}, val {med('final_val_loss')} / {med('val_loss_init')}"


def lr_grid_table(folder: Path, column: str = "norm") -> str:
    """A learning-rate x `column` table: per cell the verdicts over its seeds with the median last
    validation loss over the median validation loss at initialisation, the borderline flags, runs
    stopped early, and the cells whose runs were also `stab margin`'s probes (marked *)."""
    runs = _summaries(folder)
    margin = json.loads((folder / "margin.json").read_text()) if (folder / "margin.json").exists() else {}
    probed = {(c["config"], p["lr"]) for c in margin.get("configs", []) for p in c["probes"]}
    lrs = sorted({_lr_of(r) for r in runs})
    cols = sorted({r["overrides"].get(column, "-") for r in runs})
    lines = [f"| train.lr | {' | '.join(f'{column}={c}' for c in cols)} |", "|---" * (len(cols) + 1) + "|"]
    for lr in lrs:
        cells = []
        for c in cols:
            rs = [r for r in runs if _lr_of(r) == lr and r["overrides"].get(column, "-") == c]
            cells.append(_cell(rs, "*" if (f"{column}={c}", lr) in probed else "") if rs else "-")
        lines.append(f"| {lr:g} | {' | '.join(cells)} |")
    return "\n".join(lines)


def margin_against_grid(folder: Path, column: str = "norm") -> list[str]:
    """Per configuration: margin's answer, the fixed grid's (the largest lr not failing below the
    lowest failing one, where an lr fails when any of its seeds is unstable, margin's own rule;
    non-monotone where an lr not failing lies above that), and whether they agree."""
    from stability.record import verdicts as vd

    runs = _summaries(folder)
    margin = json.loads((folder / "margin.json").read_text())
    out = []
    for c in margin["configs"]:
        value = c["config"].split("=", 1)[1] if "=" in c["config"] else c["config"]
        grid: dict[float, bool] = {}  # lr -> failing (any seed unstable)
        for r in runs:
            if r["overrides"].get(column) == value and _lr_of(r) in GRID_LRS:
                grid[_lr_of(r)] = grid.get(_lr_of(r), False) or vd.is_unstable(r["verdict"])
        failing = [lr for lr in sorted(grid) if grid[lr]]
        low = failing[0] if failing else None
        answer = max((lr for lr in grid if low is None or lr < low), default=None)
        again = [lr for lr in sorted(grid) if low is not None and lr > low and not grid[lr]]
        grid_text = (f"largest lr not failing {answer:g}" if answer is not None else "every lr fails") + (
            f", lowest failing {low:g}" if low is not None else ", none failing"
        )
        if again:
            grid_text += f", non-monotone (not failing again at {', '.join(f'{x:g}' for x in again)})"
        agree = c["margin"] == answer and c["unstable_lr"] == low
        unsure = (
            ""
            if c["margin"] is None
            else next(
                (
                    f" (margin's {c['margin']:g} is {p['verdict']}, not judged stable)"
                    for p in c["probes"]
                    if p["lr"] == c["margin"] and "inconclusive" in str(p["verdict"])
                ),
                "",
            )
        )
        out.append(
            f"- `{c['config']}`: margin says **{c['text']}** ({c['status']}, {len(c['probes'])} probes){unsure}; "
            f"the grid: {grid_text}: {'they agree' if agree else '**they disagree**'}."
        )
    return out


def _render_lr_grid(what: str) -> Callable[[Path, list[float]], str]:
    def render(runs: Path, seconds: list[float]) -> str:
        folder = next(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .out
        fig = FIGURE_BY_NAME[folder.name]
        cmds = "\n".join("stab " + " ".join(a for a in c if a not in ("--runs", "RUNS")) for c in fig.commands)
        return (
            f"{what}, seeds 0, 1 and 2, made by `python scripts/readme_figures.py --make {folder.name}` in "
            f"{sum(seconds) / 60:.0f} min on the 2-core machine ({LOAD}):\n\n```bash\n{cmds}\n```\n\n"
            "Each cell: the verdicts of its 3 seeds, median last validation loss / median validation loss at "
            "initialisation; * marks the cells whose runs were also `stab margin`'s probes (the same run folders: the "
            "sweep found them completed). Every run has `train.stop_early=true`, as margin's probes do. An lr fails "
            "when any of its seeds is unstable (margin's rule: the margin is where failures start).\n\n"
            + lr_grid_table(folder)
            + "\n\n"
            + "\n".join(margin_against_grid(folder))
            + "\n"
        )

    return render


def _render_probe(runs: Path, seconds: list[float]) -> str:
    """The Xiong probe's last/first layer ratio per depth and norm: median over seeds, its
    order-statistic interval (with its coverage) and each seed's value."""
    import pandas as pd

    from stability.probe import growth
    from stability.report.factors import median_interval

    df = pd.read_csv(runs / "probe" / "probe_init.csv")
    df["stage"] = df["stage"].fillna("")
    seeds = sorted(df["seed"].unique())
    lines = [
        f"Gradient of each layer's FFN output weight at initialisation, last layer over first, over {len(seeds)} "
        f"seeds ({', '.join(map(str, seeds))}); made by `python scripts/readme_figures.py --make xiong_probe` in "
        f"{sum(seconds):.0f} s on the 2-core machine ({LOAD}):",
        "",
        "```bash",
        "stab " + " ".join(a for a in FIGURE_BY_NAME["xiong_probe"].commands[0] if "RUNS" not in a and a != "--out"),
        "```",
        "",
        "| depth | norm | last / first, median | interval (coverage) | per seed |",
        "|---|---|---|---|---|",
    ]
    for (depth, norm), part in df.groupby(["depth", "norm"], sort=False):
        ratios = [growth(p.sort_values("layer").to_dict("records")) for _, p in part.groupby("seed", sort=True)]
        med, lo, hi, cov = median_interval(ratios)
        lines.append(
            f"| {depth} | {norm} | {med:.2f} | {lo:.2f}..{hi:.2f} ({cov:.0%}) | {' '.join(f'{r:.2f}' for r in ratios)} |"
        )
    return "\n".join(lines) + "\n"


def _span(values: list[float], fmt: str = "{:.3g}") -> str:
    """ "a-b" over the finite values ("a" when they agree, "-" when none is finite)."""
    finite = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not finite:
        return "-"
    lo, hi = fmt.format(finite[0]), fmt.format(finite[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def story_mechanism(runs: list) -> list[str]:
    """Per norm, what the story's runs measured besides their verdicts, each number from the run
    folders: the clip rate, the largest step grad norm, the largest attention logit on the
    validation batch, the scream flags, NaN runs and how often stage 2's RMS clamp was pinned."""
    from stability.report.factors import factor_value

    lines = []
    for norm in sorted({factor_value(r, "norm") for r in runs}):
        mine = [r for r in runs if factor_value(r, "norm") == norm]
        s = [r.summary for r in mine]
        logits = [
            max(
                (e["health_summary"].get("attn_logit_max", math.nan) for e in r.epochs if e.get("health_summary")),
                default=math.nan,
            )
            for r in mine
        ]
        grad = [
            max((g for g in r.series("grad_norm_max_by_epoch") if math.isfinite(g)), default=math.nan) for r in mine
        ]
        screams = sum(any(f.get("flag") == "scream" for f in x.get("flags") or []) for x in s)
        nan = sum(bool(x.get("first_nan")) for x in s)
        clamp = sum(any(w.get("warning") == "clamp_saturated" for w in x.get("warnings") or []) for x in s)
        lines.append(
            f"- `norm={norm}` ({len(mine)} runs): clip rate {_span([x.get('clip_rate') for x in s], '{:.0%}')}; "
            f"largest step grad norm {_span(grad)}; largest attention logit on the validation batch {_span(logits)}; "
            f"a scream flag in {screams}, a NaN in {nan}"
            + (f"; stage 2's RMS clamp pinned (`clamp_saturated`) in {clamp}." if clamp else ".")
        )
    return lines


def _render_story(runs: Path, seconds: list[float]) -> str:
    """The story sweep's report (see `render_sweep`)."""
    return render_sweep(runs / "story", seconds, "`norm`, `residual`, `clip`")


def _render_charlm_norms(runs: Path, seconds: list[float]) -> str:
    """The char LM's norm x qk_norm sweep's report (see `render_sweep`)."""
    return render_sweep(runs / "charlm_norms", seconds, "`norm`, `qk_norm`")


def render_sweep(folder: Path, seconds: list[float], factors: str) -> str:
    """A sweep's report: its opening answer verbatim, its per-configuration table (seeds pooled)
    and, per norm, the clip rates, grad norms, attention logits, screams and NaNs measured."""
    from stability import report as rep

    result = rep.write_report(folder)
    ans = rep.answer_display(result.answer)
    configs = rep.answer_display(result.configs) if result.configs is not None else None
    return (
        f"```\n{result.sentence}\n\n{ans.to_string(index=False)}\n```\n\n"
        + (
            f"Per configuration (3 seeds each; {factors}):\n\n```\n{configs.to_string(index=False)}\n```\n\n"
            if configs is not None
            else ""
        )
        + "Measured in the same runs:\n\n"
        + "\n".join(story_mechanism(result.runs))
        + f"\n\nWall time of the sweep: {seconds[0] / 60:.1f} min on the 2-core machine ({LOAD}).\n"
    )


def try_table(printed: str) -> str:
    """What `stab doctor --try` printed, from its table of fixes on: the diagnosis it repeats
    first (shown in full above) and its live progress lines are left out."""
    lines = printed.rstrip().splitlines()
    start = next((i for i, line in enumerate(lines) if "fixes tried from" in line), 0)
    return "\n".join(lines[start:])


def _render_doctor(runs: Path, seconds: list[float]) -> str:
    """The default `stab run` (its verdict, evidence and wall time), `stab doctor` on it verbatim,
    and the table `stab doctor --try` printed."""
    (summary,) = [json.loads(p.read_text()) for p in (runs / "run").glob("*/summary.json")]
    doctor = (runs / ".out" / "1.txt").read_text().rstrip().replace(str(runs), "runs")
    tried = try_table((runs / ".out" / "2.txt").read_text().replace(str(runs), "runs"))
    cmd = FIGURE_BY_NAME["doctor"].commands
    return (
        f"Made by `python scripts/readme_figures.py --make doctor` on the 2-core machine ({LOAD}). "
        f"`stab run` (the default preset: post-norm, residual 0.1, lr 1e-2, seed 0) took {seconds[0]:.0f} s "
        f"(latents not cached before) and ended `{summary['verdict']}`: {summary['evidence']}\n\n"
        f"```\n$ stab doctor RUN          # {seconds[1]:.1f} s\n{doctor}\n```\n\n"
        f"`stab {' '.join(a for a in cmd[2] if 'RUNS' not in a and a not in ('--runs',))}` "
        f"trained the fixes in {seconds[2]:.0f} s:\n\n```\n{tried}\n```\n\n" + seeds_line(runs / "seeds")
    )


def seeds_line(folder: Path) -> str:
    """The default `stab run` over seeds 0, 1, 2 (`stab sweep seed=0,1,2`, latents cached by then):
    the verdicts, the median final validation loss with its range, each run's wall time."""
    import statistics

    runs = sorted(_summaries(folder), key=lambda r: int(r["overrides"].get("seed", 0)))
    verdicts = [r["verdict"] for r in runs]
    losses = [float(r["final_val_loss"]) for r in runs]
    walls = [f"{float(r['wall_s']):.0f} s" for r in runs]
    return (
        f"The same default run over seeds {', '.join(r['overrides'].get('seed', '?') for r in runs)} "
        f"(`stab sweep seed=0,1,2`, the latents cached by then): "
        f"{', '.join(f'{verdicts.count(v)} {v}' for v in dict.fromkeys(verdicts))}; final validation loss median "
        f"{_num(statistics.median(v if math.isfinite(v) else math.inf for v in losses))} "
        f"(per seed {', '.join(_num(v) for v in losses)}); wall time per run, cached: "
        f"{', '.join(walls)}.\n"
    )


DETECT = (
    "stability/detectors/*.py",
    "stability/**/summarizer.py",
    "stability/record/verdicts.py",
    "stability/lr_sensitivity.py",
    "stability/training.py",
    "conf/config.yaml",
)
MARGIN = ("stability/margin/*.py", "cli/margin.py")
FIGURES = (
    Figure(
        "charlm_lr_grid",
        (
            (
                "margin",
                "--runs",
                "RUNS",
                "--name",
                "charlm_lr_grid",
                "model=charlm",
                "preset=smoke",
                "norm=pre,post",
                "margin.lo=0.001",
                "margin.hi=10",
                "margin.tolerance=10",
                "seed=0,1,2",
            ),
            (
                "sweep",
                "--runs",
                "RUNS",
                "--name",
                "charlm_lr_grid",
                "model=charlm",
                "preset=smoke",
                "norm=pre,post",
                "train.lr=0.001,0.01,0.1,1,10",
                "train.stop_early=true",
                "seed=0,1,2",
            ),
        ),
        (
            *DETECT,
            *MARGIN,
            "stability/models/charlm.py",
            "stability/models/layers.py",
            "stability/workloads/charlm/*.py",
            "conf/model/charlm.yaml",
            "conf/model_preset/charlm/smoke.yaml",
        ),
        _render_lr_grid("The char LM's smoke preset over a learning-rate grid"),
    ),
    Figure(
        "cascade_lr_grid",
        (
            (
                "margin",
                "--runs",
                "RUNS",
                "--name",
                "cascade_lr_grid",
                "preset=smoke",
                "norm=pre,post",
                "margin.lo=0.001",
                "margin.hi=10",
                "margin.tolerance=10",
                "seed=0,1,2",
            ),
            (
                "sweep",
                "--runs",
                "RUNS",
                "--name",
                "cascade_lr_grid",
                "preset=smoke",
                "norm=pre,post",
                "train.lr=0.001,0.01,0.1,1,10",
                "train.stop_early=true",
                "seed=0,1,2",
            ),
        ),
        (
            *DETECT,
            *MARGIN,
            "stability/models/cascade.py",
            "stability/models/layers.py",
            "stability/workloads/cascade/*.py",
            "conf/model/cascade.yaml",
            "conf/model_preset/cascade/smoke.yaml",
        ),
        _render_lr_grid("The cascade's smoke preset over a learning-rate grid"),
    ),
    Figure(
        "xiong_probe",
        (
            (
                "probe",
                "init",
                "model=charlm",
                "--paper",
                "--depths",
                "2,6,12",
                "--seeds",
                "0,1,2,3,4",
                "--out",
                "RUNS/probe",
            ),
        ),
        (
            "stability/probe.py",
            "cli/probe.py",
            "stability/report/factors.py",
            "stability/models/charlm.py",
            "stability/models/layers.py",
            "stability/workloads/charlm/*.py",
            "stability/workloads/base.py",
            "conf/config.yaml",
            "conf/model/charlm.yaml",
            "conf/model_preset/charlm/default.yaml",
        ),
        _render_probe,
    ),
    Figure(
        "story",
        (("sweep", "--runs", "RUNS", "--name", "story", "--launcher", "joblib", "--jobs", "2", "experiment=story"),),
        (
            *DETECT,
            "stability/report/factors.py",
            "stability/report/tables.py",
            "stability/report/answer.py",
            "stability/models/cascade.py",
            "stability/models/layers.py",
            "stability/workloads/cascade/*.py",
            "conf/experiment/story.yaml",
            "conf/model_preset/cascade/default.yaml",
        ),
        _render_story,
    ),
    Figure(
        "charlm_norms",
        (
            (
                "sweep",
                "--runs",
                "RUNS",
                "--name",
                "charlm_norms",
                "--launcher",
                "joblib",
                "--jobs",
                "2",
                "model=charlm",
                "norm=pre,post",
                "qk_norm=false,true",
                "seed=0,1,2",
            ),
        ),
        (
            *DETECT,
            "stability/report/factors.py",
            "stability/report/tables.py",
            "stability/report/answer.py",
            "stability/models/charlm.py",
            "stability/models/layers.py",
            "stability/workloads/charlm/*.py",
            "stability/workloads/base.py",
            "conf/model/charlm.yaml",
            "conf/model_preset/charlm/default.yaml",
            "conf/data/text.yaml",
        ),
        _render_charlm_norms,
    ),
    Figure(
        "doctor",
        (
            ("run", "--runs", "RUNS"),  # RUNS/run/<time>_defaults
            ("doctor", "RUNS/run/*"),
            ("doctor", "RUNS/run/*", "--try", "--runs", "RUNS", "--name", "try", "--launcher", "joblib", "--jobs", "2"),
            ("sweep", "--runs", "RUNS", "--name", "seeds", "seed=0,1,2"),  # the run's verdict over seeds, cached
        ),
        (
            *DETECT,
            "stability/doctor/*.py",
            "cli/doctor.py",
            "cli/doctor_try.py",
            "stability/models/cascade.py",
            "stability/models/layers.py",
            "stability/workloads/cascade/*.py",
            "conf/model/cascade.yaml",
            "conf/model_preset/cascade/default.yaml",
        ),
        _render_doctor,
    ),
)
FIGURE_BY_NAME = {f.name: f for f in FIGURES}


# --- the README's blocks ----------------------------------------------------------------------


def blocks(text: str) -> list[re.Match]:
    return list(MARK.finditer(text))


def check(text: str, root: Path = ROOT, figures: dict[str, Figure] | None = None) -> list[str]:
    """What is wrong with the README's blocks, one line each ([] when every block is fresh): a
    block of an unknown figure, a `made` block whose inputs no longer hash the same, a
    `not-remade` block without its visible note."""
    figures = FIGURE_BY_NAME if figures is None else figures
    problems = []
    for m in blocks(text):
        name, status = m["name"], m["status"]
        if name not in figures:
            problems.append(f"{name}: no such figure in scripts/readme_figures.py")
            continue
        if status == "made" and inputs_hash(figures[name], root) != m["hash"]:
            problems.append(
                f"{name}: its commands or code changed since it was made (inputs "
                f"{inputs_hash(figures[name], root)}, block {m['hash']}): re-make it "
                f"(--make {name}) or mark it not re-made (--mark-stale)"
            )
        if status == "not-remade" and STALE_NOTE not in m["body"]:
            problems.append(f"{name}: marked not-remade without the visible note ({STALE_NOTE!r})")
    return problems


def replace_block(text: str, name: str, status: str, digest: str, body: str) -> str:
    """`text` with block `name` rewritten (status, hash, body); ValueError if it has no such block."""
    for m in blocks(text):
        if m["name"] == name:
            new = f"<!-- figure {name}: {status} inputs={digest} -->\n{body.rstrip()}\n<!-- /figure {name} -->"
            return text[: m.start()] + new + text[m.end() :]
    raise ValueError(f"README.md has no block for figure {name!r}")


def mark_stale(text: str, root: Path = ROOT, figures: dict[str, Figure] | None = None) -> str:
    """Every stale `made` block becomes `not-remade`, its body opened by the visible note."""
    figures = FIGURE_BY_NAME if figures is None else figures
    for m in blocks(text):
        fig = figures.get(m["name"])
        if fig is None or m["status"] != "made" or inputs_hash(fig, root) == m["hash"]:
            continue
        note = (
            f"{STALE_NOTE} (its code changed after it was made; `python scripts/readme_figures.py --make "
            f"{fig.name}` re-makes it): the figures below may no longer be what the command prints.\n\n"
        )
        text = replace_block(text, fig.name, "not-remade", m["hash"], note + m["body"])
    return text


class LoadSampler:
    """The 1-minute load average of this machine, sampled every `every` seconds while a figure's
    commands run, so that each block says how busy the machine was when its wall times were taken."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def text(self) -> str:
        """ "load average 0.4-2.3" (the 1-minute load's range over the commands)."""
        return f"load average {min(self.samples):.1f}-{max(self.samples):.1f}"


LOAD = "load average not measured"  # set by make() for the render of the figure being made


def resolve(arg: str, runs: Path) -> str:
    """A command argument with RUNS replaced by the figure's folder; a glob in it (RUNS/run/*: the
    folder an earlier command made) must match exactly one path. ValueError otherwise."""
    arg = arg.replace("RUNS", str(runs))
    if "*" not in arg:
        return arg
    found = glob.glob(arg)
    if len(found) != 1:
        raise ValueError(f"{arg} matches {len(found)} paths, expected exactly one")
    return found[0]


def make(fig: Figure) -> str:
    """Run the figure's commands in a fresh folder (python -m cli.main, this checkout's code; each
    command's stdout kept as RUNS/.out/<i>.txt for the render) and render its block's body."""
    global LOAD
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        (runs / ".out").mkdir()
        # a latent cache of its own: a figure's first cascade run encodes the latents, as on a fresh machine
        env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", STAB_CACHE=str(runs / ".cache"))
        seconds = []
        with LoadSampler() as load:
            for i, cmd in enumerate(fig.commands):
                args = [resolve(a, runs) for a in cmd]
                t0 = time.time()
                out = subprocess.run(
                    [sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE
                )
                seconds.append(time.time() - t0)
                (runs / ".out" / f"{i}.txt").write_bytes(out.stdout)
        LOAD = load.text()
        return fig.render(runs, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail (exit 1) on a stale block; runs nothing")
    ap.add_argument("--make", nargs="*", metavar="NAME", help="re-run these figures (none named: every one)")
    ap.add_argument("--mark-stale", action="store_true", help="mark stale blocks not re-made, with a note")
    ap.add_argument("--list", action="store_true", help="the figures, their status and inputs hash")
    args = ap.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    if args.list:
        status = {m["name"]: m["status"] for m in blocks(text)}
        for f in FIGURES:
            print(f"{f.name}: {status.get(f.name, 'no block')}, inputs {inputs_hash(f)}")
        return 0
    if args.make is not None:
        for name in args.make or list(FIGURE_BY_NAME):
            if name not in FIGURE_BY_NAME:
                print(f"--make {name}: no such figure; figures: {', '.join(FIGURE_BY_NAME)}", file=sys.stderr)
                return 2
            body = make(FIGURE_BY_NAME[name])
            # the README as it is now, not as it was when the figure started: an edit made while
            # its commands ran (a story takes half an hour) is kept, only this block is replaced
            text = replace_block(
                README.read_text(encoding="utf-8"), name, "made", inputs_hash(FIGURE_BY_NAME[name]), body
            )
            README.write_text(text, encoding="utf-8")
            print(f"{name}: made")
        return 0
    if args.mark_stale:
        README.write_text(mark_stale(text), encoding="utf-8")
    problems = check(README.read_text(encoding="utf-8"))
    for p in problems:
        print(f"README.md: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
