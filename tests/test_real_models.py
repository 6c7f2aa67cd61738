"""Real library models (tiny, random init, no download) through every loop stab instruments.

GPT-2 and Llama from transformers, a timm ViT, a user's own SDPA block; stab's own loop (`stab
run`), `Monitor` in a plain loop, the Lightning callback (with gradient accumulation) and the
transformers Trainer callback. NaNs are planted in attention, MLP and norm modules; the tests
read back where stab says they started, how it knows, and what `stab replay` finds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stability import health
from stability.config import ConfigError, CustomModelConfig, NoDataConfig, RunConfig
from stability.monitor import Monitor
from stability.outputs import poison
from stability.replay import ReplayError, replay
from stability.workloads.custom import CustomWorkload
from tests.conftest import only_run, read_json, read_jsonl

transformers = pytest.importorskip("transformers")

HF = "examples.hf.build"


def workload(target: str, **params) -> CustomWorkload:
    cfg = RunConfig(model=CustomModelConfig(target=target, params=params), data=NoDataConfig())
    return CustomWorkload(cfg, torch.device("cpu"))


def first_nan(run_dir) -> dict:
    return next(e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "first_nan")


class Plant:
    """A NaN planted in one module's output (any shape) at one optimizer step of a user's loop."""

    def __init__(self, module: nn.Module, at: int, once: bool = False) -> None:
        self.at, self.step, self.once, self.fired = at, -1, once, 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        if self.step == self.at and module.training and not (self.once and self.fired):
            self.fired += 1
            return poison(out)
        return None


# --- groups, ties, health ---------------------------------------------------------------------


def test_hf_models_group_by_layer_report_the_tie_once_and_get_sdpa_health(one_thread):
    gpt2 = workload(HF)
    groups = list(gpt2.module_groups())
    assert groups[:5] == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.norm",
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
    ]
    assert "lm_head" not in groups  # tied to the token embedding: counted once, under transformer.wte
    assert gpt2.info["tied"] == [
        {"param": "lm_head.weight", "same_as": "transformer.wte.weight", "counted_in": "transformer.wte"}
    ]
    assert gpt2.info["health"].startswith("available: 2 of 2 layers (q and k captured")
    llama = workload(HF, arch="llama")
    assert "model.layers.1.attn" in llama.module_groups() and llama.info["tied"] == []
    assert llama.info["health"].startswith("available: 2 of 2 layers")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sdpa_health_equals_the_models_own_eager_attention(arch, one_thread):
    """The entropy, max logit and sink stab computes from q and k captured at SDPA equal those of
    the attention probabilities the same weights give in transformers' eager implementation."""
    work = workload(HF, arch=arch, n_embd=32, n_head=4)
    got = health.measure(work.model, work.health_loss, work.health_layers())
    batch = work.val[torch.arange(8)]
    model = work.model
    model.eval()
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).attentions  # per layer (B, H, T, T), softmaxed
    for layer, p in zip(got, probs):
        p = p.double()
        entropy = -(torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))).sum(-1).mean()
        assert got[layer]["attn_entropy"] == pytest.approx(float(entropy), abs=1e-5)
        assert got[layer]["sink"] == pytest.approx(float(p[..., 0].mean()), abs=1e-5)
        assert math.isfinite(got[layer]["attn_logit_max"]) and got[layer]["grad_sink"] > 0


class SdpaBlock(nn.Module):
    """A user's own causal self-attention block calling F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn = SelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TinySdpaLM(nn.Module):
    def __init__(self, vocab: int = 16, width: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(SdpaBlock(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_sdpa_health_of_uniform_causal_attention_is_its_known_entropy(one_thread):
    """q = 0 makes every logit 0: row t of causal attention is uniform over t + 1 positions, so the
    mean entropy is mean_t log(t + 1), the max logit 0 and the sink mean_t 1 / (t + 1)."""
    torch.manual_seed(0)
    model = TinySdpaLM()
    width = 16
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight[:width].zero_()
            b.attn.qkv.bias[:width].zero_()
    T = 8
    x = torch.randint(0, 16, (6, T))
    work = CustomWorkload(
        RunConfig(model=CustomModelConfig(target="own", params={}), data=NoDataConfig()),
        torch.device("cpu"),
        task=_task(model, x),
    )
    assert work.info["health"].startswith("available: 2 of 2 layers (q and k captured")
    got = health.measure(work.model, work.health_loss, work.health_layers())
    t = torch.arange(1, T + 1, dtype=torch.float64)
    for stats in got.values():
        assert stats["attn_entropy"] == pytest.approx(float(t.log().mean()), abs=1e-6)
        assert stats["attn_logit_max"] == 0.0
        assert stats["sink"] == pytest.approx(float((1 / t).mean()), abs=1e-6)


def _task(model, x):
    from stability.workloads.custom import Task

    return Task(
        model=model, train=(x, x), val=(x, x), loss=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    )


# --- stab's own loop: planted NaNs, located and replayed --------------------------------------


@pytest.mark.parametrize(
    ("arch", "module"),
    [
        ("gpt2", "transformer.h.1.attn"),
        ("gpt2", "transformer.h.0.mlp"),
        ("gpt2", "transformer.h.0.norm"),
        ("llama", "model.layers.0.attn"),
        ("llama", "model.layers.1.mlp"),
        ("llama", "model.norm"),
    ],
)
def test_a_nan_planted_in_a_real_model_is_located_there_and_replayed(
    arch, module, cli, tmp_path, monkeypatch, one_thread
):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    cli(
        "run",
        "--runs",
        runs,
        "model=custom",
        f"model._target_={HF}",
        f"+model.arch={arch}",
        "preset=smoke",
        "train.batch_size=8",
        "fault.nan_at_step=2",
        f"fault.nan_module={module}",
        "train.on_nan=stop",
    )
    run_dir = only_run(runs)
    ev = first_nan(run_dir)
    assert (ev["step"], ev["how"], ev["module"], ev["where"]) == (2, "located", module, "forward")
    assert read_json(run_dir / "summary.json")["verdict"] == "nan"
    r = replay(run_dir)
    assert r.group == module and r.where == "forward" and r.cause.startswith("numerical")


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_non_finite_step_leaves_the_epoch_loss_and_validation_of_the_finite_steps(
    on_nan, cli, tmp_path, monkeypatch, one_thread
):
    """The epoch's loss is the mean over the steps the optimizer took, the skipped one counted and
    said; after a stop the epoch is evaluated on the weights the last finite step left (saved with
    the bad step for replay), not reported NaN."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    out = cli(
        "run",
        "--runs",
        runs,
        "model=custom",
        f"model._target_={HF}",
        "preset=smoke",
        "train.batch_size=8",
        "fault.nan_at_step=2",
        "fault.nan_module=transformer.h.0.mlp",
        f"train.on_nan={on_nan}",
    ).output
    run_dir = only_run(runs)
    steps = read_jsonl(run_dir / "metrics.jsonl")
    epochs = read_jsonl(run_dir / "epochs.jsonl")
    first = [r for r in steps if r["epoch"] == 1]
    assert [r["finite"] for r in first] == [r["step"] != 2 for r in first]
    assert epochs[0]["nonfinite"] == 1 and epochs[0]["steps"] == len(first)
    assert epochs[0]["loss"] == pytest.approx(sum(r["loss"] for r in first if r["finite"]) / (len(first) - 1))
    assert "loss " + format(epochs[0]["loss"], ".3g") + " (1 non-finite step not stepped, not in it)" in out
    assert len(epochs) == (1 if on_nan == "stop" else 2)
    if on_nan == "stop":  # the weights before the NaN step's (unapplied) update
        work = workload(HF)
        work.model.load_state_dict(torch.load(run_dir / "forensics" / "state.pt", weights_only=True)["model"])
        assert math.isfinite(epochs[0]["val_loss"])
        assert epochs[0]["val_loss"] == pytest.approx(work.evaluate()["val_loss"], rel=1e-6)
    else:
        assert epochs[1]["nonfinite"] == 0 and math.isfinite(epochs[1]["loss"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            [
                f"model._target_={HF}",
                "train.batch_size=8",
                "fault.nan_at_step=12",
                "fault.nan_module=transformer.h.0.mlp",
            ],
            "fault.nan_at_step=12 is past the end of the run: it takes 12 steps, numbered 0 to 11 (train.epochs=2 "
            "x 6 batches of train.batch_size=8 from 48 training examples)",
        ),
        (
            [f"model._target_={HF}", "train.batch_size=8", "fault.spike_at_step=40"],
            "fault.spike_at_step=40 is past the end of the run: it takes 12 steps",
        ),
        (
            [f"model._target_={HF}", "train.batch_size=49"],
            f"train.batch_size=49 is more than the training data: model._target_={HF} gives 48 training "
            f"examples; expected at most 48",
        ),
        (["fault.crash_at_step=16"], "fault.crash_at_step=16 is past the end of the run: it takes 16 steps"),
    ],
)
def test_a_fault_step_past_the_end_or_a_batch_larger_than_the_data_is_one_line_before_any_folder(
    args, expected, cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = ["model=custom"] if args[0].startswith("model._target_") else []  # else stab's default model
    result = cli("run", "--runs", tmp_path / "runs", *model, "preset=smoke", *args, ok=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not list((tmp_path / "runs").rglob("status.json"))  # no run folder


# --- Monitor in a plain loop --------------------------------------------------------------------


def _gpt2_loop(
    tmp_path,
    plant_in: str | None,
    at: int = 3,
    batch: bool = True,
    once: bool = False,
    steps: int = 6,
    **monitor_kwargs,
):
    task = __import__("examples.hf", fromlist=["build"]).build()
    model = task["model"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plant = Plant(model.get_submodule(plant_in), at, once) if plant_in else None
    data = task["train"]
    with Monitor(
        model, opt, run_dir=tmp_path / "own", loss=task["loss"], factory=HF, config={}, **monitor_kwargs
    ) as mon:
        for i in range(steps):
            if plant:
                plant.step = mon.global_step
            b = {k: v[8 * i : 8 * (i + 1)] for k, v in data.items()}
            loss = model(**b).loss
            mon.step(loss, batch=b if batch else None)
            if mon.should_stop:
                break
    return mon


def test_monitor_locates_a_nan_in_a_hf_attention_tuple_and_replays_it(tmp_path, one_thread):
    mon = _gpt2_loop(tmp_path, "transformer.h.1.attn")
    ev = mon.summary["first_nan"]
    assert (ev["step"], ev["how"], ev["module"]) == (3, "located", "transformer.h.1.attn")
    assert "located" in mon.summary["evidence"]
    r = replay(tmp_path / "own")  # the factory rebuilds the model; the planted fault is not in it
    assert r.step == 3 and r.module is None and r.cause.startswith("not reproduced")


def test_without_a_batch_or_a_reproduction_the_monitor_ranks_candidates_instead_of_naming_one(tmp_path, one_thread):
    mon = _gpt2_loop(tmp_path / "a", "transformer.h.0.attn", batch=False)
    ev = mon.summary["first_nan"]
    assert ev["how"] == "no batch" and ev["module"] is None and ev["candidates"]
    assert "non-finite loss" in ev["candidates"][0]["why"]
    assert "not located (no batch; candidates:" in mon.summary["evidence"]
    with pytest.raises(ReplayError, match=r"its first non-finite step \(step 3\) was recorded without its batch"):
        replay(tmp_path / "a" / "own")
    once = _gpt2_loop(tmp_path / "b", "transformer.h.0.attn", once=True)  # fires once: the re-run is clean
    ev = once.summary["first_nan"]
    assert ev["how"] == "not reproduced" and ev["module"] is None and ev["forensics"] == "forensics/state.pt"


def test_monitor_records_one_step_per_optimizer_step_under_accumulation(tmp_path, one_thread):
    """accumulate=2 over 5 micro-batches at lr 1e-30 (the weights do not move in float32): 3 records, each loss the mean of its micro-batch
    losses (the weights do not move), the last with 1 micro-batch said in an event."""
    task = __import__("examples.hf", fromlist=["build"]).build()
    model, data = task["model"], task["train"]
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    micro = []
    with Monitor(model, opt, run_dir=tmp_path / "own", loss=task["loss"], accumulate=2) as mon:
        for i in range(5):
            b = {k: v[8 * i : 8 * (i + 1)] for k, v in data.items()}
            loss = model(**b).loss
            micro.append(float(loss.detach()))
            mon.step(loss, batch=b)
    recs = read_jsonl(tmp_path / "own" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2]
    want = [(micro[0] + micro[1]) / 2, (micro[2] + micro[3]) / 2, micro[4]]
    assert [r["loss"] for r in recs] == pytest.approx(want, rel=1e-6)
    ev = [e for e in read_jsonl(tmp_path / "own" / "events.jsonl") if e["event"] == "accumulation_mismatch"]
    assert len(ev) == 1 and (ev[0]["step"], ev[0]["micro_batches"], ev[0]["expected"]) == (2, 1, 2)
    assert mon.summary["accumulation_mismatches"] == 1


def test_monitor_says_what_is_wrong_in_one_line(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"factory cannot take \['widht'\].*its parameters: arch, n_layer"):
        Monitor(
            model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "a", factory=HF, config={"widht": 3}
        )
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Monitor(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"accumulate=0\) is not allowed"):
        Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "c", accumulate=0)
    mon = Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "d")
    with pytest.raises(RuntimeError, match=r"no parameter has a gradient: measure after loss\.backward"):
        mon.after_backward(model(torch.ones(1, 2)).sum())
    mon.close()


def test_monitor_under_a_warmup_from_zero_records_the_planned_lr_and_each_steps_own(tmp_path):
    """A scheduler whose warmup starts at lr 0 (the Trainer's, a LambdaLR) has set lr to 0 before the
    monitor starts: config.yaml records the planned lr (the scheduler's initial_lr), each step the lr it used."""
    import yaml

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2))
    with Monitor(model, opt, run_dir=tmp_path / "own", scheduler=sched) as mon:
        for _ in range(3):
            mon.step(model(torch.ones(4, 2)).pow(2).mean())
    assert yaml.safe_load((tmp_path / "own" / "config.yaml").read_text())["train"]["lr"] == 0.1
    assert [r["lr"] for r in read_jsonl(tmp_path / "own" / "metrics.jsonl")] == pytest.approx([0.0, 0.05, 0.1])
    zero = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ConfigError, match=r"parameter group 0 has lr=0.0 and no scheduler's initial_lr"):
        Monitor(model, zero, run_dir=tmp_path / "zero")


def test_ctrl_c_inside_a_monitor_records_interrupted_and_keeps_the_steps(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    opt.add_param_group({"params": [], "lr": 0.5, "weight_decay": 0.1})
    with pytest.raises(KeyboardInterrupt), Monitor(model, opt, run_dir=tmp_path / "own") as mon:
        for _ in range(3):
            mon.step(model(torch.ones(4, 2)).pow(2).mean())
        raise KeyboardInterrupt
    status = read_json(tmp_path / "own" / "status.json")
    assert status["state"] == "interrupted" and status["error"] == "interrupted (SIGINT)"
    assert len(read_jsonl(tmp_path / "own" / "metrics.jsonl")) == 3
    groups = read_json(tmp_path / "own" / "data.json")["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"], g["n_params"]) for g in groups] == [(0.1, 0.0, 3), (0.5, 0.1, 0)]


# --- Lightning, with accumulation ---------------------------------------------------------------


def lit_build(arch: str = "gpt2") -> dict:
    """A factory whose model is the LightningModule itself, so `stab replay` rebuilds what was run."""
    task = __import__("examples.hf", fromlist=["build"]).build(arch=arch)
    task["model"] = LitLM(task["model"])
    return task


def _lit_module():
    pl = pytest.importorskip("pytorch_lightning")

    class _LitLM(pl.LightningModule):
        def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
            super().__init__()
            self.model, self.lr = model, lr

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return (
                torch.optim.SGD(self.parameters(), lr=self.lr)
                if self.lr < 1e-20
                else torch.optim.AdamW(self.parameters(), lr=self.lr)
            )

    return _LitLM


class LitLM:  # built on first use, so importing this file does not need Lightning
    def __new__(cls, *args, **kwargs):
        return _lit_module()(*args, **kwargs)


def _dict_loader(data: dict, batch: int):
    from torch.utils.data import DataLoader

    rows = [{k: v[i] for k, v in data.items()} for i in range(len(next(iter(data.values()))))]
    return DataLoader(rows, batch_size=batch, shuffle=False)


def test_lightning_with_accumulation_records_optimizer_steps_and_locates_a_planted_nan(tmp_path, one_thread):
    pl = pytest.importorskip("pytorch_lightning")
    from stability.lightning import StabCallback

    task = lit_build()
    lit, data = task["model"], task["train"]
    lit.lr = 1e-30  # weights stay (float32): each step's loss is computable by hand
    micro = [float(lit.model(**{k: v[8 * i : 8 * (i + 1)] for k, v in data.items()}).loss) for i in range(5)]
    runs = tmp_path / "runs"
    cb = StabCallback(str(runs), factory="tests.test_real_models.lit_build", config={})
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=5,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, _dict_loader(data, 8))
    run_dir = only_run(runs)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    want = [(micro[0] + micro[1]) / 2, (micro[2] + micro[3]) / 2, micro[4]]  # not Lightning's loss / 2
    assert [r["loss"] for r in recs] == pytest.approx(want, rel=1e-5)
    assert any(
        e["event"] == "accumulation_mismatch" and e["micro_batches"] == 1 for e in read_jsonl(run_dir / "events.jsonl")
    )

    lit = lit_build()["model"]
    plant = Plant(lit.model.get_submodule("transformer.h.0.mlp"), at=1)
    runs = tmp_path / "nan"
    cb = StabCallback(str(runs), factory="tests.test_real_models.lit_build", config={})

    class Step(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            plant.step = trainer.global_step

    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=6,
        accumulate_grad_batches=2,
        callbacks=[Step(), cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, _dict_loader(lit_build()["train"], 8))
    run_dir = only_run(runs)
    ev = first_nan(run_dir)
    assert (ev["step"], ev["how"], ev["module"]) == (1, "located", "model.transformer.h.0.mlp")
    r = replay(run_dir)  # the factory's LightningModule, the saved micro-batch: the planted fault is gone
    assert r.step == 1 and r.cause.startswith("not reproduced")


# --- the transformers Trainer ------------------------------------------------------------------


def test_trainer_callback_records_accumulated_steps_and_locates_a_planted_nan(tmp_path, one_thread):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from stability.hf import StabTrainerCallback

    def train(runs, plant_in=None, lr=1e-30, steps=3, same=False, loss_type="ForCausalLM"):
        task = __import__("examples.hf", fromlist=["build"]).build()
        model, data = task["model"], task["train"]
        model.loss_type = loss_type  # None: GPT2LMHeadModel as transformers builds it
        ds = [{k: v[0 if same else i] for k, v in data.items()} for i in range(40)]
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_steps=steps,
            learning_rate=lr,
            report_to=[],
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            use_cpu=True,
            dataloader_num_workers=0,
            lr_scheduler_type="constant",
            disable_tqdm=True,
            seed=0,
            data_seed=0,
        )
        with StabTrainerCallback(str(runs), factory=HF, config={}) as cb:
            trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
            if plant_in:
                plant = Plant(model.get_submodule(plant_in), at=1)

                class Step(transformers.TrainerCallback):
                    def on_step_begin(self, args, state, control, **kw):
                        plant.step = state.global_step

                trainer.add_callback(Step())
            trainer.train()
        return only_run(runs), model, trainer

    # every row the same sequence and lr 1e-30 (the weights stay): each step's loss is the model's own
    # mean token loss on that row. GPT-2 takes `num_items_in_batch`, so the Trainer backpropagates each
    # micro-batch's summed token loss over the step's label count; the recorded loss is the mean token
    # loss, whether the Trainer counted the labels after the causal shift (2 x 8 x 7 = 112: loss_type named)
    # or before it (128: GPT2LMHeadModel's loss_type is None, and the Trainer's own loss reads 7/8 of it)
    row = {k: v[:1].repeat(8, 1) for k, v in __import__("examples.hf", fromlist=["build"]).build()["train"].items()}
    for name, loss_type, counted in (("a", "ForCausalLM", 112), ("u", None, 128)):
        run_dir, model, trainer = train(tmp_path / name, same=True, loss_type=loss_type)
        recs = read_jsonl(run_dir / "metrics.jsonl")
        assert [r["step"] for r in recs] == [0, 1, 2] and all(r["finite"] for r in recs)
        with torch.no_grad():
            want = float(model(**row).loss)
        assert [r["loss"] for r in recs] == pytest.approx([want] * 3, rel=1e-5)
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert logged == pytest.approx([want * 112 / counted] * len(logged), rel=1e-4)  # the Trainer's own
        ev = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "loss_normalisation"]
        assert len(ev) == 1 and (ev[0]["num_items_in_batch"], ev[0]["predicted_tokens"]) == (counted, 112)
        assert ("112/128 of the mean" in ev[0]["note"]) == (counted == 128)
    data = read_json(run_dir / "data.json")
    assert data["trainer"]["max_grad_norm"] == 1.0 and "stab clips at max_grad_norm=1.0" in data["trainer"]["clip"]

    run_dir, _, _ = train(tmp_path / "b", plant_in="transformer.h.1.attn", lr=1e-3)
    ev = first_nan(run_dir)
    assert (ev["step"], ev["how"], ev["module"]) == (1, "located", "transformer.h.1.attn")
    assert read_json(run_dir / "status.json")["state"] == "completed"
    r = replay(run_dir)
    assert r.step == 1 and r.cause.startswith("not reproduced")  # the plant is not part of the factory's model


# --- timm ---------------------------------------------------------------------------------------


def test_timm_vit_trains_with_its_final_norm_renamed_and_a_planted_nan_located(cli, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    work = workload("examples.hf.vit")
    assert "norm_module" in work.module_groups() and "norm" not in work.module_groups()  # grad/norm is the total
    runs = tmp_path / "runs"
    cli(
        "run",
        "--runs",
        runs,
        "model=custom",
        "model._target_=examples.hf.vit",
        "preset=smoke",
        "train.batch_size=8",
        "fault.nan_at_step=1",
        "fault.nan_module=blocks.1.attn",
        "train.on_nan=stop",
    )
    ev = first_nan(only_run(runs))
    assert (ev["how"], ev["module"]) == ("located", "blocks.1.attn")
