"""`stab export`: send finished runs somewhere after training, from their folders alone.

    stab export runs/run/<folder> --to tensorboard     # RUN/tb/, as if it had run with log=tensorboard
    stab export runs/grid --to mlflow                  # every run of a sweep
    stab export runs/grid --to wandb                   # a second export sends nothing twice

A target is an entry of `TARGETS`, a plain registry (name -> `Target`); `export()` looks the name
up before any work (`ValueError: Unsupported export target: 'x'`), finds the run folders and hands
each to the target's `send`. The trackers (`tensorboard`, `mlflow`, `wandb`) replay a run's
records, in the order the training loop produced them, through the very `Recorder` and
`Tracker` classes that `log=` uses (`stability.trackers.open_trackers`), so an exported run
looks the same as one logged live: same names, same run ids (kept in RUN/trackers.json), same
places. Other targets (files in another tool's format) register with `register(Target(...))`.

Idempotent: RUN/trackers.json keeps, per tracker, how far its export went (`export`: the
attempt's start time, the last step, and the numbers of epochs and events sent, whether the
summary was). A second export sends only what the folder gained since (nothing, for a finished
run); a run logged live with that tracker, without a tracker error, counts as sent. TensorBoard
is the exception in how: when anything is new it sends the whole run again after its purge
marker at step 0, which makes TensorBoard drop the earlier points (never shows them twice).
A folder re-run since the export (a new start time) is a new attempt: sent again in full, as a
live re-run would be (MLflow and W&B then hold both attempts, as they do for `log=`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stability.config import TRACKERS, ConfigError, RunConfig, did_you_mean
from stability.record import format as rf
from stability.record.folder import RunFolder
from stability.report.loading import Run, find_runs, is_valid_run, load_run
from stability.storage import dumps, write_json


class ExportError(Exception):
    """One run could not be exported (no config, still running, the tracker refused): one line."""


@dataclass(frozen=True)
class Target:
    """One export target. `send(run, out)` exports one loaded run folder and returns one line
    saying what it did; it raises ExportError for a run it cannot export. `out` is the `--out`
    folder for targets that write files (None: their own default); `package` is checked
    installed (no import) before any work."""

    name: str
    help: str
    send: Callable[[Run, Path | None], str]
    package: str | None = None


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target to the registry (a second one of the same name replaces the first)."""
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The registered target `name`; ValueError naming the allowed ones otherwise."""
    if name not in TARGETS:
        raise ValueError(
            f"Unsupported export target: {name!r} (allowed: {', '.join(TARGETS)}){did_you_mean(name, TARGETS)}"
        )
    return TARGETS[name]


@dataclass
class Outcome:
    """What one run's export did: `sent` (one line) or `error`."""

    run: Path
    sent: str = ""
    error: str = ""


def export(path: Path, to: str, out: Path | None = None) -> list[Outcome]:
    """Export the run folder `path`, or every run folder under it, to the target `to`. Bad input
    (unknown target, its package missing, no run folder) raises ValueError/ConfigError before
    any run is touched; a run that cannot be exported gives an Outcome with `error`."""
    target = get_target(to)
    if target.package is not None and importlib.util.find_spec(target.package) is None:
        raise ConfigError(
            f"--to {to} needs the {target.package} package, which is not installed: pip install {target.package}"
        )
    if out is not None and to in TRACKERS:  # it would be ignored: the tracker writes where log= does
        raise ValueError(
            f"--out is not used by --to {to}, which sends to {target.help}; --out is for "
            f"{', '.join(t for t in TARGETS if t not in TRACKERS)}"
        )
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: pass a folder (it is created if missing)")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such folder; pass a run folder or a folder of them")
    if not path.is_dir():
        raise ValueError(f"{path}: is a file, not a folder; pass a run folder or a folder of them")
    folders = [path] if any((path / m).exists() for m in rf.RUN_MARKERS) else find_runs(path)
    if not folders:
        raise ValueError(f"{path}: no run folders in it (a run folder holds {', '.join(rf.RUN_MARKERS)})")
    runs = [load_run(folder, path.parent if folder == path else path) for folder in folders]
    if not any(is_valid_run(run) for run in runs):
        raise ValueError(
            f"{path}: no valid run in it ({', '.join(str(f) for f in folders[:3])}{' ...' if len(folders) > 3 else ''}: "
            f"no state, verdict or stab config); a run folder holds status.json with a state, "
            f"summary.json with a verdict or a stab config.yaml"
        )
    outcomes = []
    for folder, run in zip(folders, runs):
        try:
            with _exporting(folder):
                outcomes.append(Outcome(folder, sent=target.send(run, out)))
        except ExportError as e:
            outcomes.append(Outcome(folder, error=str(e)))
    return outcomes


@contextmanager
def _exporting(folder: Path) -> Iterator[None]:
    """Hold the run folder's lease while exporting it, as its one writer (RUN/trackers.json): a
    second `stab export` of the same run at the same time, or a job re-running it, is refused
    instead of sending it twice. A folder that cannot be written (a read-only archive exported
    --out elsewhere) is exported without the lease."""
    from stability.rundirs import LeaseBusy, RunLease

    lease = RunLease(folder, purpose="stab export")
    try:
        lease.acquire()
    except LeaseBusy as e:
        raise ExportError(f"not exported: {e}") from None
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lease.release()


# --- the trackers --------------------------------------------------------------------------------


def replay_order(
    steps: Sequence[Mapping[str, Any]], epochs: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]
) -> list[tuple[str, int, Mapping[str, Any]]]:
    """The records as the training loop handed them to the Recorder: each step, then the events
    of that step, each epoch's record after its last step, events without a step (a scream's
    onset) after their epoch's record. Items are (kind, index within its file, record), kind one
    of step | event | epoch."""
    items: list[tuple[tuple[float, float, int, int], str, int, Mapping[str, Any]]] = []
    last_step: dict[int, int] = {}
    for i, s in enumerate(steps):
        e = int(s.get(rf.EPOCH, 0))
        last_step[e] = max(last_step.get(e, -1), int(s[rf.STEP]))
        items.append(((e, s[rf.STEP], 0, i), "step", i, s))
    for i, ep in enumerate(epochs):
        e = int(ep.get("epoch", 0))
        items.append(((e, last_step.get(e, -1), 2, i), "epoch", i, ep))
    for i, ev in enumerate(events):
        epoch = ev.get("epoch")
        e = int(epoch) if isinstance(epoch, (int, float)) else 1 << 30
        step = ev.get("step")
        if isinstance(step, (int, float)):
            items.append(((e, step, 1, i), "event", i, ev))
        else:
            items.append(((e, last_step.get(e, -1), 3, i), "event", i, ev))
    items.sort(key=lambda t: t[0])
    return [(kind, i, rec) for _, kind, i, rec in items]


def _digest(obj: Any) -> str:
    return hashlib.sha1(dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _tracker_send(name: str) -> Callable[[Run, Path | None], str]:
    def send(run: Run, out: Path | None) -> str:
        return send_to_tracker(run, name)

    return send


def send_to_tracker(run: Run, name: str, warn: Callable[[str], None] | None = None) -> str:
    """Replay one finished run folder into tracker `name` through `open_trackers` (as `log=name`
    would have), sending only what an earlier export or the live run did not; updates the
    `export` entry of RUN/trackers.json. Returns one line; raises ExportError."""
    from stability.trackers import STORE_FILE, open_trackers
    from stability.trackers.recorder import _read_store

    if run.state in ("running", "unknown"):
        why = "still running" if run.state == "running" else "no readable status.json"
        raise ExportError(f"not exported: {why} (export sends finished runs)")
    if run.config is None:
        raise ExportError(f"not exported: no readable {rf.CONFIG}")
    try:
        cfg = RunConfig.from_dict({**run.config, "log": [name]})
    except (ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"not exported: {rf.CONFIG} does not load ({e})") from None
    steps = RunFolder(run.path).steps()
    steps = [s for s in steps if isinstance(s.get(rf.STEP), int)]
    epochs = [e for e in run.epochs if isinstance(e.get("epoch"), int)]
    events = [e for e in run.events if e.get("event")]
    summary = run.summary if run.summary.get("verdict") else None
    attempt = run.status.get("started")
    now = {
        "started": attempt,
        "steps": steps[-1][rf.STEP] if steps else -1,
        "epochs": len(epochs),
        "events": len(events),
        "summary": _digest(summary) if summary else None,
    }

    stored = _read_store(run.path)
    done = (stored.get("export") or {}).get(name)
    if done is None and name in stored and not stored[name].get("error") and run.state == "completed":
        done = now  # logged live by this run, and the tracker never failed: it has everything
    if done is not None and done.get("started") != attempt:
        done = None  # the folder was re-run since: a new attempt, sent in full
    if done == now:
        return f"{name}: up to date, nothing sent"
    if name == "tensorboard":
        done = None  # TensorBoard replaces, after its purge marker at step 0: send it all

    errors: list[str] = []
    recorder = open_trackers(cfg, run.path, run.overrides or [], warn=errors.append)
    if not recorder:
        raise ExportError(f"{name}: " + (recorder.errors.get(name) or (errors[0] if errors else "did not start")))
    sent = {"step": 0, "epoch": 0, "event": 0}
    first_step = done["steps"] if done else -1
    for kind, i, rec in replay_order(steps, epochs, events):
        if done is not None and (
            (kind == "step" and rec[rf.STEP] <= first_step)
            or (kind == "epoch" and i < done["epochs"])
            or (kind == "event" and i < done["events"])
        ):
            if kind == "step":
                recorder.last_step = rec[rf.STEP]  # where a later epoch record or event is drawn
            continue
        getattr(recorder, kind)(rec)
        sent[kind] += 1
    send_summary = summary is not None and (done is None or done.get("summary") != now["summary"])
    if summary is not None and send_summary:
        recorder.summary(summary)
    recorder.close(run.state)
    if recorder.errors.get(name):
        raise ExportError(f"{name} failed during the export: {recorder.errors[name]} (nothing marked as sent)")
    stored = _read_store(run.path)
    stored.setdefault("export", {})[name] = now
    write_json(run.path / STORE_FILE, stored)
    parts = [f"{sent['step']} steps", f"{sent['epoch']} epochs", f"{sent['event']} events"]
    return f"{name}: sent {', '.join(parts)}{', the summary' if send_summary else ''}"


for _name, _help in (
    ("tensorboard", "event files in RUN/tb/ (tensorboard --logdir RUNS)"),
    ("mlflow", "the MLflow store beside the sweeps (RUNS/mlflow/mlflow.db) or MLFLOW_TRACKING_URI"),
    ("wandb", "a W&B run per job, offline in RUN/wandb/ unless WANDB_MODE is set"),
):
    assert _name in TRACKERS
    register(Target(_name, _help, _tracker_send(_name), package=_name))


# --- the bad steps, in other trainers' formats (stability.badsteps) ------------------------------


def _bad_steps_send(fmt: str) -> Callable[[Run, Path | None], str]:
    def send(run: Run, out: Path | None) -> str:
        from stability import badsteps
        from stability.storage import atomic_write_text

        try:
            steps = badsteps.bad_steps(run.path)
        except ValueError as e:
            raise ExportError(str(e)) from None
        name, text = badsteps.FORMATS[fmt].render(steps)
        folder = run.path if out is None else Path(out) / run.rel
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / name, text)
        return f"{fmt}: {len(steps)} bad step(s) -> {folder / name}"

    return send


def _register_bad_steps() -> None:
    from stability.badsteps import FORMATS

    for fmt in FORMATS.values():
        register(Target(fmt.name, fmt.help + " (written into the run folder, or --out/RUN)", _bad_steps_send(fmt.name)))


_register_bad_steps()


__all__ = [
    "TARGETS",
    "ExportError",
    "Outcome",
    "Target",
    "export",
    "get_target",
    "register",
    "replay_order",
    "send_to_tracker",
]
