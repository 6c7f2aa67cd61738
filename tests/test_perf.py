"""Instrumentation without per-parameter or per-module host syncs, and the bench itself."""

from __future__ import annotations

import subprocess
import sys

import torch

from stability.bench import matmul_flops
from stability.config import RunConfig
from stability.instrument import GradProbe, StageProbe
from stability.training import Stepper
from stability.workloads import make_workload

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def tiny_workload():
    cfg = RunConfig.from_dict({"model": {"d_model": 32, "n_heads": 2, "n_layers": 2},
                               "data": {"n_train": 8, "n_val": 4, "seconds": 1.0}, "train": {"batch_size": 4}})
    torch.manual_seed(0)
    return cfg, make_workload(cfg, torch.device("cpu"))


def test_one_instrumented_step_moves_data_to_the_host_exactly_once(monkeypatch):
    cfg, work = tiny_workload()
    groups = work.module_groups()
    opt = torch.optim.AdamW(work.model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stepper = Stepper(work, opt, sched, GradProbe(groups), StageProbe(work.rms_matchers(), torch.device("cpu")), 1.0)
    batch = work.batch(torch.arange(4))
    stepper(batch)  # warm-up outside the count
    counts = {name: 0 for name in SYNCS}
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
    assert finite and len(host) == 2 + len(groups) + 3 * 3
    # 62 parameters in 27 groups, and still one transfer: .cpu() then .numpy() on the host copy
    assert counts["cpu"] == 1 and counts["numpy"] == 1
    assert sum(counts[k] for k in SYNCS if k not in ("cpu", "numpy")) == 0, counts


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
    assert torch.allclose(torch.nn.utils.get_total_norm([p.grad for p in work.model.parameters()]),
                          torch.tensor(0.5), rtol=1e-4)


def test_matmul_rate_is_measured_not_assumed():
    rate = matmul_flops(torch.device("cpu"), n=256, reps=2)
    assert 1e7 < rate < 1e14


def test_the_cli_and_a_sweeps_checks_leave_torch_to_the_jobs():
    """`stab --help`, and the process of a sweep whose jobs run in workers, never load torch,
    pandas or matplotlib for the usual grid: the workers start on a free machine."""
    code = ("import sys; from cli.main import app; from cli.config import compose_run; "
            "from stability.preflight import preflight; "
            "[preflight(compose_run(o)) for o in (['preset=smoke', 'norm=post'], ['clip=none', 'train.device=cpu'])]; "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
