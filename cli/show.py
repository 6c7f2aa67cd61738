"""`stab show RUN`: one run in detail: gradient norms by module group and epoch, stage RMS and
scale factors, events, codec, and how its config differs from the defaults.

    stab show runs/grid/norm=post,preset=smoke,residual=0.1
    stab show runs/grid/norm=post,preset=smoke,residual=0.1 --plot   # + RUN/plots/steps.png
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    RUN_FOLDER,
    check_folder,
    console,
    doubt_lines,
    fmt,
    runs_inside,
    styled,
    user_errors,
    verdict_text,
    warn,
    write_errors,
)
from cli.config import UserError, compose_run
from cli.report import frame_table
from stability.config import OWN_LOOP, ConfigError
from stability.errors import StorageError
from stability.record import format as rf

if TYPE_CHECKING:
    import pandas as pd

    from stability.report import Run


def show(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="A run folder (holds status.json, summary.json or config.yaml).")
    ],
    plot: Annotated[
        bool, typer.Option("--plot", help="Also draw loss and grad norm per step into RUN/plots/steps.png.")
    ] = False,
) -> None:
    """Print one run's per-epoch gradient norms by module group, stages, events and config."""
    from stability import report as rep

    with user_errors():
        r = _load(run)
    if plot:
        _plot(run, r)
    _print_header(run, r)
    _print_gradients(r)
    if r.epochs:
        _print_epochs(r)
    events = rep.events_frame(r)
    console.print(frame_table(_fmt_frame(events), title="events") if not events.empty else "events: none")
    _print_codec(r)
    _print_config(r)


def _load(run: Path) -> Run:
    """The run folder `run`, read; UserError when it is not a folder, not a run folder or not one stab wrote."""
    from stability import report as rep

    check_folder(run, RUN_FOLDER)
    if not rep.is_run_folder(run):
        raise UserError(
            f"{run}: not a run folder (no {', '.join(rf.RUN_MARKERS[:-1])} or {rf.RUN_MARKERS[-1]}){runs_inside(run)}"
        )
    r = rep.load_run(run, run.parent)
    if not rep.is_valid_run(r):
        raise UserError(
            f"{run}: not a run stab wrote ({'; '.join(r.warnings[:1]) or 'no state, verdict or stab config'}); "
            f"a run folder holds status.json with a state, summary.json with a verdict or a stab config.yaml"
        )
    return r


def _plot(run: Path, r: Run) -> None:
    """Draw RUN/plots/steps.png (loss and grad norm per step) and say where; a warning when no step was recorded."""
    from stability.report.stepplots import plot_steps
    from stability.report.steps import load_steps

    series = load_steps(r)
    if not len(series):
        warn(f"no step recorded (no readable {rf.METRICS}): nothing to plot")
        return
    with write_errors():  # a full disk or a read-only run folder: exit 1 naming the file
        try:
            drawn = plot_steps(r, series, r.rel, run / "plots" / "steps.png")
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(e.filename or str(run / "plots" / "steps.png"), e) from None
    console.print(f"per-step plot: {drawn.path}", highlight=False, soft_wrap=True)


def _print_header(run: Path, r: Run) -> None:
    """The folder, state, verdict and run id; the evidence, the other findings and warnings; the
    overrides, device, threads and wall time; what went wrong reading the folder."""
    s = r.summary
    console.print(
        styled(
            (str(run), "bold"),
            "  state ",
            verdict_text(r.state),
            "  verdict ",
            verdict_text(r.verdict),
            f"  run {s.get('run_id') or r.status.get('run_id') or '?'}",
        ),
        highlight=False,
    )
    if s.get("evidence"):
        console.print(f"  {s['evidence']}", highlight=False)
    for f in (s.get("flags") or [])[1:]:  # every finding besides the verdict's own
        console.print(f"  also {f.get('flag')}: {f.get('evidence')}", highlight=False)
    for line in doubt_lines(s):
        console.print(line, highlight=False, style="yellow")
    for w in s.get("warnings") or []:
        console.print(f"  warning: {w.get('message')}", highlight=False, style="yellow")
    console.print(
        f"  overrides: {' '.join(r.overrides) if r.overrides is not None else '?'}   "
        f"device {r.status.get('device', '?')}  threads {r.status.get('threads', '?')}   "
        f"wall {fmt(r.wall_s)} s",
        highlight=False,
    )
    for w in r.warnings:
        warn(w)


def _print_gradients(r: Run) -> None:
    """The gradient-norm table by module group (the group where the first NaN was located in
    red), tied parameters, and the optimizer's parameter groups when there are several."""
    from stability import report as rep

    grads = rep.grad_epoch_frame(r)
    if grads.empty:
        console.print(f"no gradient-norm table (no readable {rf.GRAD_TABLE})")
    else:
        nan_module = (r.first_nan or {}).get("module")  # None when not located: no row is marked as the start
        table = grads.reset_index().rename(columns={"index": "group"})
        console.print(
            frame_table(
                _fmt_frame(table),
                title="gradient norm by module group: mean per epoch; max over all steps (NaN if any step was)",
                row_styles=["red" if g == nan_module else None for g in table["group"]],
            )
        )
    for tie in r.data.get("tied") or []:  # parameters shared by two modules: one gradient, counted once
        console.print(
            f"tied: {tie.get('param')} is {tie.get('same_as')} (counted once, in group {tie.get('counted_in')})",
            highlight=False,
        )
    optimizer = r.data.get("optimizer") or {}
    if len(optimizer.get("param_groups") or []) > 1:
        for i, g in enumerate(optimizer["param_groups"]):
            settings = ", ".join(f"{k} {fmt(v)}" for k, v in g.items() if k in ("lr", "weight_decay", "n_params"))
            console.print(f"optimizer {optimizer.get('class', '?')} param group {i}: {settings}", highlight=False)


def _print_epochs(r: Run) -> None:
    """Per epoch: the epochs table, the stages, health on the validation batch, the checks stab
    could not set up, the last generated text and the decoded audio."""
    import pandas as pd

    from stability import report as rep

    console.print(frame_table(_fmt_frame(rep.epoch_frame(r)), title="epochs"))
    if any(e.get("stage_rms") for e in r.epochs):
        console.print(
            frame_table(
                _fmt_frame(rep.stage_frame(r)),
                title="stages: output RMS, ratio the RMS match needed, scale applied (clamped), share of steps clamped",
            )
        )
    health = [{"epoch": e["epoch"], **e["health_summary"]} for e in r.epochs if e.get("health_summary")]
    if health:
        console.print(
            frame_table(
                _fmt_frame(pd.DataFrame(health)),
                title="health on the validation batch: min attention entropy, max logit, "
                "max sink score, layers with a sink (> 0.3), massive activations, gradient sink",
            )
        )
    for check in ("scream", "health"):  # a custom model's checks stab could not set up, and why
        if str(r.data.get(check, "")).startswith("not available"):
            console.print(f"{check} check: {r.data[check]}", highlight=False)
    last_samples = next((e["samples"] for e in reversed(r.epochs) if e.get("samples")), None)
    if last_samples:
        console.print(
            styled(("generated text", "bold"), f" (greedy, epoch {r.epochs[-1]['epoch']}; all epochs in {rf.SAMPLES}):")
        )
        for smp in last_samples:
            console.print(f"  {smp['prompt']!r} -> {smp['output'][:160]!r}", highlight=False)
    audio = [a for e in r.epochs for a in (e.get("audio") or [])]
    if audio:
        console.print(
            styled(("audio", "bold"), " (decoded with the EnCodec decoder): " + ", ".join(map(str, audio))),
            highlight=False,
            soft_wrap=True,
        )


def _print_codec(r: Run) -> None:
    """The codec's weights, seed and checksum, the latent RMS and scale, and the cache hit (cascade runs)."""
    s = r.summary
    codec = s.get("codec") or r.data.get("codec") or {}
    cache = r.data.get("cache") or {}
    if codec:
        console.print(
            f"codec: weights {codec.get('weights', '?')}  seed {fmt(codec.get('seed'))}  "
            f"checksum {fmt(codec.get('checksum'))}   latent RMS {fmt(r.data.get('latent_rms'))}  "
            f"scale x{fmt(s.get('latent_scale', r.data.get('scale')))}   "
            f"cache {'hit' if cache.get('hit') else 'miss' if cache else '?'} {cache.get('key', '')}",
            highlight=False,
        )


def _print_config(r: Run) -> None:
    """How the run's config differs from the defaults of its own workload (a run of the monitor
    API in your own loop: its model parameters, lr and clip); a warning when conf/ cannot compose."""
    import pandas as pd

    from stability import report as rep

    if r.config is None:
        console.print("config: no readable config.yaml")
        return
    model = (r.config.get("model") or {}).get("name", "cascade")
    if model == "custom" and r.config["model"].get("_target_") == OWN_LOOP:  # stab's Monitor, no factory
        params = {k: v for k, v in r.config["model"].items() if k not in ("name", "_target_")}
        console.print(
            f"config: recorded by stab's Monitor in your own loop; model {params or '{}'}, train.lr "
            f"{fmt(r.config['train'].get('lr'))}, clip {fmt(r.config['train'].get('clip'))}",
            highlight=False,
        )
        return
    try:
        target = [f"model._target_={r.config['model'].get('_target_')}"] if model == "custom" else []
        defaults = compose_run([f"model={model}", *target]).to_dict()  # the defaults of this run's own workload
    except (UserError, ConfigError) as e:  # a broken conf/ must not hide the run itself
        warn(f"cannot compose the default config to compare with: {e}")
        return
    diff = rep.config_diff(defaults, r.config)
    frame = pd.DataFrame([(k, _value(a), _value(b)) for k, a, b in diff], columns=["key", "default", "this run"])
    console.print(frame_table(frame, title="config: differences from the defaults") if diff else "config: the defaults")


def _value(x: Any) -> str:
    from stability import report as rep

    if x is rep.ABSENT:
        return str(x)
    if isinstance(x, list):
        return "[" + ", ".join(_value(v) for v in x) + "]"
    return "null" if x is None else fmt(x)


def _fmt_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).map(lambda x: fmt(x.item() if hasattr(x, "item") else x))
