"""The stabilizers change what they should, in both workloads (properties, no golden numbers)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

from cli.config import UserError, compose_run
from stability.config import ModelConfig
from stability.models.cascade import Cascade
from stability.models.charlm import lm_loss
from stability.models.layers import Attention, SigmaReparam, Stack, deepnorm_constants, init_weights

ROOT = Path(__file__).resolve().parent.parent


def stack(seed: int = 0, **kw) -> Stack:
    torch.manual_seed(seed)
    args = dict(
        d_model=32, n_layers=2, n_heads=4, mlp_ratio=4, norm="pre", norm_type="layer", final_norm=True, causal=True
    )
    s = Stack(**{**args, **kw})
    init_weights(s)
    return s


pytestmark = pytest.mark.usefixtures("one_thread")


def test_qk_norm_bounds_the_attention_logits():
    torch.manual_seed(0)
    plain = Attention(32, 4, causal=False)
    normed = Attention(32, 4, causal=False, qk_norm=True)
    normed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for a in (plain, normed):
            a.qkv.weight.mul_(50)  # the logit growth QK-norm is meant to stop
    x = torch.randn(2, 16, 32)
    hs = 32 // 4
    # LayerNorm'd q and k (unit gain) have |q| = |k| = sqrt(hs): |q.k| / sqrt(hs) <= sqrt(hs)
    assert normed.logits(x).abs().max() <= math.sqrt(hs) + 1e-3
    assert plain.logits(x).abs().max() > 10 * math.sqrt(hs)


def test_z_loss_adds_its_coefficient_times_mean_log_z_squared():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 30, generator=g) * 4 + 3  # log Z far from 0
    targets = torch.randint(0, 30, (2, 8), generator=g)
    base = lm_loss(logits, targets)
    with_z = lm_loss(logits, targets, z_loss=1e-4)
    expected = 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()
    assert (with_z - base).item() == pytest.approx(expected.item(), rel=1e-4)  # float32 difference
    assert base == pytest.approx(torch.nn.functional.cross_entropy(logits.view(-1, 30), targets.view(-1)).item())


def test_sigma_reparam_leaves_the_forward_unchanged_at_init_and_learns_the_gain():
    plain, reparam = stack(seed=1), stack(seed=1, sigma_reparam=True)
    linear = reparam.layers[0].mlp.fc
    assert parametrize.is_parametrized(linear, "weight")
    assert not parametrize.is_parametrized(plain.layers[0].mlp.fc, "weight")
    x = torch.randn(2, 12, 32)
    for mode in (True, False):  # training forwards run a power iteration; eval ones do not
        plain.train(mode), reparam.train(mode)
        assert torch.allclose(plain(x), reparam(x), atol=1e-5)
    # gamma starts at sigma(W0): the effective weight's spectral norm is sigma(W0), not 1 (as
    # plain spectral norm would make it), and stays gamma when W grows
    w0 = plain.layers[0].mlp.fc.weight.detach()
    sigma0 = torch.linalg.matrix_norm(w0, ord=2)
    sr: SigmaReparam = linear.parametrizations.weight[0]
    assert sr.gamma.item() == pytest.approx(sigma0.item(), rel=1e-5) and abs(sigma0.item() - 1) > 0.3
    with torch.no_grad():
        linear.parametrizations.weight.original.mul_(10)
        for _ in range(5):
            reparam(x)
        assert torch.linalg.matrix_norm(linear.weight, ord=2).item() == pytest.approx(sigma0.item(), rel=1e-3)
    reparam(x).pow(2).mean().backward()
    assert sr.gamma.grad is not None and sr.gamma.grad.abs() > 0  # the gain is learned


def test_v_scale_keeps_large_values_and_shrinks_small_ones():
    torch.manual_seed(0)
    plain = Attention(32, 4, causal=True)
    vs = Attention(32, 4, causal=True, v_scale=True)
    vs.load_state_dict(plain.state_dict(), strict=False)
    assert vs.v_theta.shape == (4,)  # lambda = exp(theta), one per head
    x = torch.randn(2, 10, 32)
    C = 32 * 8 * 0.02**2  # d_model * d_head * sigma^2 * exp(0)
    for gain, close in ((100.0, True), (0.05, False)):
        with torch.no_grad():
            plain.qkv.weight.normal_(std=0.02 * gain)
            plain.qkv.bias.zero_()
            vs.load_state_dict(plain.state_dict(), strict=False)
        _, _, v = plain.heads(x)
        _, _, v_hat = vs.heads(x)
        r = v.pow(2).sum(-1, keepdim=True)
        assert torch.allclose(v_hat, v * r / (r + C), rtol=1e-4, atol=1e-7)  # phi(r) = r / (r + C)
        shrink = (v_hat.norm(dim=-1) / v.norm(dim=-1)).mean().item()
        if close:
            assert shrink > 0.999
            y, y_hat = plain(x), vs(x)
            assert ((y - y_hat).norm() / y.norm()).item() < 1e-3
        else:
            assert shrink < 0.05
    vs(x).sum().backward()
    assert vs.v_theta.grad is not None and vs.v_theta.grad.abs().sum() > 0


@pytest.mark.parametrize("n_layers", [1, 4, 12])
def test_deepnorm_alpha_and_beta_by_depth(n_layers):
    alpha, beta = deepnorm_constants(n_layers)
    assert alpha == pytest.approx((2 * n_layers) ** 0.25) and beta == pytest.approx((8 * n_layers) ** -0.25)
    post, deep = stack(seed=2, norm="post", n_layers=n_layers), stack(seed=2, norm="deepnorm", n_layers=n_layers)
    assert isinstance(deep.final_norm, torch.nn.Identity)  # a post-norm stack: ends in a norm already
    C = 32
    for pb, db in zip(post.layers, deep.layers):
        assert db.alpha == pytest.approx(alpha) and pb.alpha == 1.0
        # beta scales the FFN, the value rows of q|k|v and the output projection; q and k keep theirs
        for p, d in ((pb.mlp.fc, db.mlp.fc), (pb.mlp.proj, db.mlp.proj), (pb.attn.proj, db.attn.proj)):
            assert torch.allclose(d.weight, beta * p.weight)
        assert torch.allclose(db.attn.qkv.weight[2 * C :], beta * pb.attn.qkv.weight[2 * C :])
        assert torch.equal(db.attn.qkv.weight[: 2 * C], pb.attn.qkv.weight[: 2 * C])
    # the block computes x <- LN(alpha x + f(x)) for both sublayers
    b = deep.layers[0]
    x = torch.randn(2, 6, 32)
    h = b.norm1(alpha * x + b.attn(x))
    assert torch.allclose(b(x), b.norm2(alpha * h + b.mlp(h)), atol=1e-6)
    assert deepnorm_constants(100)[0] > alpha or n_layers >= 100  # alpha grows with depth, beta shrinks
    assert deepnorm_constants(100)[1] < beta


def test_the_cascade_accepts_every_stabilizer():
    cfg = compose_run(
        ["preset=smoke", "norm=deepnorm", "qk_norm=true", "sigma_reparam=true", "v_scale=true", "warmup=50"]
    )
    m = cfg.model
    assert (m.norm, m.qk_norm, m.sigma_reparam, m.v_scale, cfg.train.warmup) == ("deepnorm", True, True, True, 50)
    torch.manual_seed(0)
    model = Cascade(m)
    x, y = torch.randn(2, 128, 20) * 5.69, torch.randn(2, 128, 20) * 5.69
    out = model(x, y)
    assert out.shape == (2, 128, 20) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    groups = model.module_groups()
    theta = model.stages[2].stack.layers[0].attn.v_theta
    assert any(p is theta for mod in groups["stage2.layer0.attn"] for p in mod.parameters())
    assert theta.grad is not None


def test_stabilizers_are_off_by_default_and_z_loss_is_the_char_lms_only():
    m = compose_run([]).model
    assert (m.norm, m.qk_norm, m.sigma_reparam, m.v_scale) == ("post", False, False, False)
    assert compose_run(["model=charlm"]).model.z_loss == 0.0
    with pytest.raises(UserError, match=r"z_loss=0.0001 is not allowed with model=cascade.*model=charlm"):
        compose_run(["z_loss=1e-4"])
    with pytest.raises(UserError, match=r"norm='sandwich' is not allowed: expected one of pre, post, deepnorm"):
        compose_run(["norm=sandwich"])
    with pytest.raises(UserError, match=r"qk_norm='yes' is not allowed: expected true or false"):
        compose_run(["qk_norm=yes"])
    # the plain-spectral-norm knob and sigmaReparam are different things on different weights
    model = Cascade(ModelConfig(d_model=16, n_heads=2, n_layers=1, spectral_norm=True))
    assert not parametrize.is_parametrized(model.stages[0].stack.layers[0].mlp.fc, "weight")


def test_each_stabilizer_flag_is_read_at_exactly_one_place():
    sources = "\n".join(p.read_text() for p in (ROOT / "stability").rglob("*.py"))
    for flag in ("qk_norm", "v_scale", "sigma_reparam"):
        assert len(re.findall(rf"\bcfg\.{flag}\b", sources)) == 1, flag
    assert len(re.findall(r"\b(cfg\.model|mcfg)\.z_loss\b", sources)) == 1  # mcfg: the char LM's typed cfg.model
