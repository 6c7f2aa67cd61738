"""Lead time of each step signal before the loss spike, explosion or NaN, against its false
alarms on stable runs (issue 27 item 2; `stability.leadtime` says what is measured).

    python scripts/signal_lead.py                    # 3 seeds of each configuration below, into runs/signal-lead/
    python scripts/signal_lead.py --seeds 5 --runs /tmp/lead
    python scripts/signal_lead.py --only-table       # re-read the run folders, train nothing

Each configuration trains its seeds in this process, one after the other, with
`detect.opt_state=true` (the signals), `detect.health=false` (not needed here) and one thread;
a run folder that already holds a finished run (summary.json) is read, not trained again. Prints
the per-run events and alarms, then the README's table (markdown), and writes both to
RUNS/signal_lead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, overrides, expected: "event" = meant to spike/explode/NaN, "quiet" = a stable reference)
CONFIGS: list[tuple[str, list[str], str]] = [
    ("charlm-smoke-lr3e-2", ["model=charlm", "preset=smoke", "train.lr=3e-2"], "event"),
    ("charlm-smoke-lr1e-2", ["model=charlm", "preset=smoke"], "quiet"),
    # the smoke preset's 4 epochs are 16 steps: 25 epochs give 100, room for a baseline before an event
    ("cascade-smoke-post", ["preset=smoke", "norm=post", "residual=0.1", "train.lr=3e-2", "train.epochs=25"], "event"),
    ("cascade-smoke-pre", ["preset=smoke", "norm=pre", "train.lr=3e-2", "train.epochs=25"], "quiet"),
]
COMMON = ["detect.opt_state=true", "detect.health=false", "train.threads=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "signal-lead", help="where the run folders go")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0..N-1)")
    ap.add_argument("--only-table", action="store_true", help="read the run folders already there; train nothing")
    ap.add_argument("--story", action="store_true", help="also the story's default-preset post-norm/pre-norm runs")
    args = ap.parse_args()
    if args.seeds < 1:
        sys.exit(f"--seeds {args.seeds} is not allowed: expected at least 1")

    from cli.config import compose_run
    from stability import leadtime
    from stability.doctor import read_run
    from stability.training import run

    configs = list(CONFIGS)
    if args.story:
        configs += [
            ("story-post", ["norm=post", "residual=0.1"], "event"),
            ("story-pre", ["norm=pre", "residual=0.1"], "quiet"),
        ]
    leads = []
    for label, overrides, expected in configs:
        for seed in range(args.seeds):
            folder = args.runs / f"{label}-seed{seed}"
            if not (folder / "summary.json").exists():
                if args.only_table:
                    continue
                print(f"training {folder.name} ...", flush=True)
                run(compose_run([*overrides, *COMMON, f"seed={seed}"]), folder)
            r = leadtime.run_lead(read_run(folder))
            leads.append(r)
            alarms = ", ".join(
                f"{k} {v}" + (f" ({r.alarm_group[k]})" if r.alarm_group.get(k) else "")
                for k, v in r.alarms.items()
                if v is not None
            )
            print(
                f"{folder.name}: expected {expected}; event {r.event_kind} at step {r.event}; "
                f"alarms: {alarms or 'none'}"
            )
    table = leadtime.lead_table(leads)
    md = leadtime.markdown(table)
    print()
    print(md)
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "signal_lead.json").write_text(
        json.dumps(
            {
                "configs": [{"label": c[0], "overrides": c[1], "expected": c[2]} for c in configs],
                "seeds": args.seeds,
                "runs": leadtime.describe(leads),
                "table": md,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
