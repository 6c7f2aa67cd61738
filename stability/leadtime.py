"""How far each step signal leads the event it warns of, against its false alarms on stable runs.

Issue 27 item 2: a signal earns its place when it fires before a loss spike, an explosion or a
NaN, and stays quiet on runs that are fine. This module reads finished run folders (any run
with `detect.opt_state=true`) and measures, per signal:

- the *alarm*: the first step where the signal spikes by the run's own spike rule
  (`detectors.series.detect_spikes` with `detect.spike_window`, `spike_z`, `spike_warmup`,
  `spike_ratio`: above the running median of the previous window by `spike_z` robust standard
  deviations and at least `spike_ratio` x that median), the rule `spike_lead_steps` applies to
  the total grad norm, over the steps after the learning-rate warmup (`train.warmup`): the
  baseline forms from them and the first alarm can come `spike_warmup` steps after the warmup
  ends (every signal grows from its initial value during warmup, 10-200x for a group's grad
  norm: `doctor.BASELINE_STEPS`), so an event before that is a miss for every signal. Adam's
  moment norms are bias-corrected first (`_series`). A per-group signal (`update_rel/<group>`, ...) alarms at the first alarm
  of any of its groups; `alarm_group` says which.
- the *event*: the run's first non-finite step, else its first loss spike (the run's own
  `loss_spike` event: the same spike rule over the loss), else, for a run whose verdict is
  `exploding`, the step of its largest grad norm (`detectors.series.spike_lead`'s event). A run with
  none of these is *quiet*, whatever its verdict (a collapsed output is no spike).
- on a run with an event, the *lead*: event step - alarm step when the alarm is at or before the
  event, else a miss; on a run without one, a *false alarm* when the signal alarmed at all.

    table = lead_table([read_run(p) for p in folders])   # {signal: SignalLead}
    print(markdown(table))

`scripts/signal_lead.py` trains the runs (char LM smoke at a high learning rate, the cascade's
smoke preset post-norm, stable references; several seeds) and prints the README's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stability.detectors.series import detect_spikes
from stability.doctor import RunRecord
from stability.record import verdicts as vd

# (signal, record key or per-group prefix ending in "/", what it is); in the README table's order
SIGNALS: tuple[tuple[str, str, str], ...] = (
    ("grad/norm", "grad/norm", "total gradient norm (the reference: spike_lead_steps)"),
    ("update_rel", "update_rel/", "relative update, any module group"),
    ("adam_m", "adam_m/", "Adam first-moment norm, any module group"),
    ("adam_v", "adam_v/", "Adam second-moment norm, any module group"),
    ("eps_share", "eps_share/", "epsilon-regime share, any module group"),
    ("lm/log_z", "lm/log_z", "mean output log Z (char LM)"),
    ("lm/log_z_max", "lm/log_z_max", "largest output log Z (char LM)"),
    ("lm/attn_logit_max", "lm/attn_logit_max", "largest attention logit (char LM)"),
)


@dataclass
class RunLead:
    """One run: its event step (None: no event), and per signal its alarm step and group
    (None: it never alarmed; absent: the run does not record it)."""

    path: str
    event: int | None
    event_kind: str
    steps: int
    alarms: dict[str, int | None] = field(default_factory=dict)
    alarm_group: dict[str, str | None] = field(default_factory=dict)


@dataclass
class SignalLead:
    """One signal over many runs: `leads` (steps, one per run with an event whose alarm came at
    or before it), `missed` (runs with an event and no alarm before it), `false_alarms` of
    `quiet_runs` (runs without an event where it alarmed), `quiet_steps` (their steps)."""

    signal: str
    leads: list[int] = field(default_factory=list)
    missed: int = 0
    false_alarms: int = 0
    quiet_runs: int = 0
    quiet_steps: int = 0

    @property
    def median(self) -> float:
        """The median of `leads`, in steps; NaN where there is none."""
        return float(np.median(self.leads)) if self.leads else math.nan

    @property
    def interval(self) -> tuple[int, int] | None:
        """(smallest, largest) lead over the runs: with a handful of runs, the range, not a CI."""
        return (min(self.leads), max(self.leads)) if self.leads else None

    @property
    def false_alarm_rate(self) -> float:
        """Share of the quiet runs on which the signal alarmed (NaN without quiet runs)."""
        return self.false_alarms / self.quiet_runs if self.quiet_runs else math.nan


def _detect(rec: RunRecord) -> tuple[int, float, int, float]:
    d = rec.config.get("detect", {}) if isinstance(rec.config, dict) else {}
    return (
        int(d.get("spike_window", 20)),
        float(d.get("spike_z", 6.0)),
        int(d.get("spike_warmup", 10)),
        float(d.get("spike_ratio", 3.0)),
    )


def first_alarm(values: Sequence[float] | np.ndarray, rule: tuple[int, float, int, float]) -> int | None:
    """Index of the first spike of a series by the spike rule (window, z, warmup, ratio); None if none."""
    hits = detect_spikes(values, *rule)
    return hits[0] if hits else None


def event(rec: RunRecord) -> tuple[int | None, str]:
    """(index of the event in the run's step records, its kind: "nan" | "loss_spike" |
    "explosion"), or (None, "none"): the first non-finite step, else the run's first loss spike
    (its own detector's `loss_spike` event, the same spike rule over the loss), else, for a run
    whose verdict is `exploding`, the step of its largest finite grad norm (`detectors.series.spike_lead`'s
    event)."""
    loss = rec.series("loss")
    total = rec.series("grad/norm")
    step_no = rec.series("step")
    finite = np.isfinite(loss) & np.isfinite(total)
    if not finite.all():
        return int(np.flatnonzero(~finite)[0]), "nan"
    spikes = [e.step for e in rec.events if e.event == "loss_spike" and e.step is not None]
    if spikes:
        at = np.flatnonzero(step_no == min(spikes))
        if len(at):
            return int(at[0]), "loss_spike"
    if rec.summary.get("verdict") == vd.EXPLODING:
        return int(np.nanargmax(total)), "explosion"
    return None, "none"


def _series(rec: RunRecord, key: str) -> np.ndarray:
    """A signal's series as the alarm reads it: Adam's moment norms bias-corrected (divided by
    1 - beta^t, t = step + 1, as Adam itself corrects them), so that their growth from zero over
    the first ~1 / (1 - beta) steps is not an alarm; every other key as recorded."""
    x = rec.series(key)
    beta = {"adam_m/": 0, "adam_v/": 1}
    for prefix, i in beta.items():
        if key.startswith(prefix):
            betas = rec.get("train.betas", [0.9, 0.95])
            t = rec.series("step") + 1
            return x / (1 - float(betas[i]) ** np.where(np.isfinite(t), t, 1))
    return x


def run_lead(rec: RunRecord) -> RunLead:
    """The event and each recorded signal's first alarm of one run."""
    ev, kind = event(rec)
    out = RunLead(str(rec.path), ev, kind, len(rec.steps))
    rule = _detect(rec)
    start = int(float(rec.get("train.warmup", 0) or 0))  # the baseline forms after the lr warmup
    keys = list(rec.steps[0]) if rec.steps else []
    for name, key, _ in SIGNALS:
        if key.endswith("/"):
            cols = [k for k in keys if k.startswith(key)]
        else:
            cols = [key] if key in keys else []
        if not cols:
            continue
        hits = [(start + a, c) for c in cols if (a := first_alarm(_series(rec, c)[start:], rule)) is not None]
        first = min(hits) if hits else None
        out.alarms[name] = first[0] if first else None
        out.alarm_group[name] = first[1][len(key) :] if first and key.endswith("/") else None
    return out


def lead_table(runs: Sequence[RunLead]) -> dict[str, SignalLead]:
    """{signal: SignalLead} over runs (`run_lead`), for the signals any of them records."""
    table: dict[str, SignalLead] = {}
    for r in runs:
        for name, alarm in r.alarms.items():
            s = table.setdefault(name, SignalLead(name))
            if r.event is None:
                s.quiet_runs += 1
                s.quiet_steps += r.steps
                s.false_alarms += alarm is not None
            elif alarm is not None and alarm <= r.event:
                s.leads.append(r.event - alarm)
            else:
                s.missed += 1
    order = [n for n, _, _ in SIGNALS]
    return {n: table[n] for n in order if n in table}


def markdown(table: dict[str, SignalLead]) -> str:
    """The README table: per signal, lead median [range] over the runs with an event, how many
    it caught, and its false alarms on the runs without one."""
    lines = [
        "| signal | lead, steps: median [min–max] | caught before the event | false alarms on quiet runs |",
        "|---|---|---|---|",
    ]
    for name, s in table.items():
        iv = s.interval
        lead = f"{s.median:g} [{iv[0]}–{iv[1]}]" if iv else "–"
        n_event = len(s.leads) + s.missed
        fa = f"{s.false_alarms}/{s.quiet_runs}" if s.quiet_runs else "– (no quiet run)"
        lines.append(f"| `{name}` | {lead} | {len(s.leads)}/{n_event} | {fa} |")
    return "\n".join(lines)


def describe(runs: Sequence[RunLead]) -> list[dict[str, Any]]:
    """One row per run: its event and each signal's alarm (for the script's per-run listing)."""
    return [
        {"run": r.path, "event": r.event, "kind": r.event_kind, "steps": r.steps, **r.alarms, "groups": r.alarm_group}
        for r in runs
    ]
