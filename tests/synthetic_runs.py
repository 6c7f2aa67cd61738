"""Hand-made run folders for drawing tests at scale (100 runs would take an hour to train here):
the files and keys of `stability.record.format`, written with stab's own JSON writer, with numbers
from a seeded generator: a slowly falling loss, a noisy grad norm per module group, and where
asked a planted spike, a NaN from a given step, clipped steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

from stability.storage import dumps

GROUPS = ["embed", "layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp", "head"]


def make_run(
    root: Path,
    rel: str,
    params: dict[str, object],
    *,
    steps: int = 60,
    epochs: int = 3,
    seed: int = 0,
    spike: tuple[int, float] | None = None,
    nan_at: int | None = None,
    lead: str = "layer1.mlp",
    clip: float = 1.0,
    on_nan: str = "stop",
    verdict: str | None = None,
) -> Path:
    """A completed run folder at root/rel. `spike`: (step, factor) multiplies that step's grad
    norm; `nan_at`: `lead` grows 10x a step from 5 steps before, then every value is NaN from
    that step on (with on_nan=skip the run goes on, skipping them)."""
    rng = np.random.default_rng(seed)
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    per_epoch = math.ceil(steps / epochs)
    recs = []
    for i in range(steps):
        groups = {g: float(0.1 * (1 + 0.1 * rng.standard_normal())) for g in GROUPS}
        if nan_at is not None and nan_at - 5 <= i < nan_at:
            groups[lead] *= 10.0 ** (i - nan_at + 6)
        total = math.sqrt(sum(v * v for v in groups.values()))
        loss = 3.0 * math.exp(-i / steps) * (1 + 0.05 * rng.standard_normal())
        if spike and i == spike[0]:
            total *= spike[1]
        if nan_at is not None and on_nan == "stop" and i > nan_at:
            break  # train.on_nan=stop: the non-finite step is the last
        bad = i == nan_at
        rec = {
            "step": i,
            "epoch": i // per_epoch + 1,
            "batch": i % per_epoch,
            "loss": math.nan if bad else loss,
            "grad/norm": math.nan if bad else total,
            **{f"grad/{g}": math.nan if bad else v for g, v in groups.items()},
            "grad/clipped": (not bad) and total > clip,
            "lr": 1e-3,
            "finite": not bad,
            "time/step_ms": 1.0,
        }
        recs.append(rec)
    (d / "metrics.jsonl").write_text("".join(dumps(r) + "\n" for r in recs))
    n_ep = recs[-1]["epoch"]
    ep = []
    for e in range(1, n_ep + 1):
        mine = [r for r in recs if r["epoch"] == e]
        g = [r["grad/norm"] for r in mine]
        ep.append(
            {
                "epoch": e,
                "steps": len(mine),
                "loss": float(np.mean([r["loss"] for r in mine])),
                "grad_norm_mean": float(np.mean(g)),
                "grad_norm_max": float(np.max(g)),
                "clip_rate": 0.0,
                "val_loss": float(np.mean([r["loss"] for r in mine])),
            }
        )
    (d / "epochs.jsonl").write_text("".join(dumps(r) + "\n" for r in ep))
    first_nan = None
    if nan_at is not None:
        first_nan = {
            "epoch": nan_at // per_epoch + 1,
            "batch": nan_at % per_epoch,
            "step": nan_at,
            "kind": "loss",
            "module": lead,
            "where": "forward",
        }
        (d / "events.jsonl").write_text(dumps({"event": "first_nan", **first_nan}) + "\n")
    verdict = verdict or ("nan" if nan_at is not None else "stable")
    (d / "summary.json").write_text(
        dumps(
            {
                "schema_version": 2,
                "verdict": verdict,
                "evidence": f"synthetic {verdict}",
                "first_nan": first_nan,
                "grad_norm_by_epoch": [e["grad_norm_mean"] for e in ep],
                "grad_norm_max_by_epoch": [e["grad_norm_max"] for e in ep],
                "loss_by_epoch": [e["loss"] for e in ep],
                "val_loss_by_epoch": [e["val_loss"] for e in ep],
                "final_loss": recs[-1]["loss"],
                "final_val_loss": ep[-1]["val_loss"],
                "steps": len(recs),
                "wall_s": 1.0,
            }
        )
    )
    (d / "status.json").write_text(
        json.dumps({"schema_version": 2, "state": "completed", "verdict": verdict, "started": 1.0, "finished": 2.0})
    )
    overrides = [f"{k}={v}" for k, v in params.items()]
    (d / "overrides.json").write_text(json.dumps({"overrides": overrides, "run_id": rel}))
    config: dict = {
        "train": {"clip": clip, "on_nan": on_nan, "lr": params.get("train.lr", 1e-3)},
        "detect": {"spike_window": 20, "spike_z": 6.0, "spike_warmup": 10, "spike_ratio": 3.0},
    }
    from stability.report.factors import ALIAS_PATHS

    for k, v in params.items():
        node = config
        k = ALIAS_PATHS.get(k, k)
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = None if v == "none" else v
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d
