"""The run config's schema: frozen pydantic v2 sections, `extra="forbid"`, bounds as `Field`
constraints, choices as `Literal`s, `model` and `data` discriminated by their `name`.

    cfg = RunConfig.from_dict({"model": {"norm": "pre"}, "train": {"clip": 5.0}})
    cfg = cfg.resolve(threads=2, device="cpu")  # operational values decided later: a new config

Defaults here equal the composed `conf/` defaults (tests/test_schema.py checks it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args

from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stability.config.messages import ConfigError, explain
from stability.config.names import N_STAGES, OPERATIONAL_KEYS
from stability.config.values import (
    Flag,
    Float,
    Int,
    PerStage,
    epoch_list,
    is_device,
    is_text,
    latent_rms_value,
    not_allowed,
    pair,
    positive_or_none,
    rule,
    trackers,
)


class Section(BaseModel):
    """A frozen, closed config section. Constructing one directly (`TrainConfig(lr=1e-3)`)
    validates like `RunConfig.from_dict` and raises `ConfigError` with the same one line.

    `section` is where this model sits in a run's config (`train`, `detect.scream`), for the
    keys the message names."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(explain(e, type(self), self.section)) from None

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with `changes` (the frozen analogue of `dataclasses.replace`);
        `ConfigError` if a changed value is not allowed."""
        try:
            return type(self).model_validate({**dict(self), **changes})
        except ValidationError as e:
            raise ConfigError(explain(e, type(self), self.section)) from None


S = TypeVar("S", bound=Section)
# Only a direct call reaches `Section.__init__`: pydantic validates nested sections itself (so
# the error keeps its location for `explain`) when __init__ is marked as its own, as here.
setattr(Section.__init__, "__pydantic_base_init__", True)  # noqa: B010

# Norm placement in every transformer layer: post (x <- LN(x + f(x))), pre (x <- x + f(LN(x))),
# deepnorm (x <- LN(alpha x + f(x)) with beta-scaled init; Wang et al. 2022, arXiv 2203.00555).
Norm = Literal["pre", "post", "deepnorm"]

# The sizes both transformers bound the same way (the cascade per stage, the char LM once).
Width = Annotated[Int, Ge(1)]
Depth = Annotated[Int, Ge(1), Le(96)]
Heads = Annotated[Int, Ge(1)]


class TransformerConfig(Section):
    """The knobs both transformers (cascade, char LM) read, declared once.

    norm: placement (pre | post | deepnorm). qk_norm: LayerNorm/RMSNorm on queries and keys (Wortsman et al.
    2023, arXiv 2309.14322); sigma_reparam: W <- gamma / sigma(W) * W on attention and MLP
    weights (Zhai et al. 2023, arXiv 2303.06296); v_scale: v <- phi(|v|^2) v per head (Chen &
    Yao, arXiv 2603.17771); spectral_norm: on the output projection(s). init_std: std of linear
    weights at init (0: Xavier-uniform). A head count must divide its width (`ConfigError`)."""

    section: ClassVar[str] = "model"
    _FIRST: ClassVar[tuple[str, ...]] = ("name", "d_model", "n_layers", "n_heads")  # in config.yaml

    norm: Norm = "post"
    norm_type: Literal["layer", "rms"] = "layer"
    final_norm: Flag = True  # norm between a pre-norm stack and the output projection
    spectral_norm: Flag = False
    mlp_ratio: Int = Field(4, ge=1, le=16)
    init_std: Float = Field(0.02, ge=0.0, le=10.0)
    qk_norm: Flag = False
    sigma_reparam: Flag = False
    v_scale: Flag = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        d_model, n_heads = getattr(self, "d_model"), getattr(self, "n_heads")  # noqa: B009 (the subclasses')
        if isinstance(d_model, list):  # the cascade: per stage
            for i, (d, h) in enumerate(zip(d_model, n_heads)):
                if d % h:
                    raise not_allowed(f"a divisor of model.d_model[{i}]={d}", key=f"n_heads[{i}]", value=h)
        elif d_model % n_heads:
            raise not_allowed(f"a divisor of model.d_model={d_model}", key="n_heads", value=n_heads)
        return self

    @model_serializer(mode="wrap")
    def _name_first(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d: dict[str, Any] = handler(self)
        return {**{k: d[k] for k in self._FIRST if k in d}, **d}


class ModelConfig(TransformerConfig):
    """The cascade transformer (SPEC §2). d_model, n_layers, n_heads, residual: one value or
    one per stage (0, 1, 2), stored per stage. rms_clamp: [lo, hi] bounds of the RMS match's
    scale, 0 < lo <= 1 <= hi. latent_dim: EnCodec latent channels."""

    name: Literal["cascade"] = "cascade"
    d_model: PerStage[Width] = Field(default_factory=lambda: [64, 96, 96])
    n_layers: PerStage[Depth] = Field(default_factory=lambda: [4] * N_STAGES)
    n_heads: PerStage[Heads] = Field(default_factory=lambda: [4] * N_STAGES)
    residual: PerStage[Annotated[Float, Ge(0.0), Le(10.0)]] = Field(default_factory=lambda: [1.0, 1.0, 0.1])
    rms_match: Flag = True  # scale = clamp(rms(target) / rms(out), lo, hi)
    rms_clamp: Annotated[
        tuple[Annotated[Float, Gt(0.0), Le(1.0)], Annotated[Float, Ge(1.0)]],
        pair("[lo, hi] with 0 < lo <= 1 <= hi"),
        PlainSerializer(list),
    ] = (0.7, 1.5)
    latent_dim: Int = Field(128, ge=1)


class CharLMConfig(TransformerConfig):
    """The character-level causal LM (`model=charlm`): the text-side scream, same layers and
    knobs. context: characters attended over (block size); embed_scale: embeddings N(0, 1/d)
    times sqrt(d) (Vaswani et al. 2017), not GPT-2's N(0, 0.02); z_loss: coefficient on log^2 Z
    of the output softmax (Wortsman et al. 2023, arXiv 2309.14322: 1e-4)."""

    name: Literal["charlm"] = "charlm"
    d_model: Width = 64
    n_layers: Depth = 4
    n_heads: Heads = 4
    context: Int = Field(64, ge=2, le=65536)
    embed_scale: Flag = False
    z_loss: Float = Field(0.0, ge=0.0, le=1.0)


OWN_LOOP = "(own loop)"  # model._target_ of a run recorded by stab's Monitor without a factory


class CustomModelConfig(Section):
    """Your own model (`model=custom model._target_=my_pkg.my_module.build`): `target` is the
    dotted path of a factory function; `params` are the other `model.*` keys, passed to it as
    keyword arguments (`+model.width=64` -> `build(width=64)`), readable as attributes
    (`cfg.model.width`). A factory parameter named like a short name (norm, residual, ...)
    receives that short name's value. The factory and what it returns are checked before
    training (`stability.workloads.custom`).

    From YAML (a mapping with `_target_`) every key but `name` and `_target_` is a parameter;
    from Python, `CustomModelConfig(target=..., params={...})`."""

    section: ClassVar[str] = "model"
    model_config = ConfigDict(populate_by_name=True)

    name: Literal["custom"] = "custom"
    # written `_target_` in YAML and on the command line, as Hydra's instantiate reads it
    target: Annotated[
        str,
        rule(
            "the dotted path of your factory function, e.g. model._target_=my_pkg.my_module.build",
            lambda v: is_text(v) and not v.startswith("."),
        ),
    ] = Field(None, alias="_target_", validate_default=True)  # None: required, with the message
    params: dict[str, Any] = Field(default_factory=dict)  # the factory's own keyword arguments: any value

    @model_validator(mode="before")
    @classmethod
    def _factory_keys(cls, raw: object) -> object:
        if isinstance(raw, dict) and ("_target_" in raw or set(raw) - {"name", "target", "params"}):
            rest = {k: v for k, v in raw.items() if k not in ("name", "_target_", "target")}
            return {"name": raw.get("name", "custom"), "target": raw.get("_target_", raw.get("target")), "params": rest}
        return raw

    def __getattr__(self, key: str) -> Any:  # model.norm etc. where the factory declares them
        params = self.__dict__.get("params") or {}
        if key in params:
            return params[key]
        fallback = getattr(BaseModel, "__getattr__", None)  # pydantic's own (private attributes)
        if fallback is None:
            raise AttributeError(key)
        return fallback(self, key)

    def to_dict(self) -> dict[str, Any]:
        """As written in YAML: name, `_target_`, then the factory's keys (report factors: model.width)."""
        return {"name": self.name, "_target_": self.target, **self.params}


class CodecConfig(Section):
    """Which EnCodec weights encode the audio (SPEC §3): weights random | pretrained | the path
    of a checkpoint file; seed: random-init weights and the codebook k-means; calib_codebooks:
    RVQ codebooks calibrated by k-means when the weights are random."""

    section: ClassVar[str] = "data.codec"

    weights: Annotated[str, rule("random, pretrained or a checkpoint path", is_text)] = "random"
    seed: Int = Field(0, ge=0)
    calib_codebooks: Int = Field(2, ge=1, le=32)


class DataConfig(Section):
    """Audio pairs encoded to EnCodec latents: embedded synthetic clips (`synthetic`), or a
    folder of your own (`folder`, needs `path`, the folder holding input/ and target/).

    n_train, n_val: clips (folder: at most n_train training segments; null = all); seconds: clip
    length (75 latent frames per second); latent_rms: auto (seed: input 5.66, target 5.69) | off
    | a positive float to rescale each side to; latent_center: remove the per-channel offset
    before scaling; cache_dir: null = $STAB_CACHE or ~/.cache/stab; on_bad_file: folder data,
    error | skip (with a warning) on a bad file or pair."""

    section: ClassVar[str] = "data"

    name: Literal["synthetic", "folder"] = "synthetic"
    n_train: Int | None = Field(64, ge=1)
    n_val: Int = Field(8, ge=1)
    seconds: Float = Field(2.0, ge=0.1, le=600.0)
    seed: Int = Field(0, ge=0)
    latent_rms: Annotated[Literal["auto", "off"] | float, BeforeValidator(latent_rms_value)] = "auto"
    latent_center: Literal["auto", "on", "off"] = "auto"
    cache_dir: Annotated[str | None, rule("a folder path or null", lambda v: v is None or isinstance(v, str))] = None
    path: str | None = None
    on_bad_file: Literal["error", "skip"] = "error"
    codec: CodecConfig = Field(default_factory=CodecConfig)

    @model_validator(mode="after")
    def _by_source(self) -> DataConfig:
        if self.name == "folder" and not is_text(self.path):
            raise not_allowed(
                "the folder holding input/ and target/ (data=folder data.path=DIR)", key="path", value=self.path
            )
        if self.name != "folder" and self.n_train is None:  # null: every segment of a folder
            raise not_allowed("an integer >= 1", key="n_train", value=None)
        return self


class TextDataConfig(Section):
    """Text for the char LM: the embedded corpus (the docstrings of this Python's standard
    library, read at run time) or a UTF-8 text file of your own (`path`). max_chars: read at most
    this many characters (null: all); val_fraction: share of the chunks held out; chunk_chars:
    the split assigns whole chunks of this many characters; n_val: validation windows (of
    model.context characters) the validation loss averages."""

    section: ClassVar[str] = "data"

    name: Literal["text"] = "text"
    path: Annotated[
        str | None,
        rule("null (the embedded corpus) or the path of a UTF-8 text file", lambda v: v is None or is_text(v)),
    ] = None
    max_chars: Int | None = Field(200_000, ge=1000)
    val_fraction: Float = Field(0.1, gt=0.0, le=0.5)
    chunk_chars: Int = Field(1024, ge=64)
    seed: Int = Field(0, ge=0)
    n_val: Int = Field(64, ge=1)


class NoDataConfig(Section):
    """`data=none`: the workload brings its own data (model=custom: the factory returns it)."""

    section: ClassVar[str] = "data"

    name: Literal["none"] = "none"


Beta = Annotated[Float, Ge(0.0), Le(0.9999)]


class TrainConfig(Section):
    """The optimisation loop: AdamW with linear warmup (steps), epochs x batches.

    clip: total-norm clipping threshold or None (`none`); on_nan: stop | skip on a non-finite
    loss or gradient; stop_early: stop once the verdict is certain to be unstable
    (detectors.series.certainly_unstable); device: auto | cpu | cuda | cuda:N; threads: torch CPU
    threads, None = all cores (split among concurrent jobs); sync_every: steps whose
    measurements stay on the device between host transfers. Recovery (stability/recovery.py):
    on_spike none | skip (OLMo-core's SkipStepAdamW rule) | backoff (lr x backoff_factor,
    growing back over backoff_steps), with a spike_window-step detector at spike_sigma std;
    update_clip: StableAdamW update clipping (arXiv 2304.13013: 1.0) or None. snapshot_every:
    steps between snapshots (0: none), snapshot_keep kept; rewind_from: a snapshot file to
    continue from."""

    section: ClassVar[str] = "train"

    epochs: Int = Field(5, ge=1)
    batch_size: Int = Field(8, ge=1)
    lr: Float = Field(3e-3, gt=0.0, le=10.0)
    weight_decay: Float = Field(0.01, ge=0.0)
    betas: Annotated[tuple[Beta, Beta], pair("[beta1, beta2] in [0, 1)"), PlainSerializer(list)] = (0.9, 0.95)
    warmup: Int = Field(10, ge=0)
    clip: Annotated[float | None, positive_or_none("a positive number (total gradient norm)")] = 10.0
    on_nan: Literal["stop", "skip"] = "stop"
    stop_early: Flag = False
    device: Annotated[str, rule("auto, cpu, cuda or cuda:N", is_device)] = "auto"
    threads: Int | None = Field(None, ge=1, le=1024)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: Flag = False
    sync_every: Int = Field(1, ge=1, le=10_000)
    on_spike: Literal["none", "skip", "backoff"] = "none"
    spike_window: Int = Field(128, ge=2, le=100_000)
    spike_sigma: Float = Field(6.0, gt=0.0)
    backoff_factor: Float = Field(0.5, gt=0.0, le=0.999)
    backoff_steps: Int = Field(100, ge=1)
    update_clip: Annotated[float | None, positive_or_none("a positive number (StableAdamW: 1.0)")] = None
    snapshot_every: Int = Field(0, ge=0)
    snapshot_keep: Int = Field(4, ge=1, le=1000)
    rewind_from: Annotated[
        str | None,
        rule("null or the path of a snapshot file (RUN/snapshots/stepN.pt)", lambda v: v is None or is_text(v)),
    ] = None


class ScreamConfig(Section):
    """When is an output 'one repeated token' (SPEC §4). Shares are in (0, 1].

    dominant: degenerate if the most common code covers at least this share, or longest_run:
    one code repeats for this share of the sequence, or seq_rep: at least this share of its
    n-grams (n) repeat an earlier one where the target's own is below it ("the the the ale ale":
    0.83 against 0.09), or (char LM) loop: it ends in a loop of period <= loop_period this long.
    items: validation clips (char LM: prompts) checked; prompt_chars, gen_chars: the char LM's
    greedy generation. min_epochs: a scream lasts at least this many evaluated epochs, and is
    not an undertrained model whose validation loss still falls by more than `learning` per epoch."""

    section: ClassVar[str] = "detect.scream"

    dominant: Float = Field(0.6, gt=0.0, le=1.0)
    longest_run: Float = Field(0.5, gt=0.0, le=1.0)
    n: Int = Field(4, ge=1, le=16)
    items: Int = Field(4, ge=1)
    loop: Float = Field(0.5, gt=0.0, le=1.0)
    loop_period: Int = Field(3, ge=1, le=64)
    seq_rep: Float = Field(0.5, gt=0.0, le=1.0)
    prompt_chars: Int = Field(32, ge=1)
    gen_chars: Int = Field(128, ge=8, le=100_000)
    min_epochs: Int = Field(2, ge=1)
    learning: Float = Field(0.05, ge=0.0, le=1.0)


class DetectConfig(Section):
    """Thresholds of the detectors that turn histories into events and a verdict.

    explode_factor: 'exploding' if the epoch-mean grad norm grows by more than this per epoch
    over explode_window epochs (geometric mean), or one step's finite grad norm exceeds the
    run's median by explode_step_factor. Spikes: robust z-score spike_z (median/MAD) over a
    spike_window-step running median, at least spike_ratio x it, after spike_warmup steps.
    health: attention/activation health each epoch; clamp_warn: share of steps a stage's RMS
    clamp may bind; logit_growth: factor of max-logit growth quoted; attn_logit_max,
    attn_entropy_min (nats): warning thresholds; band: relative band around a threshold
    (`borderline`, and hysteresis); opt_state: optimizer-state signals every step (operational)."""

    section: ClassVar[str] = "detect"

    explode_factor: Float = Field(2.0, gt=1.0)
    explode_window: Int = Field(3, ge=2)
    explode_step_factor: Float = Field(1000.0, gt=1.0)
    spike_window: Int = Field(20, ge=3)
    spike_z: Float = Field(6.0, gt=0.0)
    spike_warmup: Int = Field(10, ge=0)
    spike_ratio: Float = Field(3.0, ge=1.0)
    health: Flag = True
    clamp_warn: Float = Field(0.5, ge=0.0, le=1.0)
    logit_growth: Float = Field(10.0, gt=1.0)
    attn_logit_max: Float = Field(50.0, gt=0.0)
    attn_entropy_min: Float = Field(0.1, ge=0.0)
    band: Float = Field(0.1, ge=0.0, le=0.5)
    opt_state: Flag = True  # on by default: its cost, README "Optimizer-state signals"
    scream: ScreamConfig = Field(default_factory=ScreamConfig)


class FaultConfig(Section):
    """Fault injection, for checking that the detectors and the sweep's bookkeeping work.
    Steps are global and 0-based; None: no fault. nan_at_step puts a NaN into nan_module's
    output; crash_at_step raises; spike_at_step multiplies the loss by spike_factor."""

    section: ClassVar[str] = "fault"

    nan_at_step: Int | None = Field(None, ge=0)
    nan_module: str = "stage2.layer0.mlp"
    crash_at_step: Int | None = Field(None, ge=0)
    spike_at_step: Int | None = Field(None, ge=0)
    spike_factor: Float = Field(100.0, gt=0.0)


class MarginConfig(Section):
    """`stab margin`: bracketing then bisection of the learning rate on a log scale
    (stability/margin.py). lo < hi: the first bracket; tolerance: stop when the largest stable
    and smallest unstable lr are within this factor; steps: probe runs per configuration."""

    section: ClassVar[str] = "margin"

    lo: Float = Field(1e-3, gt=0.0, le=10.0)
    hi: Float = Field(1e-1, gt=0.0, le=10.0)
    tolerance: Float = Field(1.5, gt=1.0)
    steps: Int = Field(10, ge=2, le=1000)

    @model_validator(mode="after")
    def _bracket(self) -> MarginConfig:
        if self.hi <= self.lo:
            raise not_allowed(f"a learning rate above margin.lo={self.lo:g}", key="hi", value=self.hi)
        return self


class ListenConfig(Section):
    """Decode the model's output on a few validation items to WAV files: at `epochs` (1-based,
    stored sorted and unique) or `every` N epochs; `items` validation items (the first ones of
    the scream-check batch)."""

    section: ClassVar[str] = "listen"

    epochs: Annotated[
        list[Annotated[Int, Ge(1)]], BeforeValidator(epoch_list), AfterValidator(lambda e: sorted(set(e)))
    ] = Field(default_factory=list)
    every: Int | None = Field(None, ge=1)
    items: Int = Field(2, ge=1, le=64)

    @property
    def enabled(self) -> bool:
        """Whether any epoch is listened to."""
        return bool(self.epochs or self.every)

    def at(self, epoch: int) -> bool:
        """Whether the 1-based `epoch` is listened to."""
        return epoch in self.epochs or bool(self.every and epoch % self.every == 0)


def _by_name(default: str, tags: dict[str, str]) -> Discriminator:
    """Discriminate a section by its `name` (`default` when the mapping has none); several names
    may share one model (`tags`: name -> tag). A non-mapping gets no tag (message: a mapping)."""

    def tag(value: object) -> str | None:
        if isinstance(value, dict):
            name = value.get("name", default)
        elif isinstance(value, BaseModel):
            name = getattr(value, "name", None)
        else:
            return None
        return tags.get(str(name), str(name))

    return Discriminator(tag)


AnyModelConfig = Annotated[
    Union[  # noqa: UP007 (Tag-annotated members)
        Annotated[ModelConfig, Tag("cascade")],
        Annotated[CharLMConfig, Tag("charlm")],
        Annotated[CustomModelConfig, Tag("custom")],
    ],
    _by_name("cascade", {}),
]
AnyDataConfig = Annotated[
    Union[  # noqa: UP007 (Tag-annotated members)
        Annotated[DataConfig, Tag("audio")],
        Annotated[TextDataConfig, Tag("text")],
        Annotated[NoDataConfig, Tag("none")],
    ],
    _by_name("synthetic", {"synthetic": "audio", "folder": "audio"}),
]


def data_for(model: str) -> tuple[str, ...]:
    """The data names (`data.name`) model `model` reads: the char LM text, your own model
    (`custom`) none (its factory returns the data), the cascade audio (synthetic or folder)."""
    if model == "charlm":
        return ("text",)
    if model == "custom":
        return ("none",)
    return get_args(DataConfig.model_fields["name"].annotation)


MODEL_NAMES = ("cascade", "charlm", "custom")  # model.name: the tags of AnyModelConfig


def _name(section: Any, default: str, names: Iterable[str]) -> str | None:
    """A raw section's `name` (`default` where it gives none), or None where it is not one of
    `names` (the section's own check names that)."""
    name = section.get("name", default) if isinstance(section, dict) else default
    return name if isinstance(name, str) and name in set(names) else None


def _wrong_data(model: str, data: str) -> PydanticCustomError:
    """The refusal of data `data` for model `model` (not in `data_for(model)`), saying what to use."""
    if model == "charlm":
        return not_allowed("text with model=charlm (the char LM reads text: data=text)", key="data.name", value=data)
    if model == "custom":
        return not_allowed(
            "none with model=custom (your factory returns the data; in your own "
            "model file: `defaults: [override /data: none]`)",
            key="data.name",
            value=data,
        )
    if data == "none":
        return not_allowed(f"data for model={model}: data=none is for model=custom", key="data.name", value=data)
    return not_allowed(f"audio data with model={model} (text is for model=charlm)", key="data.name", value=data)


class RunConfig(Section):
    """Everything that defines one training run: `model` by model.name (cascade | charlm |
    custom), `data` by data.name (synthetic | folder | text | none; the model decides which),
    `train`, `detect`, `fault`, `listen`; `margin` (`stab margin` only) and `log` (trackers:
    tensorboard | mlflow | wandb) are operational. Build one with `from_dict`; `ConfigError`
    names the first value that is not allowed."""

    seed: Int = Field(0, ge=0)
    model: AnyModelConfig = Field(default_factory=ModelConfig)
    data: AnyDataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    listen: ListenConfig = Field(default_factory=ListenConfig)
    margin: MarginConfig = Field(default_factory=MarginConfig)
    log: Annotated[list[str], BeforeValidator(trackers)] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _model_and_data_agree(cls, raw: Any) -> Any:
        """The model reads the data it is given (`data_for`), checked before either section is
        read: data=synthetic with model=charlm is named as such, not as the first key of the char
        LM's preset (data.max_chars) that the audio data does not have."""
        if isinstance(raw, dict):
            model = _name(raw.get("model"), "cascade", MODEL_NAMES)
            data = _name(raw.get("data"), "synthetic", (d for m in MODEL_NAMES for d in data_for(m)))
            if model is not None and data is not None and data not in data_for(model):
                raise _wrong_data(model, data)
        return raw

    @model_validator(mode="after")
    def _epochs_agree(self) -> RunConfig:
        if any(e > self.train.epochs for e in self.listen.epochs):
            raise not_allowed(
                f"epochs between 1 and train.epochs={self.train.epochs}", key="listen.epochs", value=self.listen.epochs
            )
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a plain nested mapping (a composed config, a run folder's config.yaml);
        unknown keys are errors. Raises `ConfigError` with one line."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(explain(e, cls)) from None

    def resolve(self, *, threads: int | None = None, device: str | None = None) -> RunConfig:
        """This config with the operational values a launcher decides once it knows the
        machine (a job's share of the cores, its GPU): a new validated config; None keeps a
        value. Neither changes `identity`."""
        changes = {k: v for k, v in (("threads", threads), ("device", device)) if v is not None}
        return self.replace(train=self.train.replace(**changes)) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, as a run folder's config.yaml holds them."""
        d = self.model_dump()
        if isinstance(self.model, CustomModelConfig):
            d["model"] = self.model.to_dict()
        return d

    def inert_keys(self) -> list[str]:
        """Keys that have no effect in this configuration, so do not make a run's identity:
        `model.final_norm` unless norm=pre (post-norm and DeepNorm stacks end in a norm already),
        `model.rms_clamp` without `model.rms_match`, the fault targets without their fault step,
        the char LM's text-generation scream settings for the other models."""
        inert = []
        if self.model.name != "custom" and self.model.norm != "pre":  # a custom model's keys are its own
            inert.append("model.final_norm")
        if isinstance(self.model, ModelConfig) and not self.model.rms_match:
            inert.append("model.rms_clamp")
        if not self.train.stop_early:  # off: the run is the same as before the key existed
            inert.append("train.stop_early")
        if self.fault.nan_at_step is None:
            inert.append("fault.nan_module")
        if self.fault.spike_at_step is None:
            inert.append("fault.spike_factor")
        if self.train.on_spike == "none":  # off: the run is the same as before these keys existed
            inert += ["train.on_spike", "train.spike_window", "train.spike_sigma"]
        if self.train.update_clip is None:
            inert.append("train.update_clip")
        if self.train.rewind_from is None:
            inert.append("train.rewind_from")
        if self.train.on_spike != "backoff":
            inert += ["train.backoff_factor", "train.backoff_steps"]
        if self.model.name != "charlm":
            inert += [f"detect.scream.{k}" for k in ("loop", "loop_period", "prompt_chars", "gen_chars")]
        return inert

    def identity(self) -> str:
        """Short hash of everything that changes the result: not the operational keys (device,
        threads, paths), nor the keys that have no effect in this configuration (`inert_keys`)."""
        d = self.to_dict()
        for key in (*OPERATIONAL_KEYS, *self.inert_keys()):
            *path, name = key.split(".")
            node = d
            for part in path:
                node = node[part]
            node.pop(name, None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
