"""What stab's monitor costs in a loop it does not own: the side-by-side setup the monitor's,
Lightning's and the Trainer's benches share (`bench_setup`, `sync`), and the plain-loop bench
(`bench`: a bare loop against the same loop with `Monitor.step`, `stab bench --monitor`).

    res = bench(cfg, steps=60)   # {"bare_sps", "monitor_sps", "ratio", ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stability.config import RunConfig
from stability.monitor import Monitor


def bench_setup(cfg: RunConfig, arms: Sequence[str]) -> tuple[dict[str, Any], list[Any], torch.device, int]:
    """The configured workload for a side-by-side timing: one shallow copy per arm, each with its
    own deep copy of the model (same init), and 8 fixed batches of train.batch_size. Returns
    (workload copy per arm, batches, device, module groups)."""
    import copy

    from stability.devices import resolve_device
    from stability.workloads import build

    device = resolve_device(cfg.train.device)
    parts = build(cfg, device, compile=False)
    work = parts.work
    g = torch.Generator().manual_seed(cfg.seed)
    batches = [work.batch(torch.randperm(work.n_train, generator=g)[: cfg.train.batch_size]) for _ in range(8)]
    copies = {arm: copy.copy(work) for arm in arms}
    for w in copies.values():
        w.model = copy.deepcopy(work.model)
    return copies, batches, device, len(parts.groups)


def bench(cfg: RunConfig, steps: int = 60, block: int = 5) -> dict[str, Any]:
    """What the monitor costs in a plain loop: the same model (two copies, same init and batches),
    stepped by a bare loop (forward, loss, backward, clip, AdamW step) and by the same loop with
    `Monitor.step` in place of backward/clip/step, in alternating blocks of `block` steps in this
    process (a machine that slows down slows both alike). Returns steps/s of each and their ratio;
    the monitor's run folder goes to a temporary folder."""
    import tempfile

    from stability.bench import interleave
    from stability.workloads import make_optimizer

    tc = cfg.train
    copies, batches, device, n_groups = bench_setup(cfg, ("bare", "monitor"))
    opts = {arm: make_optimizer(w.model, tc)[0] for arm, w in copies.items()}
    with tempfile.TemporaryDirectory(prefix="stab-bench-monitor-") as tmp:
        monitor = Monitor(copies["monitor"].model, opts["monitor"], run_dir=Path(tmp) / "run", clip=tc.clip)

        def bare_step(i: int) -> None:
            w, opt = copies["bare"], opts["bare"]
            loss = w.loss(batches[i % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip is not None:
                torch.nn.utils.clip_grad_norm_(w.model.parameters(), tc.clip)
            opt.step()

        def monitor_step(i: int) -> None:
            monitor.step(copies["monitor"].loss(batches[i % len(batches)]))

        arms = {"bare": bare_step, "monitor": monitor_step}
        spent, done = interleave(arms, steps, block, device)
        monitor.close()
    bare_sps, mon_sps = done / spent["bare"], done / spent["monitor"]
    return {
        "bare_sps": bare_sps,
        "monitor_sps": mon_sps,
        "ratio": mon_sps / bare_sps,
        "steps": done,
        "groups": n_groups,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a host clock reads finished steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
