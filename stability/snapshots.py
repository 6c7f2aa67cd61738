"""A small ring of training snapshots in the run folder, and what rewinding needs from them.

Every `train.snapshot_every` steps (at a host transfer: the device holds no pending step) the
loop saves what continuing from that point needs: the model, the optimizer and the schedule,
the random generators (torch's CPU and CUDA ones), the data order (the epoch's batch-order
generator state as it was before drawing this epoch's permutation, and the position in the
epoch), and the recovery policies' device state. At most `train.snapshot_keep` files are kept:
when one more arrives, the ring drops the snapshot whose removal leaves the smallest gap between
its neighbours (never the first or the newest), so the kept ones stay spread over the whole run
and there is one not long before any step, including the run's first departure.

    ring = SnapshotRing(run_dir / "snapshots", every=50, keep=8)
    if ring.due(step): ring.save(step, state)           # state: `capture(...)`
    snap = load(path); restore(snap, model, opt, sched) # `stab doctor --try` trains from there

Files: RUN/snapshots/step{N:08d}.pt (torch.save of a dict, written atomically) and
RUN/snapshots/index.json ({"every", "keep", "steps": [...], "bytes": {...}, "save_ms": {...}}).
"""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from stability.storage import atomic_write_bytes, read_json, write_json

FOLDER = "snapshots"
INDEX = "index.json"


def snapshot_name(step: int) -> str:
    """The file name of the snapshot taken before step `step`: "step00000042.pt"."""
    return f"step{step:08d}.pt"


class SnapshotRing:
    """The run's snapshot folder: `due(step)`, `save(step, state)`, `steps` (kept, ascending).
    `every` 0 turns it off."""

    def __init__(self, folder: Path, every: int, keep: int, write: bool = True) -> None:
        self.folder, self.every, self.keep, self.write = Path(folder), every, keep, write
        self.steps: list[int] = []
        self.bytes: dict[int, int] = {}
        self.save_ms: dict[int, float] = {}
        self._last: int | None = None

    def due(self, step: int) -> bool:
        """A snapshot is due before global step `step`: `every` steps since the last one (the
        first at step 0)."""
        return bool(self.every) and (self._last is None or step - self._last >= self.every)

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Write the snapshot taken before `step`, then thin the ring to `keep` files."""
        self._last = step
        if not self.write:
            return None
        t0 = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({**state, "step": step}, buf)
        path = self.folder / snapshot_name(step)
        atomic_write_bytes(path, buf.getvalue())
        self.steps.append(step)
        self.bytes[step] = buf.tell()
        self.save_ms[step] = 1000 * (time.perf_counter() - t0)
        while len(self.steps) > self.keep:
            self._drop(_thin(self.steps))
        write_json(
            self.folder / INDEX,
            {
                "every": self.every,
                "keep": self.keep,
                "steps": self.steps,
                "bytes": {str(s): self.bytes[s] for s in self.steps},
                "save_ms": {str(s): round(self.save_ms[s], 3) for s in self.steps},
            },
        )
        return path

    def _drop(self, step: int) -> None:
        self.steps.remove(step)
        self.bytes.pop(step, None)
        self.save_ms.pop(step, None)
        (self.folder / snapshot_name(step)).unlink(missing_ok=True)


def _thin(steps: list[int]) -> int:
    """The step to drop from a sorted list: not the first or the last; the one whose neighbours
    are closest together (the earliest on a tie)."""
    if len(steps) < 3:
        return steps[0]
    gaps = [(steps[i + 1] - steps[i - 1], steps[i]) for i in range(1, len(steps) - 1)]
    return min(gaps)[1]


def kept(run_dir: Path) -> list[int]:
    """Steps of the snapshots a run folder holds (ascending); [] if none."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(int(p.stem[4:]) for p in folder.glob("step*.pt") if p.stem[4:].isdigit())


def before(run_dir: Path, step: int) -> Path | None:
    """The snapshot taken last before global step `step` (strictly earlier; a snapshot taken
    before step `s` holds the state after step s - 1), or None."""
    steps = [s for s in kept(run_dir) if s < step]
    return Path(run_dir) / FOLDER / snapshot_name(steps[-1]) if steps else None


def capture(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    order_state: torch.Tensor,
    epoch: int,
    batch: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The state to save before the step at (`epoch`, `batch`): copies on the CPU, so later
    steps cannot change it. `order_state`: the batch-order generator's state before it drew
    this epoch's permutation."""

    def cpu(x: Any) -> Any:
        if torch.is_tensor(x):
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: cpu(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cpu(v) for v in x)
        return x

    state = {
        "model": cpu(model.state_dict()),
        "optimizer": cpu(opt.state_dict()),
        "scheduler": cpu(sched.state_dict()),
        "rng_cpu": torch.get_rng_state(),
        "order_state": order_state.clone(),
        "epoch": epoch,
        "batch": batch,
        "extra": cpu(extra or {}),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def load(path: Path) -> dict[str, Any]:
    """A snapshot file. Raises OSError, or ValueError naming the file when it is not one."""
    try:
        snap = torch.load(Path(path), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a stab snapshot ({e})") from None
    if not isinstance(snap, dict) or "model" not in snap or "step" not in snap:
        raise ValueError(f"{path} is not a stab snapshot (no model or step)")
    return snap


def restore(snap: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    """Put the model, optimizer, schedule and random generators back as they were when `snap`
    was taken. Raises ValueError when the snapshot's weights do not fit `model` (a fix that
    changes the architecture cannot start from it)."""
    try:
        model.load_state_dict(snap["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"the snapshot's weights do not fit this model ({first}): a change of architecture trains from step 0"
        ) from None
    opt.load_state_dict(snap["optimizer"])
    sched.load_state_dict(snap["scheduler"])
    torch.set_rng_state(snap["rng_cpu"])
    if "rng_cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["rng_cuda"])


def index(run_dir: Path) -> dict[str, Any]:
    """RUN/snapshots/index.json, or {} when the run kept none."""
    try:
        return read_json(Path(run_dir) / FOLDER / INDEX)
    except (OSError, ValueError):
        return {}
