"""Instrumentation without per-parameter or per-module host syncs, and the bench itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from stability.bench import matmul_flops
from stability.config import RunConfig
from stability.instrument import GradProbe, StageProbe
from stability.step import Instruments, StepContext, Stepper, Window
from stability.workloads import make_optimizer, make_workload

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def tiny_workload():
    cfg = RunConfig.from_dict(
        {
            "model": {"d_model": 32, "n_heads": 2, "n_layers": 2},
            "data": {"n_train": 8, "n_val": 4, "seconds": 1.0},
            "train": {"batch_size": 4},
        }
    )
    torch.manual_seed(0)
    return cfg, make_workload(cfg, torch.device("cpu"))


def test_one_instrumented_step_moves_data_to_the_host_exactly_once(monkeypatch):
    cfg, work = tiny_workload()
    groups = work.module_groups()
    opt = torch.optim.AdamW(work.model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stepper = Stepper(
        work,
        opt,
        sched,
        Instruments(
            list(groups),
            GradProbe(groups),
            [StageProbe(work.rms_matchers(), torch.device("cpu"))],
            1.0,
            len(work.rms_matchers()),
        ),
    )
    batch = work.batch(torch.arange(4))
    stepper(batch)  # warm-up outside the count
    counts = dict.fromkeys(SYNCS, 0)
    paused = [False]
    step = opt.step

    def opt_step(*a, **k):
        # AdamW reads its per-parameter step counters with .item(); they live on the CPU even
        # for CUDA parameters, so those are no device syncs. Count only stab's own code.
        paused[0] = True
        try:
            return step(*a, **k)
        finally:
            paused[0] = False

    monkeypatch.setattr(opt, "step", opt_step)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _orig=original, **k):
            counts[_name] += not paused[0]
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    host, finite = stepper(batch)
    monkeypatch.undo()
    assert finite and len(host) == 2 + len(groups) + 1 + 3 * 3  # loss, total, groups, finite flag, stages
    # 62 parameters in 27 groups, and still one transfer: .cpu() then .numpy() on the host copy
    assert counts["cpu"] == 1 and counts["numpy"] == 1
    assert sum(counts[k] for k in SYNCS if k not in ("cpu", "numpy")) == 0, counts


def _count_transfers(monkeypatch, run) -> dict[str, int]:
    """Calls of each host-sync method of torch.Tensor made while `run()` runs."""
    counts = dict.fromkeys(SYNCS, 0)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _name=name, _orig=original, **k):
            counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        run()
    finally:
        monkeypatch.undo()
    return counts


def _window(sync_every: int, nan_at: int | None = None):
    cfg, work = tiny_workload()
    groups = work.module_groups()
    opt, sched = make_optimizer(work.model, cfg.train)  # the run's own: fused AdamW, no host reads
    stepper = Stepper(
        work,
        opt,
        sched,
        Instruments(
            list(groups),
            GradProbe(groups),
            [StageProbe(work.rms_matchers(), torch.device("cpu"))],
            1.0,
            len(work.rms_matchers()),
        ),
    )
    nan = torch.tensor(float("nan"))
    window = Window(stepper, sync_every)
    records = []

    def run(steps: int, start: int = 0):
        for step in range(start, start + steps):
            inp, target = work.batch(torch.arange(4) + 4 * (step % 2))
            if step == nan_at:
                inp = inp * nan  # a non-finite batch: loss and gradients go NaN at this step
            window.add(
                StepContext(
                    step,
                    1,
                    step,
                    torch.arange(4),
                    (inp, target),
                    None,
                    sched.state_dict(),
                    [g["lr"] for g in opt.param_groups],
                )
            )
            if window.full:
                records.extend((ctx.step, host, finite) for ctx, host, finite in window.drain())

    return work, run, records


def test_sync_every_k_moves_measurements_once_per_k_steps(monkeypatch, one_thread):
    """16 steps: 16 transfers at train.sync_every=1, 2 at sync_every=8, and bitwise the same numbers."""
    got = {}
    for k in (1, 8):
        work, run, records = _window(k)
        run(k)  # warm-up outside the count
        counts = _count_transfers(monkeypatch, lambda: run(16, start=k))
        assert counts["cpu"] == 16 // k and counts["numpy"] == 16 // k, (k, counts)
        assert sum(counts[n] for n in SYNCS if n not in ("cpu", "numpy")) == 0, (k, counts)
        got[k] = records
    r1, r8 = got[1], got[8]
    assert [r[0] for r in r1] == list(range(17)) and [r[0] for r in r8] == list(range(24))
    for (_, h1, f1), (_, h8, f8) in zip(r1, r8):
        assert f1 and f8
        np.testing.assert_array_equal(h1, h8)  # bitwise: the same fused kernel, the same clip


def test_a_non_finite_step_inside_a_window_is_skipped_on_the_device_and_found_at_its_step(one_thread):
    """sync_every=4, NaN batch at step 5: the host learns at step 7's transfer, rewinds, and
    reports step 5 non-finite and the others finite; weights end as at sync_every=1."""
    ends = {}
    for k in (1, 4):
        work, run, records = _window(k, nan_at=5)
        run(8)
        assert [r[0] for r in records] == list(range(8))
        assert [r[0] for r in records if not r[2]] == [5], k
        assert np.isnan(records[5][1][0]) and all(np.isfinite(r[1][0]) for r in records if r[0] != 5)
        ends[k] = [p.detach().clone() for p in work.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ends[1], ends[4]))


def test_grad_probe_agrees_with_torch_clip_grad_norm():
    _, work = tiny_workload()
    work.loss(work.batch(torch.arange(4))).backward()
    probe = GradProbe(work.module_groups())
    total, per_group, finite = probe.measure()
    assert finite
    expected = torch.nn.utils.get_total_norm([p.grad for p in work.model.parameters()])
    assert torch.allclose(total.float(), expected, rtol=1e-5)
    assert torch.allclose(per_group.pow(2).sum().sqrt(), total, rtol=1e-5)
    probe.clip_(total, 0.5)
    assert torch.allclose(
        torch.nn.utils.get_total_norm([p.grad for p in work.model.parameters()]), torch.tensor(0.5), rtol=1e-4
    )


def test_matmul_rate_is_measured_not_assumed():
    rate = matmul_flops(torch.device("cpu"), n=256, reps=2)
    assert 1e7 < rate < 1e14


def test_the_cli_and_a_sweeps_checks_leave_torch_to_the_jobs():
    """`stab --help`, and the process of a sweep whose jobs run in workers, never load torch,
    pandas or matplotlib for the usual grid: the workers start on a free machine."""
    code = (
        "import sys; from cli.main import app; from cli.config import compose_run; "
        "from stability.preflight import preflight; "
        "[preflight(compose_run(o)) for o in (['preset=smoke', 'norm=post'], ['clip=none', 'train.device=cpu'])]; "
        "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
