"""The bad steps of a run, in the formats other trainers already read.

A bad step is one stab flagged: non-finite (`finite` false in metrics.jsonl), skipped by
`train.on_spike=skip` (`recover/skipped`), or a gradient or loss spike (events.jsonl). Each
format was checked in its project's own source (the commits are in docs/run-format.md):

- `lightning`: `skip_batches.json`, what Lightning's `SpikeDetection` callback writes
  (lightning/fabric/utilities/spike.py, `_handle_spike`): a JSON list of batch indices within
  the epoch (`batch_idx` of `on_train_batch_end`), for each spike the batch before it and the
  spike's own ("it is unclear whether the previous batch altered the weights"), indent 4.
  Lightning does not read it back itself; its users filter their dataloader with it.
- `olmo-core`: the trainer's `steps_to_skip: list[StepSkipRange]` (olmo_core/train/trainer.py;
  `StepSkipRange(start, stop)` in olmo_core/train/common.py: steps start at 1, stop exclusive).
  Written as {"steps_to_skip": [{"start": ..., "stop": ...}]}; consecutive steps merge into one
  range.
- `megatron`: `--iterations-to-skip` (megatron/training/arguments.py; `iterations_to_skip:
  list[int]`, "1-indexed iterations to skip", megatron/training/config/training_config.py;
  training.py skips when `(iteration + 1) in args.iterations_to_skip`). Written as the command-line
  flag in a text file.

stab's steps are 0-based global steps (`step` in metrics.jsonl), so OLMo-core's and Megatron's
numbers are stab's + 1; Lightning's are the batch indices within the epoch (`batch`).

    steps = bad_steps(run_dir)                       # [BadStep(step, epoch, batch, why), ...]
    name, text = FORMATS["olmo-core"].render(steps)  # ("olmo_core_steps_to_skip.json", "...")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stability.record import format as rf
from stability.record.folder import RunFolder

SKIPPED = "recover/skipped"  # the step record's key: the update was skipped on a spike (train.on_spike=skip)


@dataclass(frozen=True)
class BadStep:
    """One flagged step: global `step` (0-based), `epoch` (1-based), `batch` (0-based, within
    the epoch), and why (non-finite, skipped, grad_spike, loss_spike; several joined by +)."""

    step: int
    epoch: int
    batch: int
    why: str


def bad_steps(run_dir: Path) -> list[BadStep]:
    """Every flagged step of a run folder, by step. Raises ValueError when the folder holds no
    step records (metrics.jsonl missing or empty)."""
    folder = RunFolder(run_dir)
    steps = folder.steps()
    if not steps:
        raise ValueError(f"{run_dir} holds no step records (metrics.jsonl missing or empty): expected a run folder")
    where = {int(r[rf.STEP]): (int(r.get(rf.EPOCH, 0)), int(r.get(rf.BATCH, 0))) for r in steps if rf.STEP in r}
    why: dict[int, list[str]] = {}
    for r in steps:
        s = r.get(rf.STEP)
        if s is None:
            continue
        if r.get(rf.FINITE) is False or not _finite(r.get(rf.LOSS)):
            why.setdefault(int(s), []).append("non-finite")
        if r.get(SKIPPED):
            why.setdefault(int(s), []).append("skipped")
    events = folder.events()
    for e in events:
        if e.get("event") in ("grad_spike", "loss_spike") and e.get("step") is not None:
            why.setdefault(int(e["step"]), []).append(str(e["event"]))
    return [BadStep(s, *where.get(s, (0, 0)), "+".join(dict.fromkeys(w))) for s, w in sorted(why.items())]


def _finite(x: object) -> bool:
    try:
        return math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def ranges(steps: list[int]) -> list[tuple[int, int]]:
    """Sorted steps as [start, stop) ranges of consecutive steps: [3, 4, 5, 9] -> [(3, 6), (9, 10)]."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(steps)):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def lightning(steps: list[BadStep]) -> str:
    """skip_batches.json as Lightning's SpikeDetection writes it: the previous and the bad batch
    index within the epoch, for each bad step (sorted, once each)."""
    batches = sorted({b for s in steps for b in (s.batch - 1, s.batch) if b >= 0})
    return json.dumps(batches, indent=4) + "\n"


def olmo_core(steps: list[BadStep]) -> str:
    """{"steps_to_skip": [{"start", "stop"}]}: OLMo-core's StepSkipRange, 1-based, stop exclusive."""
    rs = [{"start": a + 1, "stop": b + 1} for a, b in ranges([s.step for s in steps])]
    return json.dumps({"steps_to_skip": rs}, indent=2) + "\n"


def megatron(steps: list[BadStep]) -> str:
    """The `--iterations-to-skip` flag with Megatron's 1-indexed iterations."""
    its = sorted({s.step + 1 for s in steps})
    return ("--iterations-to-skip " + " ".join(map(str, its)) + "\n") if its else "\n"


@dataclass(frozen=True)
class Format:
    """One export target: the file it writes and how it renders the bad steps."""

    name: str
    filename: str
    render_steps: Callable[[list[BadStep]], str]
    help: str

    def render(self, steps: list[BadStep]) -> tuple[str, str]:
        """(file name, its text) for `steps`."""
        return self.filename, self.render_steps(steps)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "lightning",
            "skip_batches.json",
            lightning,
            "Lightning SpikeDetection's skip_batches.json: batch indices within the epoch (the bad one and the one before)",
        ),
        Format(
            "olmo-core",
            "olmo_core_steps_to_skip.json",
            olmo_core,
            "OLMo-core trainer steps_to_skip: StepSkipRange start/stop, 1-based, stop exclusive",
        ),
        Format(
            "megatron",
            "megatron_iterations_to_skip.txt",
            megatron,
            "Megatron-LM --iterations-to-skip: 1-indexed iterations",
        ),
    )
}
