"""`stab doctor --try`: the fixes to train (`candidates`), what they did (`outcome`) and doctor.md.

res = outcome(dx, base, rows)   # which fixes made the run stable, the best, one sentence
"""

from __future__ import annotations

import math
from typing import Any

from stability.doctor.rules import Diagnosis
from stability.record import verdicts as vd

# --- stab doctor --try: the fixes to train, and what they did ---------------------------------


def candidates(dx: Diagnosis, n: int) -> list[dict[str, str]]:
    """The first `n` fixes alone, then the best two together (when they set different keys)."""
    alone = [x.overrides for x in dx.fixes[:n]]
    out = list(alone)
    if len(alone) >= 2 and not set(alone[0]) & set(alone[1]):
        out.append({**alone[0], **alone[1]})
    return out


def outcome(dx: Diagnosis, base: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which fixes made the run stable, each with its final validation loss and its cost against
    the best stable fix (a difference of validation losses)."""
    fixed = [
        r
        for r in rows
        if not vd.is_unstable(r["verdict"]) and r["verdict"] != "?" and math.isfinite(r["final_val_loss"])
    ]
    best = min(fixed, key=lambda r: r["final_val_loss"]) if fixed else None
    for r in rows:
        r["vs_best"] = (r["final_val_loss"] - best["final_val_loss"]) if best and r in fixed else None
    failed_val = float(dx.record.summary.get("final_val_loss", math.nan))
    if best:
        others = [f"{r['fix']} (val {r['final_val_loss']:.3g}, +{r['vs_best']:.3g})" for r in fixed if r is not best]
        sentence = (
            f"fixed by {len(fixed)} of {len(rows)}: best {best['fix']} (final val loss {best['final_val_loss']:.3g} "
            f"against {failed_val:.3g} in the failed run)" + (f"; also {', '.join(others)}" if others else "")
        )
    else:
        sentence = f"none of the {len(rows)} fixes made the run stable: " + ", ".join(
            f"{r['fix']} {r['verdict']}" for r in rows
        )
    return {
        "run": str(dx.record.path),
        "verdict": dx.verdict,
        "base_overrides": base,
        "failed_val_loss": failed_val,
        "tries": rows,
        "fixed": [r["fix"] for r in fixed],
        "best": best["fix"] if best else None,
        "sentence": sentence,
    }


def try_markdown(res: dict[str, Any]) -> str:
    """doctor.md: the fixes tried, their verdicts and validation losses, the sentence."""
    lines = [
        f"# stab doctor --try: {res['run']}",
        "",
        f"Failed run: verdict {res['verdict']}, final validation loss "
        f"{res['failed_val_loss']:.4g}; fixes trained from its exact config: `{' '.join(res['base_overrides']) or '(defaults)'}`.",
        "",
        "| fix | verdict | final val loss | vs best fix | folder |",
        "|---|---|---|---|---|",
    ]
    for r in res["tries"]:
        vs = f"+{r['vs_best']:.3g}" if r["vs_best"] is not None else "-"
        lines.append(f"| {r['fix']} | {r['verdict']} | {r['final_val_loss']:.4g} | {vs} | {r['folder']} |")
    return "\n".join(lines + ["", res["sentence"], ""])
