"""The doctor: what went wrong in a finished run, where first, and which fixes to try.

Reads only a run folder's files (config.yaml, summary.json, epochs.jsonl, metrics.jsonl,
events.jsonl), so it serves stab's own runs, sweep jobs and runs written by the monitor API alike.
Findings are computed from the records; each names its step or epoch and its numbers. The
candidate fixes come from one table, `RULES`: a finding, the override that answers it, a weight
that ranks it, and the paper or measured case it comes from.

    rec = read_run(Path("runs/run/20261129-111902_defaults"))
    dx = examine(rec)          # dx.findings, dx.fixes (ranked)
    stab doctor runs/run/20261129-111902_defaults --try

A package by job: `record` (reading the run folder), `findings` (what went wrong and where),
`rules` (the fixes each finding suggests, ranked: `examine`) and `tries` (`stab doctor --try`:
the fixes to train and what they did). Import from here: `from stability import doctor as dr`.
"""

from __future__ import annotations

from stability.doctor.findings import (
    BASELINE_STEPS,
    DEPART_FACTOR,
    LOSS_FACTOR,
    Finding,
    departure,
    find,
    group_departure,
    is_output_projection,
    loss_departure,
    running_departure,
)
from stability.doctor.record import DoctorError, RunRecord, read_run
from stability.doctor.rules import RULES, Diagnosis, Fix, Rule, examine, planned_steps
from stability.doctor.tries import candidates, outcome, try_markdown

__all__ = [
    "BASELINE_STEPS",
    "DEPART_FACTOR",
    "LOSS_FACTOR",
    "RULES",
    "Diagnosis",
    "DoctorError",
    "Finding",
    "Fix",
    "Rule",
    "RunRecord",
    "candidates",
    "departure",
    "examine",
    "find",
    "group_departure",
    "is_output_projection",
    "loss_departure",
    "outcome",
    "planned_steps",
    "read_run",
    "running_departure",
    "try_markdown",
]
