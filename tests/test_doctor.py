"""`stab doctor`: each rule on hand-made records (it fires on its signature and on nothing else,
and never on a stable run's records), then one real `doctor --try` on the smoke preset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from stability import doctor as dr
from stability.config import OPERATIONAL_KEYS
from stability.record import verdicts as vd
from stability.storage import append_jsonl, read_jsonl, write_json
from tests.conftest import only_run, read_json

GROUPS = ["stage0.in_proj", "stage2.layer0.attn", "stage2.layer0.mlp", "stage2.output_proj"]
CONFIG = {
    "seed": 0,
    "model": {
        "name": "cascade",
        "norm": "post",
        "residual": [1.0, 1.0, 0.1],
        "qk_norm": False,
        "spectral_norm": False,
        "rms_clamp": [0.7, 1.5],
    },
    "train": {"lr": 0.01, "warmup": 10, "clip": 10.0},
    "detect": {
        "logit_growth": 10.0,
        "clamp_warn": 0.5,
        "spike_window": 20,
        "spike_z": 6.0,
        "spike_warmup": 10,
        "spike_ratio": 3.0,
    },
}


ALIAS = {
    "norm": "model.norm",
    "qk_norm": "model.qk_norm",
    "spectral_norm": "model.spectral_norm",
    "residual": "model.residual",
    "warmup": "train.warmup",
    "clip": "train.clip",
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def stable_steps(n: int = 96, seed: int = 0) -> list[dict]:
    """A stable run's step records: loss falling from 25 to 1 with noise, grad norms flat with noise,
    no clamp bound, clipping never."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        rec = {
            "step": s,
            "epoch": s // 8 + 1,
            "batch": s % 8,
            "loss": float(25 * np.exp(-s / 30) + 1 + 0.1 * rng.random()),
        }
        rec["grad/norm"] = float(2.0 + 0.3 * rng.random())
        for g in GROUPS:
            rec[f"grad/{g}"] = float(0.5 + 0.1 * rng.random())
        rec["grad/clipped"] = False
        rec["lr"] = 0.01 * min(1.0, (s + 1) / 11)
        for i in range(3):
            rec[f"stage{i}/ratio"], rec[f"stage{i}/clamped"] = 1.0, False
        rec["finite"] = True
        out.append(rec)
    return out


def stable_epochs(steps: list[dict]) -> list[dict]:
    out = []
    for e in sorted({r["epoch"] for r in steps}):
        g = [r["grad/norm"] for r in steps if r["epoch"] == e]
        out.append(
            {
                "epoch": e,
                "grad_norm_mean": float(np.mean(g)),
                "grad_norm_max": float(np.max(g)),
                "val_loss": float(np.mean([r["loss"] for r in steps if r["epoch"] == e])),
                "health_summary": {"attn_logit_max": 3.0 + 0.1 * e},
                "health": {"stage2.layer0": {"attn_logit_max": 3.0}},
            }
        )
    return out


def write_run(
    folder: Path,
    steps: list[dict],
    epochs: list[dict] | None = None,
    verdict: str = "stable",
    config: dict | None = None,
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    append_jsonl(folder / "metrics.jsonl", steps)
    append_jsonl(folder / "epochs.jsonl", epochs if epochs is not None else stable_epochs(steps))
    write_json(folder / "summary.json", {"verdict": verdict, "evidence": "hand-made", "final_val_loss": 1.0})
    return folder


def kinds(folder: Path) -> set[str]:
    return {f.kind for f in dr.find(dr.read_run(folder))}


def fixes(folder: Path) -> list[str]:
    return [x.label for x in dr.examine(dr.read_run(folder)).fixes]


def test_a_stable_runs_records_trigger_no_rule(tmp_path):
    run = write_run(tmp_path / "stable", stable_steps())
    assert kinds(run) == set()
    assert fixes(run) == []


def test_growth_that_starts_in_one_group_of_a_post_norm_stack_is_located_and_answered_by_pre_norm(tmp_path):
    steps = stable_steps()
    for r in steps[30:]:  # stage2.layer0.attn leaves its baseline at step 30 and grows 1.5x per step ...
        r["grad/stage2.layer0.attn"] = 0.5 * 1.5 ** (r["step"] - 29)
        r["grad/norm"] = math.hypot(2.0, r["grad/stage2.layer0.attn"])
    for r in steps[38:]:  # ... the loss follows 8 steps later, then the run ends in NaN
        r["loss"] = 20.0 * 1.3 ** (r["step"] - 38)  # 20 against a lowest loss of about 9: 2.2x
    steps[60]["grad/norm"] = steps[60]["loss"] = math.nan
    steps = steps[:61]
    run = write_run(tmp_path / "grows", steps, verdict="nan")
    dx = dr.examine(dr.read_run(run))
    first = dx.first
    assert first.kind == "grad_departure" and first.detail["group"] == "stage2.layer0.attn"
    # its median over the 8 steps after warmup is 0.55: 0.5 * 1.5^6 = 5.7 passes 10x at step 35; the loss rises at 38
    assert first.step == 35 and first.detail["lead"] == 38 - 35
    assert {f.kind for f in dx.findings} == {"grad_departure", "unstable"}
    assert [x.label for x in dx.fixes][0] == "norm=pre"
    pre = write_run(
        tmp_path / "grows-pre", steps, verdict="nan", config={**CONFIG, "model": {**CONFIG["model"], "norm": "pre"}}
    )
    assert "norm=pre" not in fixes(pre)  # already pre-norm: the rule does not repeat it


def test_a_nan_before_warmup_ends_names_the_module_the_run_located_and_an_injected_one_gets_no_fix(tmp_path):
    steps = stable_steps()[:5]
    steps[4]["loss"] = steps[4]["grad/norm"] = steps[4]["grad/stage2.layer0.mlp"] = math.nan
    nan = {"epoch": 1, "batch": 4, "step": 4, "kind": "loss", "module": "stage2.layer0.mlp"}
    run = write_run(tmp_path / "nan", steps, verdict="nan")
    write_json(run / "summary.json", {"verdict": "nan", "evidence": "hand-made", "first_nan": nan})
    dx = dr.examine(dr.read_run(run))
    assert dx.first.kind == "grad_departure" and dx.first.step == 4 and dx.first.detail["group"] == "stage2.layer0.mlp"
    assert [x.label for x in dx.fixes] == ["norm=pre", "train.lr=0.00333"]
    faulty = write_run(
        tmp_path / "injected",
        steps,
        verdict="nan",
        config={**CONFIG, "fault": {"nan_at_step": 4, "nan_module": "stage2.layer0.mlp"}},
    )
    write_json(faulty / "summary.json", {"verdict": "nan", "evidence": "hand-made", "first_nan": nan})
    dx = dr.examine(dr.read_run(faulty))
    assert "injected_fault" in {f.kind for f in dx.findings} and dx.fixes == []


def test_attention_past_its_absolute_level_proposes_qk_norm_and_growth_from_a_tiny_start_does_not(tmp_path):
    steps = stable_steps()
    epochs = stable_epochs(steps)
    for e in epochs:
        e["health_summary"]["attn_logit_max"] = 2.0 * 3 ** e["epoch"]  # 6, 18, 54, 162, ...
        e["health"] = {
            "stage2.layer0": {"attn_logit_max": 2.0 * 3 ** e["epoch"]},
            "stage0.layer0": {"attn_logit_max": 2.0},
        }
    run = write_run(tmp_path / "logits", steps, epochs)
    assert kinds(run) == {"attn_logit"}
    f = next(f for f in dr.find(dr.read_run(run)) if f.kind == "attn_logit")
    assert f.epoch == 3 and "stage2.layer0" in f.evidence  # 54 >= detect.attn_logit_max 50 at epoch 3
    assert fixes(run) == ["qk_norm=true"]
    # the healthy run: 0.23 -> 2.45, 10x growth, far below any level: no finding
    for e in epochs:
        e["health_summary"]["attn_logit_max"] = 0.23 * 10 ** ((e["epoch"] - 1) / (len(epochs) - 1))
    assert kinds(write_run(tmp_path / "healthy", steps, epochs)) == set()
    # a logit at 5e8 from the first epoch on has not grown at all, and is near one-hot attention all along
    for e in epochs:
        e["health_summary"]["attn_logit_max"] = 5e8
    assert kinds(write_run(tmp_path / "hot", steps, epochs)) == {"attn_logit"}
    # entropy collapse alone (logits moderate) is the same finding
    for e in epochs:
        e["health_summary"] = {"attn_logit_max": 3.0, "attn_entropy_min": 0.01 if e["epoch"] >= 5 else 1.5}
    flat_run = write_run(tmp_path / "entropy", steps, epochs)
    f = next(f for f in dr.find(dr.read_run(flat_run)) if f.kind == "attn_logit")
    assert f.epoch == 5 and "entropy 0.01 nats" in f.evidence


def test_a_saturated_last_stage_clamp_proposes_a_larger_residual(tmp_path):
    steps = stable_steps()
    for r in steps:
        r["stage2/ratio"], r["stage2/clamped"] = 1.9, True
    run = write_run(tmp_path / "clamp", steps)
    assert kinds(run) == {"clamp_saturated"}
    assert fixes(run) == ["residual=0.3"]
    for r in steps:  # bound at the lower side: a larger residual would make it worse; no fix proposed
        r["stage2/ratio"] = 0.5
    low = write_run(tmp_path / "clamp-low", steps)
    assert kinds(low) == {"clamp_saturated"} and fixes(low) == []


def test_clipping_on_every_step_proposes_a_lower_learning_rate(tmp_path):
    steps = stable_steps()
    for r in steps:
        r["grad/clipped"] = True
    run = write_run(tmp_path / "clip", steps)
    assert kinds(run) == {"clip_always"}
    assert fixes(run) == ["train.lr=0.00333"]


def test_a_loss_spike_at_the_end_of_warmup_proposes_longer_warmup_then_lower_lr(tmp_path):
    steps = stable_steps()
    steps[12]["loss"] = 200.0
    run = write_run(tmp_path / "warmup", steps)
    assert kinds(run) == {"warmup_spike"}
    assert fixes(run) == ["warmup=40", "train.lr=0.00333"]
    late = stable_steps()
    late[60]["loss"] = 200.0  # the same spike long after warmup is not this signature
    assert kinds(write_run(tmp_path / "late", late)) == set()


def test_an_output_projection_that_dominates_the_peak_proposes_spectral_norm(tmp_path):
    steps = stable_steps()
    for r in steps[40:50]:
        r["grad/stage2.output_proj"] = 400.0
        r["grad/norm"] = math.hypot(2.0, 400.0)
    run = write_run(tmp_path / "outproj", steps, verdict="exploding")
    dx = dr.examine(dr.read_run(run))
    assert {"grad_departure", "output_proj_gradient"} <= {f.kind for f in dx.findings}
    assert "spectral_norm=true" in [x.label for x in dx.fixes]
    assert dx.first.detail["group"] == "stage2.output_proj"


def test_a_folder_without_step_records_is_refused_in_one_line(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("doctor", tmp_path / "empty", ok=False)
    assert result.exit_code == 2 and "holds no step records" in result.output


@pytest.mark.slow
def test_doctor_try_trains_the_fixes_from_the_failed_runs_exact_config(cli, tmp_path):
    """A smoke run that explodes (lr 1, no clip); --try trains the two best fixes and both together
    from its exact config and seed, and reports each job's own verdict and validation loss."""
    failing = ["preset=smoke", "train.lr=1", "clip=none", "seed=3"]
    cli("run", "--runs", tmp_path, *failing)
    run = next((tmp_path / "run").iterdir())
    before = read_json(run / "summary.json")
    assert vd.is_unstable(before["verdict"]), before["verdict"]
    result = cli("doctor", run, "--try", "--fixes", "2", "--runs", tmp_path, "--name", "try")
    assert "what went wrong first" in result.output
    res = read_json(tmp_path / "try" / "doctor.json")
    ranked = [x.label for x in dr.examine(dr.read_run(run)).fixes]
    assert [t["fix"] for t in res["tries"]] == ranked[:2] + [" ".join(ranked[:2])]
    failed_cfg = yaml.safe_load((run / "config.yaml").read_text())
    for t in res["tries"]:
        folder = tmp_path / "try" / t["folder"]
        summary = read_json(folder / "summary.json")
        assert t["verdict"] == summary["verdict"]
        assert t["final_val_loss"] == pytest.approx(summary["final_val_loss"], nan_ok=True)
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert cfg["seed"] == 3 and cfg["train"]["stop_early"] is True
        changed = {k for k, v in flat(cfg).items() if flat(failed_cfg).get(k) != v} - {
            "train.stop_early",
            *OPERATIONAL_KEYS,
        }
        assert changed == {ALIAS.get(o.split("=")[0], o.split("=")[0]) for o in t["fix"].split()}
    assert res["fixed"] == [t["fix"] for t in res["tries"] if not vd.is_unstable(t["verdict"])]
    assert ("fixed by" in res["sentence"]) == bool(res["fixed"])


@pytest.mark.slow
def test_a_custom_model_is_offered_only_fixes_it_reads_and_try_trains_them(cli, tmp_path):
    """The newcomer's case (F4) on examples.gpt, whose factory declares norm but not qk_norm: at lr
    10 its attention goes one-hot and its loss ends above where it started. The doctor names
    qk_norm=true as a fix the model cannot take (with `stab run`'s reason) instead of ranking it
    (and --try died on it, training nothing), offers a warmup no longer than half the run's 24
    steps (it offered 40), and --try trains the fixes it ranks. The warmup fix sets train.warmup,
    which the run was given: `warmup=12` there is a short name nothing reads, refused."""
    tiny = ["model=custom", "model._target_=examples.gpt.build", "+model.max_chars=2500", "+model.context=16"]
    tiny += ["+model.width=16", "train.epochs=3", "train.batch_size=16"]
    cli("run", "--runs", tmp_path / "runs", *tiny, "train.lr=10", "clip=none", "train.warmup=10")
    run = only_run(tmp_path / "runs")
    summary = read_json(run / "summary.json")
    assert vd.is_unstable(summary["verdict"]) and summary["steps"] == 24, summary["verdict"]
    assert any(w["warning"] in ("attn_logit", "attn_entropy_collapse") for w in summary["warnings"])
    result = cli("doctor", run)
    assert "not proposed, the model cannot take it: qk_norm=true (qk_norm=True is not allowed" in result.output
    from cli.doctor_try import exact_overrides, model_refusal

    rec = dr.read_run(run)
    dx = dr.examine(rec, refuse=model_refusal(exact_overrides(rec)))
    assert [x.label for x, _ in dx.refused] == ["qk_norm=true"]
    assert "does not read qk_norm" in dx.refused[0][1]
    ranked = [x.label for x in dx.fixes]
    assert "qk_norm=true" not in ranked and "warmup=12" in ranked[:2], ranked  # 4 x 10 capped at 24 // 2
    result = cli("doctor", run, "--try", "--fixes", "2", "--runs", tmp_path, "--name", "try")
    res = read_json(tmp_path / "try" / "doctor.json")
    assert [t["fix"] for t in res["tries"]] == ranked[:2] + [" ".join(ranked[:2])]
    for t in res["tries"]:
        folder = tmp_path / "try" / t["folder"]
        assert t["verdict"] == read_json(folder / "summary.json")["verdict"]
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert cfg["train"]["warmup"] == (12 if "warmup=12" in t["fix"] else 10)


def test_a_nan_in_the_data_is_named_as_the_data_and_gets_no_training_fix(cli, tmp_path, monkeypatch):
    """The newcomer's ViT with one NaN pixel in a training image: the first NaN is located in the
    patch embedding, and the run, `stab show` and the doctor say the batch itself held it. The
    doctor ranked `train.lr=0.001` first ("unstable at this learning rate"): no learning rate
    fixes a NaN in the data."""
    (tmp_path / "nan_vit.py").write_text(
        "from examples.vit import build as vit\n\n\n"
        "def build(n: int = 128):\n"
        "    parts = vit(n=n)\n"
        "    x, y = parts['train']\n"
        "    x = x.clone()\n"
        "    x[30].view(-1)[0] = float('nan')\n"
        "    parts['train'] = (x, y)\n"
        "    return parts\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("run", "--runs", tmp_path / "runs", "model=custom", "model._target_=nan_vit.build", "preset=smoke")
    run = only_run(tmp_path / "runs")
    summary = read_json(run / "summary.json")
    (ev,) = [e for e in read_jsonl(run / "events.jsonl")[0] if e["event"] == "first_nan"]
    assert summary["verdict"] == "nan" and ev["batch_finite"] is False and ev["module"].startswith("embed")
    assert "the input batch itself holds NaN or inf (the data)" in " ".join(result.output.split())
    rec = dr.read_run(run)
    dx = dr.examine(rec)
    assert dx.first is not None and dx.first.kind == "data_nonfinite" and dx.fixes == []
    out = " ".join(cli("doctor", run).output.split())
    assert f"batch {ev['batch']} (step {ev['step']}) holds NaN or inf in its own tensors" in out
    assert "no candidate fix: the data is non-finite: clean or filter it" in out and "train.lr=" not in out
