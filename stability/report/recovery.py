"""What a recovery cost: the report's recovery table, from the step records of runs with a spike.

A run with a planted spike (`fault.spike_at_step`) or a recovery policy (`train.on_spike`,
`train.update_clip`; `stability.recovery`) gets one row: the steps it skipped, how many steps and
seconds it took to get back to its pre-spike loss, and its final loss against the same run
without the spike, where the report holds one.

    rows = report_rows(runs)   # runs: the report's loaded runs (`report.loading.Run`)
"""

from __future__ import annotations

import math

RECOVER_WINDOW = 8  # steps of the running mean that "back to the pre-spike loss" compares
# keys that make two runs the same run but for the spike and the policy against it
_SPIKE_KEYS = (
    "fault.spike_at_step",
    "fault.spike_factor",
    "train.on_spike",
    "train.update_clip",
    "train.spike_window",
    "train.spike_sigma",
    "train.backoff_factor",
    "train.backoff_steps",
    "train.rewind_from",
)


def recovery_metrics(
    records: list[dict], spike_step: int | None = None, window: int = RECOVER_WINDOW
) -> dict[str, float | int | None] | None:
    """What one spike cost a run, from its step records (metrics.jsonl), or None when it has no
    spike: `spike_step` (given: the planted `fault.spike_at_step`; else the first step whose
    `recover/spike` is 1), `skipped` (steps from it on whose update was not applied:
    `recover/skipped` or non-finite), `pre_loss` (mean loss of the `window` finite steps before
    the spike), `recover_steps` (steps from the spike to the first step whose running mean loss
    over the next `window` steps is at or below `pre_loss`: the steps lost; None if never within
    the run), `recover_s` (the wall time of those steps, seconds, from `time/step_ms`),
    `final_loss` (mean loss of the last `window` finite steps)."""
    steps = [r for r in records if isinstance(r.get("step"), int)]
    if spike_step is None:
        spike_step = next((r["step"] for r in steps if r.get("recover/spike") == 1.0), None)
    if spike_step is None:
        return None
    at = next((i for i, r in enumerate(steps) if r["step"] >= spike_step), None)
    if at is None:
        return None
    loss = [float(r.get("loss", math.nan)) for r in steps]
    before = [x for x in loss[:at] if math.isfinite(x)][-window:]
    pre = sum(before) / len(before) if before else math.nan
    recover = None
    for i in range(at + 1, len(steps) - window + 1):
        seg = [x for x in loss[i : i + window] if math.isfinite(x)]
        if seg and sum(seg) / len(seg) <= pre:
            recover = i
            break
    tail = [x for x in loss if math.isfinite(x)][-window:]
    return {
        "spike_step": spike_step,
        "skipped": sum(bool(r.get("recover/skipped")) or r.get("finite") is False for r in steps[at:]),
        "pre_loss": pre,
        "recover_steps": steps[recover]["step"] - spike_step if recover is not None else None,
        "recover_s": (
            sum(float(r.get("time/step_ms", 0.0)) for r in steps[at:recover]) / 1000 if recover is not None else None
        ),
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
    }


def same_but_spike(a: dict, b: dict) -> bool:
    """Two flat configs (dotted keys) that differ at most in the spike, its policies and
    operational keys (`config.OPERATIONAL_KEYS`): b can be a's run without the spike."""
    from stability.config import OPERATIONAL_KEYS

    skip = set(_SPIKE_KEYS) | set(OPERATIONAL_KEYS)
    keys = {k for k in set(a) | set(b) if not any(k == s or k.startswith(s + ".") for s in skip)}
    return all(a.get(k) == b.get(k) for k in keys)


def report_rows(runs: list) -> list[dict]:
    """The report's recovery table: one row per run with a spike (planted by `fault.spike_at_step`
    or found by `train.on_spike`'s detector), `recovery_metrics` and the final-loss gap to the
    run without the spike (a run of the same report whose config differs only in the spike and
    its policies, with no spike planted and no policy; None where the report holds none).
    `runs`: the report's loaded runs (`report.loading.Run`: `.path`, `.rel`, `.flat`)."""
    from stability.record.folder import RunFolder

    def quiet(r: object) -> bool:
        f = r.flat  # type: ignore[attr-defined]
        return (
            f.get("fault.spike_at_step") is None
            and f.get("train.on_spike", "none") == "none"
            and f.get("train.update_clip") is None
        )

    cache: dict[str, list[dict]] = {}

    def steps(r: object) -> list[dict]:
        key = str(r.path)  # type: ignore[attr-defined]
        if key not in cache:
            cache[key] = RunFolder(r.path).steps()  # type: ignore[attr-defined]
        return cache[key]

    rows = []
    for r in runs:
        f = r.flat
        planted = f.get("fault.spike_at_step")
        if planted is None and f.get("train.on_spike", "none") == "none":
            continue
        m = recovery_metrics(steps(r), planted if isinstance(planted, int) else None)
        if m is None:
            continue
        ref = next((q for q in runs if q is not r and quiet(q) and same_but_spike(f, q.flat)), None)
        ref_m = recovery_metrics(steps(ref), m["spike_step"]) if ref is not None else None  # type: ignore[arg-type]
        gap = m["final_loss"] - ref_m["final_loss"] if ref_m is not None else None  # type: ignore[operator]
        rows.append(
            {
                "run": r.rel,
                "on_spike": f.get("train.on_spike", "none"),
                "update_clip": f.get("train.update_clip"),
                **m,
                "reference": ref.rel if ref is not None else None,
                "final_gap": gap,
            }
        )
    return rows
