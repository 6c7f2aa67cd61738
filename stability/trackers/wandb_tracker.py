"""The Weights & Biases tracker: one W&B run per job, grouped by sweep, offline unless WANDB_MODE
says otherwise; an online server that cannot be reached is found out in seconds."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from stability.record.records import Event, Summary
from stability.trackers.base import Tracker, _why
from stability.trackers.metrics import _event_text, summary_metrics

WANDB_REACH_S = 5.0  # seconds to open a connection to the W&B server before calling it unreachable


def _probe_wandb_server(base_url: str, timeout: float = WANDB_REACH_S) -> None:
    """Fail in seconds, in one line, where `wandb.init` in online mode without a network retries
    for its `init_timeout` (90 s) and then raises a multi-line CommError: open one TCP connection
    to the server's host and port (a name that does not resolve fails at once, a host that does
    not answer after `timeout` s). Raises OSError naming the server and the cause."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = e.strerror if isinstance(e, socket.gaierror) else _why(e)
        raise OSError(
            f"the W&B server {base_url} cannot be reached ({why}); WANDB_MODE=offline keeps the run to sync later"
        ) from None


class WandbTracker(Tracker):
    """One W&B run per job, grouped by sweep, offline unless WANDB_MODE says otherwise. Charts use
    stab's `step` as their x-axis (`define_metric`); W&B's own step only grows, across attempts too
    (its next value is kept in trackers.json), so a re-run continues the same run (same id,
    resume="allow") without W&B dropping its points as out of order."""

    name = "wandb"

    def __init__(
        self, run_dir: Path, group: str, params: dict[str, Any], operational: dict[str, Any], previous: dict[str, Any]
    ) -> None:
        import wandb

        self.id = previous.get("id") or uuid.uuid4().hex[:8]
        # W&B's files go where W&B users put them (WANDB_DIR), else into the run folder
        self.dir = os.environ.get("WANDB_DIR") or str(run_dir)
        self.next = int(previous.get("next_step", 0))
        mode = os.environ.get("WANDB_MODE") or "offline"
        if mode in ("online", "run", "shared"):
            # WANDB_BASE_URL as wandb.init reads it now; the process-wide setup() singleton keeps the value
            # of its first call (an earlier run in this process), else W&B's settings file
            _probe_wandb_server(os.environ.get("WANDB_BASE_URL") or str(wandb.setup().settings.base_url))
        self.run = wandb.init(
            project=None if os.environ.get("WANDB_PROJECT") else "stab",
            group=group,
            name=run_dir.name,
            id=self.id,
            resume="allow",
            dir=self.dir,
            config={**params, **operational},
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def _log(self, data: dict[str, Any], step: int) -> None:
        self.run.log({**data, "step": step}, step=self.next)
        self.next += 1

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One W&B history row, with stab's `step` as its x-axis."""
        self._log(metrics, step)

    def event(self, rec: Event, step: int) -> None:
        """A history row event/NAME (text); the first of each kind also in the run's summary."""
        self._log({f"event/{rec['event']}": _event_text(rec)}, step)
        if f"first/{rec['event']}" not in self.run.summary.keys():  # noqa: SIM118 (W&B's Summary has no __contains__); the first of each kind, in the summary
            self.run.summary[f"first/{rec['event']}"] = {k: v for k, v in rec.items() if k != "event"}

    def summary(self, summary: Summary, step: int) -> None:
        """The summary's numbers as a history row; verdict, evidence, flags, ... in W&B's summary."""
        self._log(summary_metrics(summary), step)
        keep = (
            "verdict",
            "evidence",
            "flags",
            "warnings",
            "first_nan",
            "scream_epoch",
            "final_loss",
            "final_val_loss",
            "grad_norm_by_epoch",
        )
        self.run.summary.update({k: summary[k] for k in keep if k in summary})

    def close(self, state: str) -> None:
        """Finish the W&B run (exit code 0 only for `completed`)."""
        self.run.finish(exit_code=0 if state == "completed" else 1)

    def state(self) -> dict[str, Any]:
        """The W&B run id, its next internal step and where its files are."""
        return {
            "id": self.id,
            "next_step": self.next,
            "dir": "wandb" if "WANDB_DIR" not in os.environ else str(Path(self.dir) / "wandb"),
        }
