"""Your own model (`model=custom model._target_=...`): module groups from the module tree, attention
logits of nn.MultiheadAttention, the errors a factory can cause, and the examples end to end
through the real CLI in a subprocess (`stab sweep` over two configurations, `stab report`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from stability.config import ConfigError, RunConfig
from stability.workloads.custom import MultiheadAttentionLogits, auto_groups, find_layers, locate
from tests.conftest import only_run

ROOT = Path(__file__).resolve().parent.parent
STAB = [sys.executable, "-m", "cli.main"]
CEILING_S = 600  # a generous ceiling for a subprocess on a busy 2-core machine, not a timing
TINY_GPT = [
    "model=custom",
    "model._target_=examples.gpt.build",
    "+model.max_chars=2500",
    "+model.context=16",
    "+model.width=16",
    "train.epochs=2",
    "train.batch_size=16",
]


def test_groups_cover_every_parameter_once_and_name_the_layers():
    from examples.gpt import build

    model = build(max_chars=2000, width=16)["model"]
    layers = find_layers(model)
    assert list(layers) == ["blocks.0", "blocks.1"]  # found by their attention child
    groups = auto_groups(model, layers)
    assert {"blocks.0.attn", "blocks.0.mlp", "blocks.0.norm", "tok", "pos", "head"} <= set(groups)
    owned = [id(p) for mods in groups.values() for m in mods for p in m.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert list(find_layers(model, r"blocks\.1")) == ["blocks.1"]  # a user-given pattern


def test_a_wrapped_model_whose_root_owns_parameters_keeps_every_group():
    """The GPT inside a wrapper (a LightningModule's `self.model`): its root owns `pos` directly,
    so it is no longer the root. Its own parameters are one group; the layers, `tok` and `head`
    keep theirs. Before, the wrapped module was a group holding every parameter below it, and every
    other group's grad norm read 0."""
    import torch
    from torch import nn

    from examples.gpt import build

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(max_chars=2000, width=16)["model"]

    model = Wrapper()
    groups = auto_groups(model, find_layers(model))
    assert {"model.blocks.0.attn", "model.blocks.1.mlp", "model.tok", "model.head"} <= set(groups)
    owned = [id(p) for mods in groups.values() for m in mods for p in m.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert [n for n, _ in groups["model"][0].named_parameters()] == ["pos"]
    # the gradient reaches every group: none is left at zero by another group claiming its parameters
    idx = torch.randint(0, 8, (2, 8))
    model.model(idx).float().pow(2).mean().backward()
    for name, mods in groups.items():
        assert sum(float(p.grad.norm()) for m in mods for p in m.parameters() if p.grad is not None) > 0, name


def test_transformer_encoder_layers_are_found_by_type():
    from examples.vit import build

    model = build(n=32, width=16)["model"]
    groups = auto_groups(model, find_layers(model))
    layer0 = model.encoder.layers[0]
    assert groups["encoder.layers.0.attn"] == [layer0.self_attn]
    assert groups["encoder.layers.0.mlp"] == [layer0.linear1, layer0.linear2]
    assert groups["encoder.layers.0.norm"] == [layer0.norm1, layer0.norm2]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_logits_give_its_own_attention_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 7, 16)  # (B, T, E)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    view = MultiheadAttentionLogits(mha)
    seen = []
    handle = view.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    inp = x if batch_first else x.transpose(0, 1)
    _, weights = mha(inp, inp, inp, attn_mask=mask, need_weights=True, average_attn_weights=False)  # (B, H, T, T)
    handle.remove()
    assert seen[0].shape == (3, 7, 16)  # the probe always sees (B, T, E)
    probs = torch.softmax(view.logits(seen[0]), dim=-1)
    torch.testing.assert_close(probs, weights, atol=1e-5, rtol=1e-4)
    assert torch.isinf(view.logits(seen[0])[..., 0, 1:]).all()  # the causal mask it was called with


def test_a_dataset_and_tensors_give_the_same_batches():
    from torch.utils.data import Dataset

    from stability.workloads.custom import Examples, split

    x, y = torch.randn(10, 3), torch.arange(10)

    class Pairs(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[i], y[i]

    idx = torch.tensor([7, 2, 5])
    cpu = torch.device("cpu")
    for a, b in zip(Examples(Pairs(), "train", "t", cpu)[idx], Examples((x, y), "train", "t", cpu)[idx]):
        assert torch.equal(a, b)
    one = Examples(x, "train", "t", cpu)[idx]  # one tensor: the model's input and the loss's target
    assert split(one)[0][0] is split(one)[1]
    with pytest.raises(ConfigError, match="different numbers of rows"):
        Examples((x, y[:5]), "train", "t", cpu)


def test_locate_finds_attributes_behind_the_longest_module():
    from examples import gpt

    assert locate("examples.gpt.build") is gpt.build
    assert locate("examples.gpt.GPT.forward") is gpt.GPT.forward
    with pytest.raises(ConfigError, match=r"module examples.gpt has no attribute 'nope'"):
        locate("examples.gpt.nope")


BAD = """
import torch, torch.nn as nn, torch.nn.functional as F

def data(n=16):
    return torch.randn(n, 4), torch.randn(n, 2)

def raises(width=8):
    raise RuntimeError("no GPU here")

def strict(width=8):  # as transformers' strict config dataclasses say a bad field: the reason on line 2
    raise TypeError(f"Validation error for field 'n_embd':\\n  Expected int, got str {width!r}")

def detached():
    x, y = data()
    lin = nn.Linear(4, 2)
    return {"model": lin, "train": (x, y), "loss": lambda out, y: F.mse_loss(out.detach(), y)}

def empty():
    return {"model": nn.Linear(4, 2), "train": (torch.zeros(0, 4), torch.zeros(0, 2)), "loss": F.mse_loss}

def not_scalar():
    x, y = data()
    return {"model": nn.Linear(4, 2), "train": (x, y), "loss": lambda out, y: (out - y) ** 2}

class MyAttention(nn.Module):
    def __init__(self, logits=False):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        if logits:  # stab's protocol for attention health: pre-softmax logits (B, heads, T, T)
            self.logits = lambda x: (lambda q, k: (q @ k.transpose(-2, -1)).unsqueeze(1))(*self.qkv(x).chunk(3, -1)[:2])

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)

class Block(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.attn, self.out = MyAttention(logits), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(x + self.attn(x))

def regression(logits=False):
    x, y = torch.randn(64, 5, 4), torch.randn(64, 5, 2)
    return {"model": nn.Sequential(Block(logits)), "train": (x, y), "val": (x[:8], y[:8]), "loss": F.mse_loss}

def bad_tokens():  # the output's tokens are fine, the target's reshape fails
    x = torch.randint(0, 10, (32, 6))
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    return {"model": model, "train": (x, x), "val": (x[:8], x[:8]),
            "loss": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()),
            "tokens": lambda t: t.argmax(-1) if t.dim() == 3 else t.view(-1, 7)}

def good(width=8):
    x, y = data()
    return {"model": nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2)), "train": (x, y), "loss": F.mse_loss}

def normed(width=8, norm="pre"):  # declares the short name norm
    return good(width)
"""


@pytest.mark.parametrize(
    "target, problem",
    [
        ("nowhere_pkg.build", "no module 'nowhere_pkg' can be imported"),
        ("bad_factories.raises", "raised RuntimeError: no GPU here"),
        ("bad_factories.strict", "raised TypeError: Validation error for field 'n_embd': Expected int, got str 8"),
        ("bad_factories.detached", "no gradient path"),
        ("bad_factories.empty", "has no examples (length 0)"),
        ("bad_factories.not_scalar", "not a scalar: shape (2, 2)"),
        ("bad_factories.bad_tokens", "tokens(target) raised RuntimeError: shape '[-1, 7]' is invalid"),
    ],
)
def test_a_bad_factory_stops_before_training_with_one_line(cli, tmp_path, monkeypatch, target, problem):
    (tmp_path / "bad_factories.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = tmp_path / "runs"
    result = cli("run", "--runs", runs, "model=custom", f"model._target_={target}", ok=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"model._target_={target}" in lines[0] and problem in lines[0], result.output
    assert not list(runs.rglob("status.json"))  # nothing started


def test_a_factory_key_without_plus_and_a_preset_only_under_model_preset(cli, tmp_path, monkeypatch):
    """`model.width=4` (no `+`) says how to add the key; a preset defined in a --config-dir only as
    model_preset/custom/NAME.yaml (no preset/NAME.yaml) is taken, as docs/your-model.md says."""
    (tmp_path / "bad_factories.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = tmp_path / "runs"
    result = cli("run", "--runs", runs, "model=custom", "model._target_=bad_factories.good", "model.width=4", ok=False)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].endswith("a keyword argument of your factory is a new key: write +model.width=...")
    conf = tmp_path / "conf" / "model_preset" / "custom"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text("# @package _global_\ntrain:\n  epochs: 1\n  batch_size: 4\n")
    cli(
        "run",
        "--runs",
        runs,
        "--config-dir",
        tmp_path / "conf",
        "model=custom",
        "model._target_=bad_factories.good",
        "preset=tiny",
    )
    config = yaml.safe_load((only_run(runs) / "config.yaml").read_text())
    assert (config["train"]["epochs"], config["train"]["batch_size"]) == (1, 4)


def test_short_names_are_the_factorys_to_declare(cli, tmp_path, monkeypatch):
    (tmp_path / "bad_factories.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("run", "--runs", tmp_path, "model=custom", "model._target_=bad_factories.good", "norm=pre", ok=False)
    assert result.exit_code == 2 and "norm='pre' is not allowed with model._target_=bad_factories.good" in result.output
    result = cli(
        "run", "--runs", tmp_path, "model=custom", "model._target_=bad_factories.good", "+model.depth=3", ok=False
    )
    assert result.exit_code == 2 and "cannot take the model keys ['depth']" in result.output
    result = cli("run", "--runs", tmp_path, "model=custom", ok=False)
    assert result.exit_code == 2 and "model=custom needs model._target_" in result.output


def test_a_misspelt_factory_key_is_the_only_key_named_with_the_one_it_meant(cli, tmp_path, monkeypatch):
    """`+model.widht=4` to a factory that also declares `norm` (read from the short name, so the
    factory is called with norm too): the error names widht alone and suggests width."""
    (tmp_path / "bad_factories.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = tmp_path / "runs"
    result = cli(
        "run", "--runs", runs, "model=custom", "model._target_=bad_factories.normed", "+model.widht=4", ok=False
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "cannot take the model keys ['widht'] (its parameters: width, norm); did you mean width?" in lines[0]
    assert not list(runs.rglob("status.json"))  # refused before any work
    cli("run", "--runs", runs, "model=custom", "model._target_=bad_factories.normed", "+model.width=4", "norm=post")
    assert yaml.safe_load((only_run(runs) / "config.yaml").read_text())["model"]["norm"] == "post"


def test_checks_that_cannot_be_set_up_say_so(cli, tmp_path, monkeypatch, one_thread):
    (tmp_path / "bad_factories.py").write_text(BAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli(
        "run", "--runs", tmp_path / "runs", "model=custom", "model._target_=bad_factories.regression", "train.epochs=2"
    )
    # its attention calls F.scaled_dot_product_attention: health needs no logits(x) method any more (issue 25)
    assert "health check" not in result.output
    assert "scream check: not available: the output is not scores over a vocabulary" in result.output
    run = next((tmp_path / "runs").rglob("summary.json")).parent
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [e["collapsed"] for e in epochs] == [None, None] and all("health" in e for e in epochs)
    data = json.loads((run / "data.json").read_text())
    assert data["health"] == "available: 1 of 1 layers (q and k captured at F.scaled_dot_product_attention)"
    assert all(e["val_loss"] > 0 for e in epochs)  # validation still runs

    from cli.config import compose_run
    from stability.workloads.custom import CustomWorkload

    cfg = compose_run(["model=custom", "model._target_=bad_factories.regression", "+model.logits=true"])
    work = CustomWorkload(cfg, torch.device("cpu"))
    assert work.info["health"] == "available: 1 of 1 layers" and list(work.health_layers()) == ["0"]
    from stability import health

    stats = health.measure(work.model, work.health_loss, work.health_layers())["0"]
    assert 0 < stats["attn_entropy"] <= torch.log(torch.tensor(5.0)).item() + 1e-6  # T = 5 positions


def test_a_declared_short_name_reaches_the_factory_and_the_config():
    from cli.config import compose_run

    cfg = compose_run(["model=custom", "model._target_=examples.gpt.build", "norm=pre", "+model.width=8"])
    assert cfg.model.params == {"width": 8, "norm": "pre"} and cfg.model.norm == "pre"
    assert cfg.to_dict()["model"] == {"name": "custom", "_target_": "examples.gpt.build", "width": 8, "norm": "pre"}
    assert RunConfig.from_dict(cfg.to_dict()).identity() == cfg.identity()  # the run folder's config reads back


def _stab(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*STAB, *args], capture_output=True, text=True, cwd=ROOT, timeout=CEILING_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _runs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("summary.json"))


@pytest.mark.slow
def test_gpt_example_sweeps_and_reports(tmp_path):
    _stab("sweep", "--runs", str(tmp_path), "--name", "gpt", *TINY_GPT, "norm=pre,post", "train.threads=1")
    runs = _runs(tmp_path / "gpt")
    assert len(runs) == 2
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["verdict"] in ("stable", "inconclusive", "exploding", "scream", "nan")
        epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
        assert len(epochs) == 2 and all(e["collapsed"] is not None for e in epochs)  # the scream check ran
        assert set(epochs[-1]["health"]) == {"blocks.0", "blocks.1"}  # through nn.MultiheadAttention
        groups = {row["group"] for row in csv.DictReader((run / "grad_norms.csv").open())}
        assert {"blocks.0.attn", "blocks.1.mlp", "head"} <= groups
    report = _stab("report", str(tmp_path / "gpt"))
    factors = list(csv.DictReader((tmp_path / "gpt" / "factors.csv").open()))
    assert {(f["factor"], f["value"]) for f in factors} == {("norm", "pre"), ("norm", "post")}, report.stdout


@pytest.mark.slow
def test_vit_example_from_a_users_config_dir_sweeps_its_own_key(tmp_path):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "my_vit.yaml").write_text(
        textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /data: none
        model:
          name: custom
          _target_: examples.vit.build
          n: 96
          norm: ${norm}
        """)
    )
    _stab(
        "sweep",
        "--runs",
        str(tmp_path),
        "--name",
        "vit",
        "--config-dir",
        str(tmp_path / "conf"),
        "model=my_vit",
        "+model.width=8,16",
        "norm=pre",
        "train.epochs=2",
        "train.threads=1",
    )
    runs = _runs(tmp_path / "vit")
    widths = sorted(json.loads((r / "data.json").read_text())["params"]["width"] for r in runs)
    assert widths == [8, 16]
    _stab("report", str(tmp_path / "vit"))
    factors = list(csv.DictReader((tmp_path / "vit" / "factors.csv").open()))
    assert {f["factor"] for f in factors} == {"model.width"}
