"""The step layout: one declaration per metric, packed on the device, unpacked into a typed record."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stability.instrument import GradProbe, StageProbe
from stability.step import Instruments, StepContext, Stepper, Window
from stability.steplayout import STAGE, Metric, StepLayout
from stability.workloads import make_optimizer
from tests.test_perf import tiny_workload


class ParamNormProbe:
    """A demo metric measured after backward: the L2 norm of all parameters (before the update)."""

    phase = "grads"
    metrics = (Metric("param_norm", "param/norm", "L2 norm of all parameters before the update"),)

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())

    def measure(self) -> dict[str, torch.Tensor]:
        return {"param_norm": torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.params)))}


class UpdateProbe:
    """A demo per-group metric measured after the optimizer step: the L2 norm of each group's update."""

    phase = "update"
    metrics = (Metric("update", "update/{group}", "L2 norm of the step's update per module group"),)

    def __init__(self, groups: dict[str, list[torch.nn.Module]]) -> None:
        self.groups = {g: [p for m in mods for p in m.parameters()] for g, mods in groups.items()}
        self.before = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}

    def snapshot(self) -> None:
        self.before = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}

    def measure(self) -> dict[str, torch.Tensor]:
        norms = [
            torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in zip(ps, self.before[g])]))
            for g, ps in self.groups.items()
        ]
        self.snapshot()
        return {"update": torch.stack(norms)}


def _stepper(probes_of):
    cfg, work = tiny_workload()
    groups = work.module_groups()
    opt, sched = make_optimizer(work.model, cfg.train)
    probes = [StageProbe(work.rms_matchers(), torch.device("cpu")), *probes_of(work, groups)]
    ins = Instruments(list(groups), GradProbe(groups), probes, clip=1.0, n_stages=len(work.rms_matchers()))
    return work, groups, opt, sched, Stepper(work, opt, sched, ins), probes


@pytest.mark.parametrize("sync_every", [1, 4])
def test_a_probes_metrics_reach_the_record_with_their_measured_values(sync_every, one_thread):
    """Two declared metrics (a grads-phase scalar, an update-phase per-group vector) are measured by
    their probes and read back from the record under their keys, equal to a hand computation."""
    work, groups, opt, sched, stepper, probes = _stepper(lambda w, g: [ParamNormProbe(w.model), UpdateProbe(g)])
    layout = stepper.layout
    window = Window(stepper, sync_every)
    expected_param_norm, weights = [], []
    records = []
    for step in range(8):
        batch = work.batch(torch.arange(4) + 4 * (step % 2))
        before = [p.detach().clone() for p in work.model.parameters()]
        weights.append(before)
        expected_param_norm.append(math.sqrt(sum(float(p.double().pow(2).sum()) for p in before)))
        window.add(
            StepContext(
                step, 1, step, torch.arange(4), batch, None, sched.state_dict(), [g["lr"] for g in opt.param_groups]
            )
        )
        if window.full:
            records += [
                layout.record(
                    row, step=ctx.step, epoch=1, batch=ctx.step, lr=ctx.lrs[0], step_ms=0.0, clip=1.0, finite=finite
                )
                for ctx, row, finite in window.drain()
            ]
    after = [p.detach().clone() for p in work.model.parameters()]
    weights.append(after)
    assert [r.step for r in records] == list(range(8)) and all(r.finite for r in records)
    for rec, want in zip(records, expected_param_norm):
        assert rec["param/norm"] == pytest.approx(want, rel=1e-5)
    # the last step's update per group, from the weights before and after it
    params = list(work.model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    for g, mods in groups.items():
        ps = [p for m in mods for p in m.parameters()]
        want = math.sqrt(
            sum(float((weights[8][index[id(p)]] - weights[7][index[id(p)]]).double().pow(2).sum()) for p in ps)
        )
        assert records[-1].per_group("update")[g] == pytest.approx(want, rel=1e-4, abs=1e-12)
    assert set(records[-1].per_group("update")) == set(groups)
    # the record's JSON line carries them, after the core keys and before the host ones
    line = records[-1].as_dict()
    keys = list(line)
    assert keys.index("grad/norm") < keys.index("param/norm") < keys.index("finite")
    assert all(f"update/{g}" in line for g in groups)


def test_the_record_reads_the_row_the_layout_packed():
    layout = StepLayout(
        ["emb", "head"], n_stages=2, probes=[type("P", (), {"metrics": STAGE, "phase": "grads"})()], clamp=(0.5, 2.0)
    )
    vec = layout.pack(
        {
            "loss": torch.tensor(2.5),
            "grad_norm": torch.tensor(5.0),
            "grad": torch.tensor([3.0, 4.0]),
            "grads_finite": torch.tensor(True),
            "stage_rms": torch.tensor([1.0, 1.5]),
            "stage_ratio": torch.tensor([1.0, 3.0]),
            "stage_scale": torch.tensor([1.0, 2.0]),
        }
    )
    assert vec.shape == (layout.width,) and layout.width == 1 + 1 + 2 + 1 + 6
    rec = layout.record(vec.numpy(), step=7, epoch=2, batch=3, lr=0.1, step_ms=4.0, clip=4.0)
    assert (rec.loss, rec.grad_norm, rec.finite, rec.clipped) == (2.5, 5.0, True, True)
    assert rec.per_group("grad") == {"emb": 3.0, "head": 4.0}
    assert rec["stage1/ratio"] == 3.0 and rec["stage1/clamped"] is True and rec["stage0/clamped"] is False
    assert "grads_finite" not in rec  # folded into `finite`, not written
    bad = vec.clone()
    bad[layout.slices["grads_finite"]] = 0
    assert (
        not layout.finite(bad.numpy())
        and not layout.record(bad.numpy(), step=0, epoch=1, batch=0, lr=0.1, step_ms=0.0, clip=4.0).clipped
    )
    nan_loss = vec.clone()
    nan_loss[0] = math.nan
    assert not layout.finite(nan_loss.numpy())
    with pytest.raises(KeyError, match="'stage_rms' was declared but not measured"):
        layout.pack(
            {
                "loss": torch.tensor(1.0),
                "grad_norm": torch.tensor(1.0),
                "grad": torch.zeros(2),
                "grads_finite": torch.tensor(True),
            }
        )


def test_a_group_named_like_a_step_field_is_refused_not_overwritten():
    with pytest.raises(ValueError, match="'grad/norm' is measured twice"):
        StepLayout(["emb", "norm"])
    with pytest.raises(ValueError, match="'loss' is declared twice"):
        StepLayout(["emb"], probes=[type("P", (), {"metrics": (Metric("loss", "x", "doc"),), "phase": "grads"})()])


def test_an_update_metric_costs_a_second_transfer_only_when_declared(monkeypatch, one_thread):
    from tests.test_perf import _count_transfers

    for probes_of, transfers in ((lambda w, g: [], 1), (lambda w, g: [UpdateProbe(g)], 2)):
        work, groups, opt, sched, stepper, _ = _stepper(probes_of)
        batch = work.batch(torch.arange(4))
        stepper(batch)
        counts = _count_transfers(monkeypatch, lambda: stepper(batch))
        assert counts["cpu"] == transfers, counts
    host, finite = stepper(batch)
    assert finite and len(host) == stepper.layout.width
    assert np.isfinite(stepper.layout.take(host, "update")).all()
