"""One run's lifecycle, the same for every loop: the folder's lease, trackers, writer and status.

stab's training loop (`stability.training.run`) and `stability.monitor.Monitor` (and through it
the Lightning and transformers callbacks) both open a `RunSession` and end it one of three ways:

- `complete(summary)`: status `completed` with the verdict;
- Ctrl-C (`KeyboardInterrupt`, also what a sweep's SIGTERM handler raises): status
  `interrupted`, every step recorded so far kept;
- any other exception: status `failed` with the error and traceback, a `failed` summary, every
  step recorded so far kept.

    with RunSession(cfg, run_dir, overrides) as session:   # lease, trackers, status "running"
        session.open_steps(layout)
        ... session.writer.step(rec) ...; session.end_epoch(work, epoch)
        session.complete(session.writer.finish(run_id=..., steps=...))

The session holds the run folder's lease from `open` to its end (`LeaseBusy` if another live
process writes there). In a distributed run the other ranks get a session that writes nothing
and holds no lease (`world`).
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stability import distributed, health
from stability.config import RunConfig
from stability.errors import StorageError
from stability.forensics import eager
from stability.progress import phase
from stability.record.format import SCHEMA_VERSION
from stability.record.summarizer import Summarizer
from stability.record.writer import RunWriter
from stability.rundirs import RunLease
from stability.steplayout import StepLayout
from stability.trackers import Recorder, open_trackers


class _Writer(RunWriter):
    """stab's writer, keeping the events it writes (`RunSession.events`; a run writes few)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, Any]] = []

    def event(self, ev: Mapping[str, Any]) -> None:
        self.seen.append(dict(ev))
        super().event(ev)


def _last_words(write: Any, *args: Any, **kwargs: Any) -> None:
    """The final state of a run that is ending badly: best effort, never hides the first error."""
    try:
        write(*args, **kwargs)
    except StorageError:
        pass


class RunSession:
    """A run folder from the first status to the last (see the module docstring).

    Args:
        cfg: the run's config, written as config.yaml; its `log` opens the trackers.
        run_dir: the run folder (created).
        overrides: the command-line overrides, written to overrides.json.
        status: extra fields of status.json (a sweep job's `owner`, `recorded_by`, ...).
        world: this process's place in a data-parallel run; only rank 0 writes.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        overrides: Sequence[str] = (),
        *,
        status: dict[str, Any] | None = None,
        world: distributed.World | None = None,
    ) -> None:
        self.cfg, self.dir, self.overrides = cfg, Path(run_dir), list(overrides)
        self.extra = dict(status or {})
        self.world = world or distributed.World()
        self.lease: RunLease | None = None
        self.recorder: Recorder = Recorder()
        self._writer: _Writer | None = None
        self.t_start = time.time()
        self.state = "new"

    @property
    def writer(self) -> _Writer:
        """The run folder's writer, from `open` on.

        Raises:
            RuntimeError: the session is not open yet (`open` or `with RunSession(...)` first).
        """
        if self._writer is None:
            raise RuntimeError("RunSession.writer: the session is not open (call open() or use `with RunSession(...)`)")
        return self._writer

    # --- the start ----------------------------------------------------------------------------
    def open(self) -> RunSession:
        """Take the lease, open the trackers and the writer, write config, overrides and status
        `running`. On failure nothing stays held."""
        main = self.world.main
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.lease = RunLease(self.dir, **{k: v for k, v in self.extra.items() if k == "owner"}).acquire()
        try:
            # no tracker: imports nothing; in a distributed run rank 0 alone has trackers and writes
            self.recorder = open_trackers(self.cfg, self.dir, self.overrides) if main else Recorder()
            self._writer = _Writer(self.dir, self.recorder, write=main)
            self.writer.start(self.cfg.to_dict(), self.overrides, self.cfg.identity())
            self.writer.status(
                fresh=True,
                state="running",
                run_id=self.cfg.identity(),
                pid=os.getpid(),
                host=socket.gethostname(),
                started=self.t_start,
                finished=None,
                error=None,
                **self.extra,
            )
        except BaseException:
            self._release()
            raise
        self.state = "running"
        return self

    def describe(self, device: torch.device | str, info: dict[str, Any]) -> None:
        """The machine in status.json, the workload's facts in data.json."""
        self.writer.data(info)
        self.writer.status(
            device=str(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=platform.python_version(),
        )

    def open_steps(self, layout: StepLayout) -> None:
        """The run's step layout is known (module groups, stages): the writer and detectors take it."""
        self.writer.open(layout.groups, layout.n_stages, Summarizer(self.cfg.detect, self.cfg.train.clip))

    def evaluate_init(self, work: Any) -> dict[str, Any]:
        """The evaluation before the first step, written as the `init_eval` event and returned: the
        validation loss at initialisation (what `diverged` and the LR sensitivity's cap compare the
        final validation loss with: validation against validation, not the first training batch),
        whether the untrained model's output is already collapsed and its scream scores, and the
        workload's no-learning baseline (`info["baseline_loss"]`, e.g. the unigram entropy of the
        text), where it has one."""
        with eager(work), phase("evaluating at initialisation", unit="evals"):
            ev = work.evaluate()
        init = {
            "val_loss": ev.get("val_loss", math.nan),
            "collapsed": ev.get("collapsed"),
            "scores": ev.get("scores") or {},
            "baseline_loss": work.info.get("baseline_loss", math.nan),
            "baseline": work.info.get("baseline"),
        }
        self.writer.event({"event": "init_eval", **init})
        return init

    # --- as the run goes ----------------------------------------------------------------------
    def end_epoch(self, work: Any, epoch: int) -> dict[str, Any]:
        """The epoch's record: the writer's aggregates of its steps, then validation, the scream
        check, the health probe (`detect.health`) and any listening; written by the writer.
        Returns it. After a stop at a non-finite step the evaluation is of the weights the last
        finite step left (the non-finite one was not applied)."""
        writer = self.writer
        erec = writer.close_epoch()
        with eager(work), phase(f"evaluating epoch {epoch}", unit="epochs"):
            erec.update(evaluate(work, self.cfg.detect.health))
            if writer.writes:  # rank 0 alone writes audio
                erec.update(work.listen(epoch, self.dir))  # {"audio": [...]} at listen epochs
        writer.epoch(erec)
        return erec

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event written so far."""
        return list(self._writer.seen) if self._writer is not None else []

    # --- the end ------------------------------------------------------------------------------
    def complete(self, summary: Mapping[str, Any]) -> None:
        """The run finished (whatever its verdict): status `completed`, trackers closed, lease released."""
        try:
            self.recorder.close("completed")
            self.writer.status(state="completed", finished=time.time(), verdict=summary["verdict"])
        finally:
            self.state = "completed"
            self._release()

    def end(self, error: BaseException) -> None:
        """The run is ending on `error`: keep every step recorded so far, status `interrupted`
        (KeyboardInterrupt) or `failed` (anything else, with a `failed` summary); best effort,
        never hides `error`."""
        if self.state != "running":
            return
        writer = self.writer
        try:
            _last_words(writer.abort)
            if isinstance(error, KeyboardInterrupt):
                how = error.args[0] if error.args else "SIGINT"
                _last_words(writer.status, state="interrupted", finished=time.time(), error=f"interrupted ({how})")
                self.state = "interrupted"
            else:
                text = f"{type(error).__name__}: {error}"
                tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                _last_words(writer.status, state="failed", finished=time.time(), error=text, traceback=tb)
                _last_words(
                    writer.summary,
                    {
                        "schema_version": SCHEMA_VERSION,
                        "verdict": "failed",
                        "evidence": text,
                        "run_id": self.cfg.identity(),
                        "wall_s": time.time() - self.t_start,
                    },
                )
                self.state = "failed"
            self.recorder.close(self.state)
        finally:
            self._release()

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> RunSession:
        return self.open() if self.state == "new" else self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is not None:
            self.end(error)
        elif self.state == "running":  # left without complete(): nothing more will come
            self.end(RuntimeError("the run ended without a summary"))


def evaluate(work: Any, health_on: bool) -> dict[str, Any]:
    """The epoch's evaluation: validation loss, scream check, and the health probe."""
    ev = work.evaluate()
    layers_of = work.health_layers() if health_on else {}
    if layers_of:
        layers = health.measure(work.model, work.health_loss, layers_of)
        ev["health"], ev["health_summary"] = layers, health.summarize(layers)
    return ev
