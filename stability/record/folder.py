"""`RunFolder`: the one reader of a run folder, for every command that reads one.

The report, `stab show`, the doctor, the margin's probes, the sweep's live view and its resume
decisions, `stab replay` and `stab export` all read a run's files through it, so each file is
found, parsed and forgiven in one place: a missing file reads as absent, a torn or damaged one as
absent with a warning (`RunFolder.warnings`), a torn last line of a `.jsonl` file is skipped and
counted. Folders written before `schema_version` existed (a wide grad table: tests/fixtures/runs_v0)
read the same. Nothing is cached: a folder being written reads as it is now.

    folder = RunFolder(Path("runs/run/20261129-111902_defaults"))
    folder.summary().verdict, folder.status().state, len(folder.epochs())
    folder.incomplete()          # why a completed run's record cannot be trusted, or None
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stability.record import format as rf
from stability.record.records import EpochRecord, Event, Status, Summary
from stability.storage import loads

if TYPE_CHECKING:
    import pandas as pd


class RunFolder:
    """One run folder's files, read on demand (see the module docstring). `warnings` collects what
    was missing or damaged, one line each, in the order it was read."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of one of the folder's files (a name of `format`)."""
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether the folder holds the file `name`."""
        return (self.path / name).exists()

    def is_run(self) -> bool:
        """A folder holding any of `format.RUN_MARKERS`."""
        return self.path.is_dir() and any(self.has(m) for m in rf.RUN_MARKERS)

    # --- single files ---------------------------------------------------------------------------
    def json(self, name: str) -> Any:
        """A JSON file parsed (non-finite floats as floats), or None: missing (silently), unreadable
        or truncated (with a warning)."""
        path = self.file(name)
        if not path.exists():
            return None
        try:
            return loads(path.read_text())
        except (OSError, ValueError) as e:
            self.warnings.append(f"{name} unreadable (truncated?): {first_line(e)}")
            return None

    def status(self) -> Status:
        """status.json; an empty Status (state `unknown`) where it is missing or unreadable."""
        return Status.of(self.json(rf.STATUS))

    def summary(self) -> Summary:
        """summary.json; an empty Summary (verdict `?`) where it is missing or unreadable."""
        return Summary.of(self.json(rf.SUMMARY))

    def overrides(self) -> list[str] | None:
        """The overrides the run was started with (overrides.json), None where unknown."""
        ov = self.json(rf.OVERRIDES)
        if isinstance(ov, dict) and isinstance(ov.get("overrides"), list):
            return [str(o) for o in ov["overrides"]]
        return None

    def data(self) -> dict[str, Any]:
        """data.json (the workload's data description), {} where missing or unreadable."""
        data = self.json(rf.DATA)
        return data if isinstance(data, dict) else {}

    def config(self) -> dict[str, Any] | None:
        """The resolved config.yaml as a mapping; None (with a warning) where it is missing,
        unreadable or not a mapping."""
        import yaml

        path = self.file(rf.CONFIG)
        if not path.exists():
            self.warnings.append(f"no {rf.CONFIG}")
            return None
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            self.warnings.append(f"{rf.CONFIG} unreadable: {first_line(e)}")
            return None
        if not isinstance(cfg, dict):
            self.warnings.append(f"{rf.CONFIG} is not a mapping")
            return None
        return cfg

    def epochs_planned(self) -> int | None:
        """`train.epochs` of the run's config, None where the config does not say."""
        probe = RunFolder(self.path)  # a question, not a read of the record: no warnings
        epochs = ((probe.config() or {}).get("train") or {}).get("epochs")
        return epochs if isinstance(epochs, int) else None

    # --- streams --------------------------------------------------------------------------------
    def lines(self, name: str) -> list[dict[str, Any]]:
        """The records of a JSON Lines file; lines that do not parse (a torn tail while the run
        writes, hand damage) are skipped with a warning. A missing or unreadable file is []."""
        path = self.file(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            self.warnings.append(f"{name} unreadable: {first_line(e)}")
            return []
        records, bad = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
        if bad:
            self.warnings.append(f"{name}: {bad} unparsable line(s) skipped")
        return records

    def epochs(self) -> list[EpochRecord]:
        """epochs.jsonl, one record per finished epoch."""
        return [EpochRecord(r) for r in self.lines(rf.EPOCHS)]

    def events(self) -> list[Event]:
        """events.jsonl, in the order they were written."""
        return [Event(r) for r in self.lines(rf.EVENTS)]

    def steps(self) -> list[dict[str, Any]]:
        """metrics.jsonl: the step records (`steplayout.StepRecord`'s keys)."""
        return self.lines(rf.METRICS)

    def first_step(self) -> dict[str, Any] | None:
        """The first step record, read without reading the rest (None: no readable first line)."""
        try:
            with open(self.file(rf.METRICS), encoding="utf-8") as f:
                first = f.readline()
            rec = loads(first) if first.strip() else None
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def grad_table(self) -> pd.DataFrame | None:
        """grad_norms.csv as the long table, whichever layout the folder has (`format.read_grad_table`);
        None where missing, or unreadable (with a warning)."""
        import pandas as pd

        path = self.file(rf.GRAD_TABLE)
        if not path.exists():
            return None
        try:
            return rf.read_grad_table(path)
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            self.warnings.append(f"{rf.GRAD_TABLE} unreadable: {first_line(e)}")
            return None

    def forensics(self) -> Path | None:
        """The state saved at the first non-finite step (what `stab replay` needs), None if there is none."""
        path = self.file(rf.FORENSICS_STATE)
        return path if path.exists() else None

    # --- what the files say together -----------------------------------------------------------
    def state(self, status: Status | None = None) -> str:
        """status.json's state, `interrupted` where it says running but its writer is provably
        gone (`rundirs.writer_gone`), `unknown` without a readable status."""
        from stability.rundirs import writer_gone

        status = self.status() if status is None else status
        if status.state == "running" and writer_gone(self.path, dict(status)):
            return "interrupted"
        return status.state

    def incomplete(self) -> str | None:
        """Why a `completed` run's record cannot be trusted (None if it can): its status,
        summary, metrics or epochs are missing, unreadable or disagree. A sweep runs such a job
        again instead of skipping it."""
        if self.has(rf.STATUS):
            try:
                loads(self.file(rf.STATUS).read_text())
            except (OSError, ValueError) as e:
                return f"{rf.STATUS} unreadable: {e}"
        try:
            summary = loads(self.file(rf.SUMMARY).read_text())
        except FileNotFoundError:
            return f"{rf.SUMMARY} is missing"
        except (ValueError, OSError) as e:
            return f"{rf.SUMMARY} unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if not isinstance(summary, dict) or not summary.get("verdict"):
            return f"{rf.SUMMARY} holds no verdict"
        counts = {}
        for name in (rf.METRICS, rf.EPOCHS):
            if not self.has(name):
                return f"{name} is missing"
            check = RunFolder(self.path)
            records = check.lines(name)
            if check.warnings:
                return check.warnings[0]
            if not records:
                return f"{name} is empty"
            counts[name] = len(records)
        if isinstance(summary.get("steps"), int) and summary["steps"] != counts[rf.METRICS]:
            return f"{rf.METRICS} holds {counts[rf.METRICS]} steps, {rf.SUMMARY} says {summary['steps']}"
        return None


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root`, at any depth, sorted; hidden folders (`.hydra`) are skipped
    and a run folder is not searched for runs inside it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(Path(root)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(m in filenames for m in rf.RUN_MARKERS):
            found.append(Path(dirpath))
            dirnames[:] = []
    return found


def sweep_overrides(root: Path) -> dict[Path, list[str]]:
    """Job folder (resolved) -> overrides, from every sweep index (sweep.json) under `root`: where a
    job's own overrides.json was lost."""
    out: dict[Path, list[str]] = {}
    for index in Path(root).rglob(rf.SWEEP_INDEX):
        try:
            for job in json.loads(index.read_text()).get("jobs", []):
                out[(index.parent / job["folder"]).resolve()] = [str(o) for o in job["overrides"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line warnings."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
