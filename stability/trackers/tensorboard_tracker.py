"""The TensorBoard tracker: event files in RUN/tb/ (`tensorboard --logdir runs/run`)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from stability.record.records import Event, Summary
from stability.trackers.base import Tracker
from stability.trackers.metrics import _event_text, summary_metrics


def _quiet_tensorboard_threads() -> None:
    """TensorBoard writes event files in a thread that re-raises a write error (a full disk) after
    storing it for the writer's next call, so Python printed a thread traceback before stab's own
    warning. The error still reaches the next `add_summary`/`close`, which the Recorder turns into
    one warning; only the duplicate traceback is dropped. Other threads' errors print as before."""
    previous = threading.excepthook
    if getattr(previous, "stab_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and getattr(args.thread, "exception", None) is not None:
            return
        previous(args)

    hook.stab_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardTracker(Tracker):
    """Event files in RUN/tb/. Each step is one event holding all its scalars (one scalar per
    event costs 10x more); params are the HParams plugin's session start; events and the verdict
    are text. A re-run starts with TensorBoard's purge marker at step 0, so TensorBoard drops the
    earlier attempt's points and shows this attempt's in the same run."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, params: dict[str, Any], operational: dict[str, Any], resumed: bool) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from torch.utils.tensorboard.summary import text
        from torch.utils.tensorboard.writer import FileWriter

        self._summary, self._text = Summary, text
        _quiet_tensorboard_threads()
        self.logdir = run_dir / "tb"
        self.writer = FileWriter(str(self.logdir), flush_secs=30)
        if resumed:
            self.writer.add_event(Event(step=0, session_log=SessionLog(status=SessionLog.START)))
        self.writer.add_summary(hparams.hparams_pb(params, trial_id=run_dir.name), 0)
        self.writer.add_summary(text("config/operational", f"```\n{json.dumps(operational, indent=1)}\n```"), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One event holding every scalar of `metrics` at `step`."""
        S = self._summary
        self.writer.add_summary(S(value=[S.Value(tag=k, simple_value=v) for k, v in metrics.items()]), step)

    def event(self, rec: Event, step: int) -> None:
        """The event as text under event/NAME."""
        self.writer.add_summary(self._text(f"event/{rec['event']}", _event_text(rec)), step)

    def summary(self, summary: Summary, step: int) -> None:
        """The verdict, flags and warnings as text (summary/verdict), its numbers as HParams metrics."""
        lines = [f"**{summary['verdict']}**: {summary.get('evidence', '')}"]
        lines += [f"- flag {f['flag']}: {f['evidence']}" for f in summary.get("flags") or []]
        lines += [f"- warning: {w['message']}" for w in summary.get("warnings") or []]
        self.writer.add_summary(self._text("summary/verdict", "\n".join(lines)), step)
        self.log(summary_metrics(summary), step)  # final loss, first NaN step, ...: HParams' metric columns

    def close(self, state: str) -> None:
        """HParams' session end (success only for `completed`), then close the event file."""
        from tensorboard.plugins.hparams import api_pb2, metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        # HParams has no "interrupted": an interrupted run is a failure to finish
        status = api_pb2.STATUS_SUCCESS if state == "completed" else api_pb2.STATUS_FAILURE
        end = HParamsPluginData(
            session_end_info=SessionEndInfo(status=status, end_time_secs=time.time()),
            version=metadata.PLUGIN_DATA_VERSION,
        )
        S = self._summary
        self.writer.add_summary(
            S(value=[S.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))])
        )
        self.writer.close()

    def state(self) -> dict[str, Any]:
        """The event files' folder, relative to the run folder."""
        return {"logdir": "tb"}
