"""The run config's schema (stability/config/): `conf/` and the pydantic models agree, bad values
get one line naming the key, the value and what is allowed, and a validated config is never
changed in place (operational values come in through `resolve`, as a new config)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pydantic import ValidationError

from cli.config import ALIASES, CONF_DIR, GROUP_KEYS, compose_config, compose_run
from stability.config import (
    SHORT_NAMES,
    CharLMConfig,
    ConfigError,
    CustomModelConfig,
    DataConfig,
    ModelConfig,
    NoDataConfig,
    RunConfig,
    TextDataConfig,
    TrainConfig,
    flatten,
)

# Each model's schema defaults: the model and the data it reads, every other section as declared.
DEFAULTS = {
    "cascade": RunConfig(),
    "charlm": RunConfig(model=CharLMConfig(), data=TextDataConfig()),
    "custom": RunConfig(model=CustomModelConfig(target="examples.gpt.build"), data=NoDataConfig()),
}
# Schema keys that conf/ leaves out on purpose: folder-only keys are in data/folder.yaml, not in
# data/synthetic.yaml; a factory's own keys are whatever the user gives it.
NOT_IN_YAML = {"cascade": {"data.path", "data.on_bad_file"}, "charlm": set(), "custom": {"model.params"}}


def _composed(model: str) -> dict:
    """conf/config.yaml with model=MODEL and its data, no preset: the defaults as YAML has them."""
    extra = ["model._target_=examples.gpt.build"] if model == "custom" else []
    cfg = compose_config([f"model={model}", "~model_preset", *extra])
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    for key in (*ALIASES, *GROUP_KEYS):
        raw.pop(key, None)
    return raw


def _model_file_overrides(model: str) -> set[str]:
    """Keys a global-packaged model file sets outside `model:` (the char LM's batch size and
    fault target): the model's choice, not the sections' defaults."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
    sets = OmegaConf.to_container(node, resolve=False)
    assert isinstance(sets, dict)
    if "model" not in sets:  # packaged under model: nothing outside it
        return set()
    return set(flatten({s: v for s, v in sets.items() if s not in ("model", "defaults")}))


@pytest.mark.parametrize("model", sorted(DEFAULTS))
def test_conf_defaults_and_the_schema_defaults_agree(model):
    raw = _composed(model)
    schema = flatten(DEFAULTS[model].to_dict(), keep_empty=True)
    yaml_keys = set(flatten(raw))
    assert yaml_keys - set(schema) == set(), "keys in conf/ that the schema does not have"
    missing = set(schema) - yaml_keys - {"model.params"} - NOT_IN_YAML[model]
    assert missing == set(), "schema keys with no default in conf/"
    # The composed YAML, validated, is the schema's default, but for what the model file chooses.
    composed = flatten(RunConfig.from_dict(raw).to_dict(), keep_empty=True)
    own = _model_file_overrides(model)
    differ = {k: (composed[k], schema[k]) for k in schema if k not in own and composed[k] != schema[k]}
    assert differ == {}, "conf/ default -> schema default"
    if model == "charlm":  # the model file's choices are real differences, so the check can fail
        assert own == {"train.batch_size", "fault.nan_module"}
        assert (composed["train.batch_size"], schema["train.batch_size"]) == (32, 8)


def _presets() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in (CONF_DIR / "model_preset").glob("*/*.yaml"))


@pytest.mark.parametrize("model,preset", _presets())
def test_every_preset_composes_to_a_valid_config(model, preset):
    extra = ["model._target_=examples.gpt.build"] if model == "custom" else []
    cfg = compose_run([f"model={model}", f"preset={preset}", *extra])
    assert cfg.model.name == model
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model_preset" / model / f"{preset}.yaml"))
    values = flatten(cfg.to_dict(), keep_empty=True)
    for key, want in flatten(node).items():  # each preset value arrives where the schema keeps it
        got = SHORT_NAMES[key].read(cfg) if key in SHORT_NAMES else values[key]
        if isinstance(got, list) and not isinstance(want, list):
            got = got[0] if len(set(got)) == 1 else got  # a per-stage knob given once
        assert got == want or (isinstance(want, (int, float)) and math.isclose(got, want)), key


@pytest.mark.parametrize(
    "raw, line",
    [
        # what a run folder's config.yaml can hold that Hydra's struct mode never sees
        (
            {"train": {"lrr": 1e-3}},
            "unknown key 'train.lrr': allowed keys under train are backoff_factor, backoff_steps, batch_size, "
            "betas, clip, compile, device, epochs, lr, on_nan, on_spike, precision, rewind_from, snapshot_every, "
            "snapshot_keep, spike_sigma, spike_window, stop_early, sync_every, threads, update_clip, warmup, "
            "weight_decay; did you mean train.lr?",
        ),
        ({"trian": {}}, "did you mean train?"),
        ({"detect": {"scream": {"dominat": 0.5}}}, "did you mean detect.scream.dominant?"),
        ({"model": {"name": "cascade", "context": 64}}, "unknown key 'model.context': allowed keys under model are"),
        (
            {"model": {"name": "charlmm"}},
            "model.name='charlmm' is not allowed: expected one of cascade, charlm, custom; did you mean charlm?",
        ),
        ({"data": {"name": "synthtic"}}, "expected one of synthetic, folder, text, none; did you mean synthetic?"),
        ({"data": {"codec": 5}}, "data.codec=5 is not allowed: expected a mapping"),
        ({"model": 5}, "model=5 is not allowed: expected a mapping"),
        ({"train": {"clip": -1}}, "clip=-1 is not allowed: expected none or a positive number (total gradient norm)"),
        ({"train": {"clip": 0}}, "clip=0 is not allowed: expected none or a positive number"),
        ({"train": {"clip": math.nan}}, "clip=nan is not allowed: expected none or a positive number"),
        ({"train": {"lr": -1}}, "train.lr=-1 is not allowed: expected a number > 0.0 and <= 10.0"),
        ({"train": {"lr": "abc"}}, "train.lr='abc' is not allowed: expected a number > 0.0 and <= 10.0"),
        ({"train": {"lr": math.inf}}, "train.lr=inf is not allowed: expected a finite number > 0.0 and <= 10.0"),
        ({"train": {"epochs": 2.5}}, "train.epochs=2.5 is not allowed: expected an integer >= 1"),
        ({"train": {"epochs": True}}, "train.epochs=True is not allowed: expected an integer >= 1"),
        ({"train": {"warmup": -1}}, "warmup=-1 is not allowed: expected an integer >= 0"),
        ({"train": {"device": "gpu"}}, "train.device='gpu' is not allowed: expected auto, cpu, cuda or cuda:N"),
        ({"train": {"betas": [0.9, 1.5]}}, "train.betas[1]=1.5 is not allowed: expected a number >= 0.0 and <= 0.9999"),
        ({"model": {"norm": "prenorm"}}, "norm='prenorm' is not allowed: expected one of pre, post, deepnorm; did you"),
        ({"model": {"qk_norm": "yes"}}, "qk_norm='yes' is not allowed: expected true or false"),
        ({"model": {"residual": [1, 1, -1]}}, "residual=-1 is not allowed: expected a number >= 0.0 and <= 10.0"),
        ({"model": {"residual": [1, -1, 1]}}, "model.residual[1]=-1 is not allowed"),
        ({"model": {"d_model": [64, 96]}}, "model.d_model=[64, 96] is not allowed: expected one value or a list of 3"),
        ({"model": {"n_heads": 5}}, "model.n_heads[0]=5 is not allowed: expected a divisor of model.d_model[0]=64"),
        ({"model": {"rms_clamp": [0, 1.5]}}, "model.rms_clamp[0]=0 is not allowed: expected a number > 0.0 and <= 1.0"),
        ({"model": {"rms_clamp": [0.7, "x"]}}, "model.rms_clamp[1]='x' is not allowed: expected a number >= 1.0"),
        ({"model": {"rms_clamp": 0.7}}, "model.rms_clamp=0.7 is not allowed: expected [lo, hi] with 0 < lo <= 1 <= hi"),
        ({"detect": {"scream": {"n": 20}}}, "detect.scream.n=20 is not allowed: expected an integer >= 1 and <= 16"),
        ({"data": {"name": "folder"}}, "data.path=None is not allowed: expected the folder holding input/ and target/"),
        ({"data": {"name": "text"}}, "data.name='text' is not allowed: expected audio data with model=cascade"),
        ({"listen": {"epochs": [1, "x"]}}, "listen.epochs[1]='x' is not allowed: expected an integer >= 1"),
        ({"listen": {"epochs": [9]}}, "listen.epochs=[9] is not allowed: expected epochs between 1 and train.epochs=5"),
        (
            {"margin": {"lo": 0.5, "hi": 0.1}},
            "margin.hi=0.1 is not allowed: expected a learning rate above margin.lo=0.5",
        ),
        ({"log": ["tensorboard", "x"]}, "log='x' is not allowed: expected one of tensorboard, mlflow, wandb"),
        ({"model": {"name": "custom"}, "data": {"name": "none"}}, "model._target_=None is not allowed: expected the"),
        ({"fault": {"nan_module": 5}}, "fault.nan_module=5 is not allowed: expected a string"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(raw, line):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(raw)
    assert line in str(e.value) and "\n" not in str(e.value)


def test_a_section_built_directly_names_its_full_key():
    with pytest.raises(ConfigError, match=r"^train\.lr=-1 is not allowed: expected a number > 0\.0"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^data\.path=None is not allowed"):
        DataConfig(name="folder")
    with pytest.raises(ConfigError, match=r"^model\.n_heads=3 is not allowed: expected a divisor of model\.d_model=64"):
        CharLMConfig(n_heads=3)


def test_a_validated_config_is_frozen_and_resolve_makes_a_new_one():
    cfg = compose_run(["preset=smoke"])
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.threads = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model = ModelConfig()  # type: ignore[misc]
    resolved = cfg.resolve(threads=2, device="cpu")
    assert (resolved.train.threads, resolved.train.device) == (2, "cpu")
    assert (cfg.train.threads, cfg.train.device) == (None, "auto")  # the original is unchanged
    assert resolved.identity() == cfg.identity()  # operational: not part of the run's identity
    assert resolved.to_dict() == {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "threads": 2, "device": "cpu"}}
    assert cfg.resolve() is cfg
    with pytest.raises(ConfigError, match=r"^train\.device='gpu' is not allowed"):
        cfg.resolve(device="gpu")
    with pytest.raises(ConfigError, match=r"^train\.threads=0 is not allowed"):
        cfg.resolve(threads=0)


def test_a_run_folders_config_reads_back_to_the_same_identity(tmp_path: Path):
    for overrides in (["norm=pre", "clip=none"], ["model=charlm", "qk_norm=true"], ["model.n_heads=[2,4,8]"]):
        cfg = compose_run(overrides)
        path = tmp_path / "config.yaml"
        OmegaConf.save(OmegaConf.create(cfg.to_dict()), path)
        back = RunConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path)))  # type: ignore[arg-type]
        assert back == cfg and back.identity() == cfg.identity()
