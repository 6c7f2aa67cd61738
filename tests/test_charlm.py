"""The char LM workload: its corpus and split, presets per model, the text scream check, a real
run through the CLI, and the LR-sensitivity summary."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml

from cli.config import UserError, compose_run
from stability.config import TextDataConfig
from stability.detectors.collapse import loop_share, scream_check
from stability.lr_sensitivity import initial_loss, lr_sensitivity, varies_lr
from stability.record.format import read_grad_table
from stability.workloads.charlm import text
from stability.workloads.charlm.workload import CharLMWorkload
from tests.conftest import only_run, read_json, read_jsonl

CHARLM = ["model=charlm", "preset=smoke", "train.threads=1"]  # one thread: steady on a shared 2-core box


pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedded_corpus_is_stdlib_docstrings_read_deterministically():
    a, files = text.stdlib_corpus(20_000)
    text.stdlib_corpus.cache_clear()
    b, _ = text.stdlib_corpus(20_000)
    assert a == b and len(a) == 20_000 and files >= 1
    assert "Return" in a or "return" in a  # documentation prose, not code


def test_split_is_seeded_and_keeps_every_character():
    corpus, info = text.read_source(TextDataConfig(max_chars=20_000))
    s0 = text.split_text(corpus, TextDataConfig(seed=0, max_chars=20_000), info)
    again = text.split_text(corpus, TextDataConfig(seed=0, max_chars=20_000), info)
    s1 = text.split_text(corpus, TextDataConfig(seed=1, max_chars=20_000), info)
    assert torch.equal(s0.val, again.val) and not torch.equal(s0.val, s1.val)
    assert len(s0.train) + len(s0.val) == len(corpus)
    assert 0.05 < len(s0.val) / len(corpus) < 0.15  # val_fraction 0.1 of the chunks
    tok = s0.tokenizer
    assert tok.decode(tok.encode("def f():")) == "def f():"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"caf\xe9 latin-1, not UTF-8 " * 200, "expected a UTF-8 text file (byte 3 is not UTF-8"),
        (b"too short", "is too short: 9 characters"),
    ],
    ids=["missing", "latin-1", "too-short"],
)
def test_a_bad_text_file_is_refused_before_any_work_naming_the_file(cli, tmp_path, content, message):
    path = tmp_path / "book.txt"
    if content is not None:
        path.write_bytes(content)
    result = cli("run", "--runs", tmp_path / "runs", *CHARLM, f"data.path={path}", ok=False)
    assert result.exit_code == 2
    assert f"data.path='{path}'" in result.output and message in result.output
    assert not list((tmp_path / "runs").rglob("status.json"))  # nothing started


def test_presets_apply_per_model():
    cascade = compose_run(["preset=smoke"])  # the cascade's smoke preset, as it always was
    assert cascade.model.d_model == [32, 32, 32] and cascade.model.n_layers == [2, 2, 2]
    assert (cascade.data.name, cascade.data.n_train, cascade.data.seconds) == ("synthetic", 16, 1.0)
    assert (cascade.train.epochs, cascade.train.lr, cascade.train.batch_size) == (4, 1e-2, 4)
    lm = compose_run(["model=charlm", "preset=smoke"])
    assert (lm.model.name, lm.model.d_model, lm.model.n_layers, lm.data.name) == ("charlm", 32, 2, "text")
    assert lm.fault.nan_module == "layer0.mlp"
    assert compose_run(["model=charlm", "preset=gpu"]).model.d_model > compose_run(["model=charlm"]).model.d_model
    with pytest.raises(
        UserError, match=r"preset='seed' is not allowed with model=charlm: expected one of default, gpu, smoke"
    ):
        compose_run(["model=charlm", "preset=seed"])
    with pytest.raises(UserError, match=r"residual=0.3 is not allowed with model=charlm: it does not read residual"):
        compose_run(["model=charlm", "residual=0.3"])
    with pytest.raises(UserError, match=r"data.name='synthetic' is not allowed: expected text with model=charlm"):
        compose_run(["model=charlm", "data=synthetic"])


def test_loop_share_finds_short_loops_not_ordinary_repetition():
    assert loop_share("eeeeeeee", 3) == 1.0
    assert loop_share("Return the e e e e e ", 3) == pytest.approx(12 / 21)
    assert loop_share("the the the the ", 3) == 0.0  # period 4: greedy repetition, not a collapse
    assert loop_share("abcdefgh", 3) == 0.0
    out = {"dominant": 0.5, "longest_run": 0.05, "loop": 1.0}
    real = {"dominant": 0.18, "longest_run": 0.03, "loop": 0.0}
    assert scream_check(out, real, 0.6, 0.5, loop=0.5)
    assert not scream_check(out, real, 0.6, 0.5)  # without the loop criterion (the cascade's check)


def test_a_char_lm_forced_to_collapse_is_flagged_with_its_generated_text():
    cfg = compose_run(["model=charlm", "preset=smoke"])
    torch.manual_seed(0)
    work = CharLMWorkload(cfg, torch.device("cpu"))
    e = work.tokenizer.index["e"]

    def scream(module, args, logits):  # every position predicts 'e'
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(e), logits.shape[-1])

    handle = work.model.lm_head.register_forward_hook(scream)
    ev = work.evaluate()
    handle.remove()
    assert ev["collapsed"] is True
    assert ev["scores"]["dominant"] == 1.0 and ev["scores"]["longest_run"] == 1.0
    assert ev["target_scores"]["dominant"] < 0.6  # the real continuations are not degenerate
    assert len(ev["samples"]) == cfg.detect.scream.items
    for s in ev["samples"]:
        assert s["output"] == "e" * cfg.detect.scream.gen_chars and len(s["prompt"]) == cfg.detect.scream.prompt_chars
    assert work.evaluate()["samples"][0]["output"] != "e" * cfg.detect.scream.gen_chars  # hook removed


def test_z_loss_reaches_the_char_lm_loss():
    base = compose_run(["model=charlm", "preset=smoke"])
    with_z = compose_run(["model=charlm", "preset=smoke", "z_loss=1e-2"])
    torch.manual_seed(0)
    w0 = CharLMWorkload(base, torch.device("cpu"))
    torch.manual_seed(0)
    w1 = CharLMWorkload(with_z, torch.device("cpu"))
    batch = w0.batch(torch.arange(4))
    log_z = torch.logsumexp(w0.model(batch[0]).float(), -1)
    assert (w1.loss(batch) - w0.loss(batch)).item() == pytest.approx(1e-2 * log_z.pow(2).mean().item(), rel=1e-3)


def test_a_short_char_lm_run_lowers_the_loss_and_stores_its_generations(cli, tmp_path):
    result = cli("run", "--runs", tmp_path, *CHARLM, "norm=pre")
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["verdict"] in result.output and summary["first_nan"] is None
    first = initial_loss(run)
    assert math.isfinite(first) and summary["loss_by_epoch"][-1] < first - 0.5  # from ~ln(vocab) down
    assert summary["val_loss_by_epoch"][-1] < summary["val_loss_by_epoch"][0]
    data = read_json(run / "data.json")
    assert data["source"] == "stdlib-docstrings" and data["vocab"] > 30 and len(data["prompts"]) == 4
    epochs = read_jsonl(run / "epochs.jsonl")
    assert all(len(e["samples"]) == 4 and isinstance(e["collapsed"], bool) for e in epochs)
    assert {"dominant", "longest_run", "distinct_4", "seq_rep_4", "loop"} <= set(epochs[-1]["scores"])
    samples = (run / "samples.txt").read_text()
    assert samples.count("=== epoch") == 4 * len(epochs) and epochs[-1]["samples"][0]["output"] in samples
    groups = read_grad_table(run / "grad_norms.csv")["group"]
    assert {"total", "embedding", "layer0.attn", "layer1.mlp", "layer0.norm", "final_norm", "lm_head"} <= set(groups)


def test_an_injected_nan_in_the_char_lm_is_found_in_its_module(cli, tmp_path):
    cli("run", "--runs", tmp_path, *CHARLM, "fault.nan_at_step=3", "fault.nan_module=layer1.attn")
    nan = read_json(only_run(tmp_path) / "summary.json")["first_nan"]
    assert (nan["step"], nan["module"]) == (3, "layer1.attn")


def test_lr_sensitivity_is_the_mean_loss_lost_over_the_lr_grid():
    rows = []
    for qk, finals in (("false", [2.0, 1.5, math.nan]), ("true", [1.6, 1.5, 1.7])):
        for lr, final in zip((1e-3, 1e-2, 1e-1), finals):
            rows.append({"qk_norm": qk, "train.lr": str(lr), "initial_loss": 4.0, "final_loss": final})
    rows.append({"qk_norm": "true", "train.lr": "0.1", "initial_loss": 4.0, "final_loss": 1.9})  # a 2nd seed
    frame = pd.DataFrame(rows)
    assert varies_lr(frame) and not varies_lr(frame[frame["train.lr"] == "0.01"])
    out = lr_sensitivity(frame).set_index("qk_norm")
    # qk_norm=false: the diverged lr 0.1 counts as the initial loss 4.0: mean(0.5, 0, 2.5)
    assert out.loc["false", "lr_sensitivity"] == pytest.approx((0.5 + 0.0 + 2.5) / 3)
    assert out.loc["false", "n_diverged"] == 1 and out.loc["false", "best_lr"] == 1e-2
    # qk_norm=true: lr 0.1 averages its two seeds (1.8): mean(0.1, 0, 0.3)
    assert out.loc["true", "lr_sensitivity"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert list(lr_sensitivity(frame)["qk_norm"]) == ["true", "false"]  # most robust first
    assert math.isnan(lr_sensitivity(frame[frame["train.lr"] == "0.01"])["lr_sensitivity"][0])


def test_every_stabilizer_at_once_trains_the_char_lm(cli, tmp_path):
    on = [
        "norm=deepnorm",
        "qk_norm=true",
        "sigma_reparam=true",
        "v_scale=true",
        "z_loss=1e-4",
        "spectral_norm=true",
        "warmup=5",
    ]
    cli("run", "--runs", tmp_path, *CHARLM, "train.epochs=1", *on)
    run = only_run(tmp_path)
    summary, steps = read_json(run / "summary.json"), read_jsonl(run / "metrics.jsonl")
    assert summary["verdict"] != "failed" and all(s["finite"] for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: cfg["model"][k] for k in ("norm", "qk_norm", "sigma_reparam", "v_scale", "z_loss", "spectral_norm")} == {
        "norm": "deepnorm",
        "qk_norm": True,
        "sigma_reparam": True,
        "v_scale": True,
        "z_loss": 1e-4,
        "spectral_norm": True,
    }
    assert cfg["train"]["warmup"] == 5
