"""Optimizer-state signals, recovery policies, the snapshot ring and the bad-step formats, each
on a tiny model trained for real (no training loop: that is in test_recovery.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from stability import badsteps, snapshots
from stability.optstate import LMProbe, OptStateProbe
from stability.recovery import LRBackoff, SpikeGuard, UpdateClip


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _grads(model: nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g)
    model.zero_grad(set_to_none=True)
    (model(x).pow(2).mean() * scale).backward()


def test_relative_update_is_the_update_the_optimizer_applied():
    """update_rel per group = ||new - old|| / ||new|| of that group's weights (no weight decay),
    the moment norms are those of exp_avg / exp_avg_sq, eps_share is in 0..1."""
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    probe = OptStateProbe({"first": [model[0]], "last": [model[2]]}, opt)
    assert probe.keys()[:2] == ["update_rel/first", "update_rel/last"]
    assert float(probe.vector().abs().sum()) == 0.0  # no state yet: zeros, no error
    for step in range(6):
        _grads(model, seed=step)
        old = [p.detach().clone() for p in model.parameters()]
        opt.step()
        vec = probe.vector().tolist()
        ps = list(model.parameters())
        for g, (a, b) in enumerate([(0, 2), (2, 4)]):
            du = math.sqrt(sum(float(((ps[j] - old[j]) ** 2).sum()) for j in range(a, b)))
            pn = math.sqrt(sum(float((ps[j] ** 2).sum()) for j in range(a, b)))
            assert vec[g] == pytest.approx(du / pn, rel=1e-4)
            m = math.sqrt(sum(float((opt.state[ps[j]]["exp_avg"] ** 2).sum()) for j in range(a, b)))
            v = math.sqrt(sum(float((opt.state[ps[j]]["exp_avg_sq"] ** 2).sum()) for j in range(a, b)))
            assert vec[2 + g] == pytest.approx(m, rel=1e-5)
            assert vec[4 + g] == pytest.approx(v, rel=1e-5)
            assert 0.0 <= vec[6 + g] <= 1.0


def test_eps_share_counts_coordinates_below_epsilon_and_skips_zero_the_update():
    """A group whose gradients are all tiny against eps is entirely in the epsilon regime; a
    group with ordinary gradients is not. A skipped step reports no update."""
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, fused=True)
    probe = OptStateProbe({"first": [model[0]], "last": [model[2]]}, opt)
    _grads(model)
    for p in model[0].parameters():
        p.grad.mul_(1e-6)
    opt.step()
    vec = probe.vector().tolist()
    assert vec[6] == 1.0 and vec[7] < 0.5
    assert probe.vector(torch.tensor(1.0))[:2].tolist() == [0.0, 0.0]


def test_probe_follows_a_reloaded_optimizer_state():
    """After load_state_dict (a rewind) the probe reads the new state, not the old buffers."""
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    probe = OptStateProbe({"all": [model]}, opt)
    _grads(model)
    opt.step()
    first = probe.vector().tolist()
    saved = copy.deepcopy(opt.state_dict())
    for s in range(3):
        _grads(model, seed=s + 1)
        opt.step()
    assert probe.vector().tolist() != first
    opt.load_state_dict(saved)
    assert probe.vector().tolist()[2:] == pytest.approx(first[2:], rel=1e-6)


def test_lm_probe_reads_log_z_and_the_largest_attention_logit():
    from stability.config import CharLMConfig
    from stability.models.charlm import CharLM

    torch.manual_seed(0)
    model = CharLM(CharLMConfig(d_model=16, n_layers=2, n_heads=2, context=8), vocab_size=11)
    probe = LMProbe(model)
    assert probe.keys() == ["lm/log_z", "lm/log_z_max", "lm/attn_logit_max"]
    x = torch.randint(0, 11, (3, 8))
    logits = model(x)
    vec = probe.vector().tolist()
    z = torch.logsumexp(logits.detach(), -1)
    assert vec[0] == pytest.approx(float(z.mean()), rel=1e-5)
    assert vec[1] == pytest.approx(float(z.max()), rel=1e-5)
    with torch.no_grad():  # the attention's own probe path, masked the same way
        h = model.tok(x) + model.pos(torch.arange(8))
        top = []
        for layer in model.stack.layers:
            inp = layer.norm1(h) if layer.norm == "pre" else h
            top.append(float(layer.attn.logits(inp).max()))
            h = layer(h)
    assert vec[2] == pytest.approx(top[0] if len(top) == 1 else max(top), rel=1e-4)
    model.eval()
    model(x * 0)  # an eval forward does not overwrite the training values
    assert probe.vector().tolist() == vec
    probe.close()
    assert not any(getattr(a, "watch_logits", False) for a in model.modules())


def test_spike_guard_is_olmo_cores_rule():
    """No decision before half the window; then a value > mean + sigma * std of the previous
    window is a spike; the window keeps finite values only."""
    guard = SpikeGuard(window=8, sigma=6.0)
    rng = torch.Generator().manual_seed(0)
    loss = 2.0 + 0.01 * torch.randn(40, generator=rng, dtype=torch.float64)
    gn = 1.0 + 0.01 * torch.randn(40, generator=rng, dtype=torch.float64)
    flags = []
    for i in range(40):
        l_, g_ = loss[i], gn[i]
        if i == 2:
            l_ = torch.tensor(1000.0, dtype=torch.float64)  # before half the window: no decision
        if i == 20:
            g_ = torch.tensor(50.0, dtype=torch.float64)
        if i == 30:
            l_ = torch.tensor(math.nan, dtype=torch.float64)
        flags.append(float(guard.check(l_, g_)))
    assert flags[2] == 0.0
    assert [i for i, f in enumerate(flags) if f] == [20]
    assert float(guard.buf[1].max()) < 50  # the spike left the 8-step window long ago
    assert int(guard.count) == 39  # the NaN step did not enter


def test_lr_backoff_halves_at_a_spike_and_grows_back():
    b = LRBackoff(factor=0.5, steps=4)
    scales = [float(b.update(torch.tensor(float(s)))) for s in (0, 1, 0, 0, 0, 0, 0)]
    assert scales[0] == 1.0 and scales[1] == 0.5
    assert scales[2] == pytest.approx(0.5 * 2**0.25) and scales[5] == pytest.approx(1.0) and scales[6] == 1.0
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref = _tiny()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=5e-3, fused=True)
    b = LRBackoff(factor=0.5, steps=100)
    b.update(torch.tensor(1.0))
    for m_ in (model, ref):
        _grads(m_)
    b.apply(opt)
    opt.step()
    b.restore(opt)
    ref_opt.step()
    assert opt.param_groups[0]["lr"] == 1e-2
    for p, q in zip(model.parameters(), ref.parameters()):  # the step used lr 1e-2 x 0.5
        assert torch.allclose(p, q, atol=1e-7)


def test_update_clip_scales_a_spiky_step_only():
    """StableAdamW's clipping: an ordinary step is (nearly) untouched; a step whose gradient is 100x
    the ones the second moment saw is scaled down by RMS(g^2 / v_hat)."""
    model, ref = _tiny(), _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    clip = UpdateClip(1.0, opt, list(model.parameters()))
    for s in range(5):
        scale = 100.0 if s == 4 else 1.0
        _grads(model, scale, seed=s)
        _grads(ref, scale, seed=s)
        clip.before()
        old = [p.detach().clone() for p in model.parameters()]
        opt.step()
        clip.after()
        ref_opt.step()
        moved = sum(float((p - o).norm()) for p, o in zip(model.parameters(), old))
        unclipped = sum(float((q - o).norm()) for q, o in zip(ref.parameters(), old))
        if s < 4:  # ordinary steps: at most a nudge (RMS(g^2 / v_hat) near 1)
            assert min(float(f) for f in clip.factors) > 0.7
            assert moved > 0.7 * unclipped
        else:
            assert float(clip.last_clipped) == 1.0
            assert moved < 0.5 * unclipped


def test_snapshot_ring_keeps_a_spread_and_restores_exactly(tmp_path):
    ring = snapshots.SnapshotRing(tmp_path / "snapshots", every=10, keep=4)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    saved = {}
    for step in range(100):
        if ring.due(step):
            ring.save(step, snapshots.capture(model, opt, sched, torch.Generator().get_state(), 1, step))
            saved[step] = [p.detach().clone() for p in model.parameters()]
        _grads(model, seed=step)
        opt.step()
        sched.step()
    assert snapshots.kept(tmp_path) == ring.steps and len(ring.steps) == 4
    assert ring.steps[0] == 0 and ring.steps[-1] == 90
    assert snapshots.before(tmp_path, 55).name in {f"step{s:08d}.pt" for s in ring.steps if s < 55}
    assert snapshots.before(tmp_path, 0) is None
    step = int(snapshots.before(tmp_path, 95).stem[4:])
    snap = snapshots.load(snapshots.before(tmp_path, 95))
    fresh = _tiny(seed=5)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, fused=True)
    fsched = torch.optim.lr_scheduler.LambdaLR(fopt, lambda s: min(1.0, (s + 1) / 5))
    snapshots.restore(snap, fresh, fopt, fsched)
    for p, q in zip(fresh.parameters(), saved[step]):
        assert torch.equal(p, q)
    assert snap["step"] == step and fsched.last_epoch == step
    with pytest.raises(ValueError, match="do not fit"):
        snapshots.restore(snap, nn.Linear(3, 3), fopt, fsched)
    (tmp_path / "bad.pt").write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="not a stab snapshot"):
        snapshots.load(tmp_path / "bad.pt")


def test_bad_step_formats(tmp_path):
    rows = [{"step": s, "epoch": 1 + s // 10, "batch": s % 10, "loss": 1.0, "finite": True} for s in range(30)]
    rows[14]["finite"], rows[14]["loss"] = False, "NaN"
    rows[15]["recover/skipped"] = True
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"event": "grad_spike", "step": 22, "epoch": 3, "batch": 2}) + "\n"
    )
    steps = badsteps.bad_steps(tmp_path)
    assert [(s.step, s.epoch, s.batch, s.why) for s in steps] == [
        (14, 2, 4, "non-finite"),
        (15, 2, 5, "skipped"),
        (22, 3, 2, "grad_spike"),
    ]
    name, text = badsteps.FORMATS["lightning"].render(steps)
    assert name == "skip_batches.json" and json.loads(text) == [1, 2, 3, 4, 5]
    name, text = badsteps.FORMATS["olmo-core"].render(steps)
    assert json.loads(text) == {"steps_to_skip": [{"start": 15, "stop": 17}, {"start": 23, "stop": 24}]}
    name, text = badsteps.FORMATS["megatron"].render(steps)
    assert text.strip() == "--iterations-to-skip 15 16 23"
    with pytest.raises(ValueError, match="no step records"):
        badsteps.bad_steps(tmp_path / "nothing")


def test_bench_measures_the_signals_and_a_snapshot_against_the_same_step_without(cli):
    """`stab bench` with the signals on runs a third loop without them and prints their ratio,
    and the snapshot's measured time, size and share of training at a few intervals."""
    result = cli("bench", "--steps", "5", "model=charlm", "preset=smoke", "train.threads=1", "detect.opt_state=true")
    line = next(ln for ln in result.output.splitlines() if "signals ratio" in ln)
    assert 0 < float(line.rsplit(":", 1)[1]) < 10
    snap = next(ln for ln in result.output.splitlines() if ln.strip().startswith("snapshot"))
    ms, mib = float(snap.split(": ")[1].split(" ms")[0]), float(snap.split("ms, ")[1].split(" MiB")[0])
    assert ms > 0 and 0 < mib < 100  # the char LM's smoke model and its Adam state: well under 100 MiB
    shares = [float(x.split(": ")[-1].rstrip("%")) for x in snap.split("snapshot_every=")[1].split(" / ")]
    assert shares[0] > shares[1] > shares[2] > 0  # the rarer the snapshot, the smaller its share
