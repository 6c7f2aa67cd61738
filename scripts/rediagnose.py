"""Judge recorded runs again with the current detectors, without training: for comparing verdicts
before and after a change to the detectors on the very same trajectories.

    python scripts/rediagnose.py RUN_OR_SWEEP...

Each run folder's step records (metrics.jsonl), epoch records (epochs.jsonl) and first_nan event
are fed through today's `Summarizer` with the run's own config.yaml (detector keys it lacks take
today's defaults). A run recorded before the evaluation at initialisation existed has no
init_eval event: it is measured here (the workload built from the run's config and seed,
evaluated before any step: the same weights the run started from), once per distinct
configuration without the learning rate. Prints one line per run: folder, recorded verdict ->
today's verdict, last validation loss / validation loss at init, borderline flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from stability.config import RunConfig
from stability.record.summarizer import Summarizer
from stability.storage import read_jsonl
from stability.workloads import build

_init_cache: dict[str, dict] = {}


def init_eval(raw: dict) -> dict:
    """The init_eval event of a run with config `raw` (its learning rate does not change the init)."""
    key = json.dumps({k: v for k, v in raw.items() if k not in ("train", "log", "margin")}, sort_keys=True, default=str)
    if key not in _init_cache:
        cfg = RunConfig.from_dict(raw)
        work = build(cfg, torch.device("cpu")).work
        ev = work.evaluate()
        _init_cache[key] = {
            "event": "init_eval",
            "val_loss": ev["val_loss"],
            "scores": ev.get("scores") or {},
            "baseline_loss": work.info.get("baseline_loss"),
            "baseline": work.info.get("baseline"),
        }
    return _init_cache[key]


def rediagnose(run: Path) -> dict:
    raw = yaml.safe_load((run / "config.yaml").read_text())
    cfg = RunConfig.from_dict(raw)
    s = Summarizer(cfg.detect, cfg.train.clip)
    events = read_jsonl(run / "events.jsonl")[0]
    init = next((e for e in events if e.get("event") == "init_eval"), None) or init_eval(raw)
    s.event(init)
    for rec in read_jsonl(run / "metrics.jsonl")[0]:
        s.step(rec)
    for ev in events:
        if ev.get("event") == "first_nan":
            s.event(ev)
    for erec in read_jsonl(run / "epochs.jsonl")[0]:
        s.epoch(erec)
    fields, _ = s.finish()
    return fields


def main(paths: list[str]) -> None:
    for p in paths:
        for summary in sorted(Path(p).rglob("summary.json")):
            run = summary.parent
            old = json.loads(summary.read_text())
            new = rediagnose(run)
            border = "; ".join(b["what"] for b in new["borderline"])
            print(
                f"{run.name}\t{old.get('verdict')} -> {new['verdict']}\tval {new['final_val_loss']:.3g} / "
                f"{new['val_loss_init']:.3g}\t{border}\t{new['evidence'][:110]}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
