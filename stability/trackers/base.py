"""What every tracker shares: the logger interface (`Tracker`, torchtitan's `log(metrics, step)`
and `close()` with a no-op base), the one-line warning they raise, the check that a tracker's
package is installed, and an exception in one line.

    check_installed(["tensorboard"])   # ConfigError naming `pip install ...` when it is not
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

from stability.config import ConfigError
from stability.record.records import Event, Summary

PIP = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> module and pip package


class TrackerWarning(UserWarning):
    """A tracker failed and was switched off; the run folder has every record."""


log = logging.getLogger("stab.trackers")  # the CLI prints it as one `warning:` line (cli.common.warn)


def _why(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its text (SQLAlchemy adds more)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_installed(names: Sequence[str]) -> None:
    """Refuse, before any work, a tracker whose package is not installed (no import: a spec lookup)."""
    for name in names:
        if importlib.util.find_spec(PIP[name]) is None:
            raise ConfigError(
                f"log={name} needs the {PIP[name]} package, which is not installed: "
                f"pip install {PIP[name]} (or pip install -e '.[trackers]' for all three)"
            )


class Tracker:
    """One tracker's logger; the base does nothing (torchtitan's `log(metrics, step)`/`close()`)."""

    name = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Named numbers at training step `step` (`step_metrics`, `epoch_metrics`, `summary_metrics`)."""

    def event(self, rec: Event, step: int) -> None:
        """One event (first_nan, grad_spike, ...) at training step `step`."""

    def summary(self, summary: Summary, step: int) -> None:
        """The run's summary (verdict, evidence, flags, warnings) at its last step."""

    def flush(self) -> None:
        """Send what is buffered (called at each epoch's end)."""

    def close(self, state: str) -> None:
        """The run ended in `state` (completed, failed, interrupted): finish the tracker's run."""

    def state(self) -> dict[str, Any]:
        """What trackers.json keeps for this tracker (its run id), to continue it on a re-run."""
        return {}
