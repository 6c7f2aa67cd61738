"""Typed run configuration: the schema, as pydantic models, and the one line a bad value gets.

The CLI composes YAML from `conf/` with Hydra and hands the resolved mapping to
`RunConfig.from_dict`; nothing in `stability/` knows about Hydra. Each section is a frozen
pydantic v2 model (`extra="forbid"`): bounds are `Field`/`annotated_types` constraints, choices
are `Literal`s, `model` and `data` are unions discriminated by their `name`. A value that breaks
the schema raises `ConfigError`, whose text `explain` makes from pydantic's `ValidationError`:
one line naming the key, the bad value and what is allowed (with did-you-mean), so the CLI can
print it and exit before any work starts.

    cfg = RunConfig.from_dict({"model": {"norm": "pre"}, "train": {"clip": 5.0}})
    cfg = cfg.resolve(threads=2, device="cpu")  # operational values decided later: a new config

Defaults here equal the composed `conf/` defaults (tests/test_schema.py checks it).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

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
    Strict,
    Tag,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

N_STAGES = 3


class ConfigError(ValueError):
    """A user-supplied configuration value is not allowed; the message is one line."""


def did_you_mean(word: object, candidates: Iterable[object]) -> str:
    """'; did you mean X?' for the closest of `candidates` to a typo'd `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# --- value types -------------------------------------------------------------------------------
# Rules that a type and its bounds cannot say raise `_not_allowed(...)`: a pydantic error that
# carries the "what is allowed" text (and, where it is not the checked value, the key and value).


def _not_allowed(allowed: str, **where: Any) -> PydanticCustomError:
    """The error a rule raises: `allowed` is the text after "expected"; `where` may name the
    `key` (relative to the model that raises it) and `value` the message shows."""
    return PydanticCustomError("not_allowed", "expected {allowed}", {"allowed": allowed, **where})


def _a_number(value: object) -> object:
    """Numbers only: a bool, a string ('1e-3') or a list is not a number, whatever it parses to."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("not_a_number", "not a number")
    return value


Int = Annotated[int, BeforeValidator(_a_number)]  # an integral float (5.0) is accepted as 5
Float = Annotated[float, BeforeValidator(_a_number)]  # finite: allow_inf_nan=False below
Flag = Annotated[bool, Strict()]  # true or false, not 'yes' or 1

T = TypeVar("T")


def _per_stage(value: object) -> object:
    """A knob given once for all stages or as one value per stage -> a list of `N_STAGES`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * N_STAGES
    if len(values) != N_STAGES:
        raise _not_allowed(f"one value or a list of {N_STAGES} (one per stage)")
    return values


PerStage = Annotated[list[T], BeforeValidator(_per_stage)]


def _pair(allowed: str) -> BeforeValidator:
    """Exactly two values (`[lo, hi]`, `[beta1, beta2]`); each is then checked on its own."""

    def check(value: object) -> object:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _not_allowed(allowed)
        return value

    return BeforeValidator(check)


def _rule(allowed: str, ok: Callable[[Any], bool]) -> BeforeValidator:
    """A value `ok` accepts, else `allowed` is what the message says is expected."""

    def check(value: object) -> object:
        if not ok(value):
            raise _not_allowed(allowed)
        return value

    return BeforeValidator(check)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _positive_or_none(what: str) -> BeforeValidator:
    """`none|off|null|<positive number>` -> None or the number (`clip`, `update_clip`)."""

    def parse(value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "off")):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _not_allowed("none or " + what) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise _not_allowed("none or " + what)  # a negative, zero or non-finite number
        return float(value)

    return BeforeValidator(parse)


def _latent_rms(value: object) -> object:
    """data.latent_rms: auto | off (null) | a number > 0."""
    if value in ("auto", "off", None):
        return "off" if value is None else value
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _not_allowed("auto, off or a number > 0")
    return float(value)


def _device(value: object) -> bool:
    return isinstance(value, str) and (value in ("auto", "cpu", "cuda") or value.startswith("cuda:"))


# Trackers that receive the run folder's records (stability/trackers.py); `log` is operational.
TRACKERS = ("tensorboard", "mlflow", "wandb")


def _trackers(value: object) -> list[str]:
    """`log=none | NAME | [NAME,...]` -> the trackers, in the order given, each once."""
    allowed = f"one of {', '.join(TRACKERS)}, a list of them (log=[tensorboard,mlflow]) or none"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off", "")):
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise _not_allowed(allowed)
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise _not_allowed(allowed + did_you_mean(name, TRACKERS), value=name)
        if name not in out:
            out.append(name)
    return out


def _epochs(value: object) -> object:
    if not isinstance(value, (list, tuple)):
        raise _not_allowed("a list of epochs, e.g. [1,5]")
    return value


# --- the sections ------------------------------------------------------------------------------


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
                    raise _not_allowed(f"a divisor of model.d_model[{i}]={d}", key=f"n_heads[{i}]", value=h)
        elif d_model % n_heads:
            raise _not_allowed(f"a divisor of model.d_model={d_model}", key="n_heads", value=n_heads)
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
        _pair("[lo, hi] with 0 < lo <= 1 <= hi"),
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
        _rule(
            "the dotted path of your factory function, e.g. model._target_=my_pkg.my_module.build",
            lambda v: _text(v) and not v.startswith("."),
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

    weights: Annotated[str, _rule("random, pretrained or a checkpoint path", _text)] = "random"
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
    latent_rms: Annotated[Literal["auto", "off"] | float, BeforeValidator(_latent_rms)] = "auto"
    latent_center: Literal["auto", "on", "off"] = "auto"
    cache_dir: Annotated[str | None, _rule("a folder path or null", lambda v: v is None or isinstance(v, str))] = None
    path: str | None = None
    on_bad_file: Literal["error", "skip"] = "error"
    codec: CodecConfig = Field(default_factory=CodecConfig)

    @model_validator(mode="after")
    def _by_source(self) -> DataConfig:
        if self.name == "folder" and not _text(self.path):
            raise _not_allowed(
                "the folder holding input/ and target/ (data=folder data.path=DIR)", key="path", value=self.path
            )
        if self.name != "folder" and self.n_train is None:  # null: every segment of a folder
            raise _not_allowed("an integer >= 1", key="n_train", value=None)
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
        _rule("null (the embedded corpus) or the path of a UTF-8 text file", lambda v: v is None or _text(v)),
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
    (detectors.certainly_unstable); device: auto | cpu | cuda | cuda:N; threads: torch CPU
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
    betas: Annotated[tuple[Beta, Beta], _pair("[beta1, beta2] in [0, 1)"), PlainSerializer(list)] = (0.9, 0.95)
    warmup: Int = Field(10, ge=0)
    clip: Annotated[float | None, _positive_or_none("a positive number (total gradient norm)")] = 10.0
    on_nan: Literal["stop", "skip"] = "stop"
    stop_early: Flag = False
    device: Annotated[str, _rule("auto, cpu, cuda or cuda:N", _device)] = "auto"
    threads: Int | None = Field(None, ge=1, le=1024)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: Flag = False
    sync_every: Int = Field(1, ge=1, le=10_000)
    on_spike: Literal["none", "skip", "backoff"] = "none"
    spike_window: Int = Field(128, ge=2, le=100_000)
    spike_sigma: Float = Field(6.0, gt=0.0)
    backoff_factor: Float = Field(0.5, gt=0.0, le=0.999)
    backoff_steps: Int = Field(100, ge=1)
    update_clip: Annotated[float | None, _positive_or_none("a positive number (StableAdamW: 1.0)")] = None
    snapshot_every: Int = Field(0, ge=0)
    snapshot_keep: Int = Field(4, ge=1, le=1000)
    rewind_from: Annotated[
        str | None,
        _rule("null or the path of a snapshot file (RUN/snapshots/stepN.pt)", lambda v: v is None or _text(v)),
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
    opt_state: Flag = False
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
            raise _not_allowed(f"a learning rate above margin.lo={self.lo:g}", key="hi", value=self.hi)
        return self


class ListenConfig(Section):
    """Decode the model's output on a few validation items to WAV files: at `epochs` (1-based,
    stored sorted and unique) or `every` N epochs; `items` validation items (the first ones of
    the scream-check batch)."""

    section: ClassVar[str] = "listen"

    epochs: Annotated[
        list[Annotated[Int, Ge(1)]], BeforeValidator(_epochs), AfterValidator(lambda e: sorted(set(e)))
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
    log: Annotated[list[str], BeforeValidator(_trackers)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _model_and_data_agree(self) -> RunConfig:
        model, data = self.model.name, self.data.name
        if model == "charlm" and data != "text":
            raise _not_allowed(
                "text with model=charlm (the char LM reads text: data=text)", key="data.name", value=data
            )
        if model == "custom" and data != "none":
            raise _not_allowed(
                "none with model=custom (your factory returns the data; in your own "
                "model file: `defaults: [override /data: none]`)",
                key="data.name",
                value=data,
            )
        if data == "none" and model != "custom":
            raise _not_allowed(f"data for model={model}: data=none is for model=custom", key="data.name", value=data)
        if data == "text" and model != "charlm":
            raise _not_allowed(f"audio data with model={model} (text is for model=charlm)", key="data.name", value=data)
        if any(e > self.train.epochs for e in self.listen.epochs):
            raise _not_allowed(
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


# Keys that change where or how fast a run happens, or where it is reported, never what it computes.
OPERATIONAL_KEYS = (
    "train.device",
    "train.threads",
    "train.sync_every",
    "train.snapshot_every",
    "train.snapshot_keep",
    "detect.opt_state",
    "data.cache_dir",
    "log",
    "margin",
)


# --- the one line ------------------------------------------------------------------------------


def explain(error: ValidationError, root: type[BaseModel] = RunConfig, section: str = "") -> str:
    """pydantic's `ValidationError` (of `root`, which sits at `section` of a run's config) as
    the one line stab prints: `KEY=VALUE is not allowed: expected WHAT[; did you mean X?]`, or
    `unknown key 'KEY': allowed keys under PARENT are ...[; did you mean KEY?]`. WHAT comes from
    the schema (a Literal's choices, a number's type and bounds) or from the rule that raised
    (`_not_allowed`); a short name (norm, clip, ...) is named as the user writes it."""
    err = error.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    parts, ann, info, parent = _walk(root, err["loc"])
    prefix = [section] if section else []
    value = ctx.get("value", err["input"])
    if err["type"] == "extra_forbidden":
        keys = sorted(f.alias or name for name, f in parent.model_fields.items()) if parent else []
        where = ".".join([*prefix, *parts[:-1]])
        near = did_you_mean(parts[-1], keys)
        if near:
            near = f"; did you mean {'.'.join([*prefix, *parts[:-1], near[len('; did you mean ') : -1]])}?"
        key = ".".join([*prefix, *parts])
        return f"unknown key {key!r}: allowed keys{f' under {where}' if where else ''} are {', '.join(keys)}{near}"
    if err["type"] == "union_tag_invalid":  # model.name / data.name
        parts, value = [*parts, "name"], err["input"].get("name", ctx["tag"])
        names = [n for member in _members(ann) for n in get_args(member.model_fields["name"].annotation)]
        allowed = f"one of {', '.join(names)}" + did_you_mean(value, names)
    elif err["type"] in ("union_tag_not_found", "model_type", "model_attributes_type", "dict_type"):
        allowed = "a mapping"
    elif "allowed" in ctx:
        allowed = ctx["allowed"]
        if "key" in ctx:
            parts = [*parts, *ctx["key"].replace("[", ".[").split(".")]
    else:
        allowed = _expected(ann, info, value)
    return f"{_key([*prefix, *parts])}={value!r} is not allowed: expected {allowed}"


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[str], Any, FieldInfo | None, Any]:
    """Follow an error's location through the schema: the key's parts (`d_model`, `[1]`; a
    union's tag is skipped), the annotation and FieldInfo found there, and the last model passed."""
    parts: list[str] = []
    ann: Any = root
    info: FieldInfo | None = None
    parent: Any = root
    for step in loc:
        members = {_tag(m): _strip(m) for m in _union(ann)}
        if members and isinstance(step, str) and step in members:  # a discriminated union's tag
            ann = members[step]
            continue
        base = _strip(ann)
        if isinstance(base, type) and issubclass(base, BaseModel) and isinstance(step, str):
            parent = base
            field = next((f for n, f in base.model_fields.items() if step in (n, f.alias)), None)
            parts.append(field.alias if field is not None and field.alias else str(step))
            info, ann = field, (field.annotation if field is not None else None)
        elif isinstance(step, int):
            parts.append(f"[{step}]")
            args = get_args(_strip(_optional(ann)))
            ann = args[step] if get_origin(_strip(_optional(ann))) is tuple else (args[0] if args else None)
            info = None
        else:
            parts.append(str(step))
    return parts, ann, info, parent


def _strip(ann: Any) -> Any:
    """The type under `Annotated[...]`."""
    return get_args(ann)[0] if get_origin(ann) is Annotated else ann


def _optional(ann: Any) -> Any:
    """`X | None` -> X."""
    args = [a for a in get_args(ann) if a is not type(None)]
    return args[0] if type(None) in get_args(ann) and len(args) == 1 else ann


def _union(ann: Any) -> list[Any]:
    """The members of a discriminated union (each `Annotated[Model, Tag(...)]`), or []."""
    args = get_args(_strip(ann))
    return [a for a in args if get_origin(a) is Annotated and any(isinstance(m, Tag) for m in get_args(a)[1:])]


def _members(ann: Any) -> list[type[BaseModel]]:
    return [_strip(m) for m in _union(ann)]


def _tag(member: Any) -> str:
    return next(m.tag for m in get_args(member)[1:] if isinstance(m, Tag))


def _expected(ann: Any, info: FieldInfo | None, value: object) -> str:
    """What a field's type and bounds allow, in words: "an integer >= 1 and <= 96"."""
    metadata = list(info.metadata if info is not None else [])
    if get_origin(ann) is Annotated:
        metadata += list(get_args(ann)[1:])
    base = _strip(_optional(_strip(ann)))
    if get_origin(base) is Literal:
        return "one of " + ", ".join(get_args(base)) + did_you_mean(value, get_args(base))
    if base is bool:
        return "true or false"
    if base is str:
        return "a string"
    if base in (int, float):
        what = "an integer" if base is int else "a number"
        if base is float and isinstance(value, float) and not math.isfinite(value):
            what = "a finite number"
        lower = [f">= {m.ge}" for m in metadata if isinstance(m, Ge)] + [
            f"> {m.gt}" for m in metadata if isinstance(m, Gt)
        ]
        upper = [f"<= {m.le}" for m in metadata if isinstance(m, Le)]
        return " ".join([what, " and ".join(lower + upper)]).strip()
    return f"a value of type {getattr(base, '__name__', base)}"


def _key(parts: list[str]) -> str:
    """`model.residual.[2]` parts -> `model.residual[2]`; a short name's path -> the short name."""
    key = ".".join(parts).replace(".[", "[") or "config"
    for short in SHORT_NAMES.values():
        if key == short.path or (short.name == "residual" and key == f"{short.path}[{N_STAGES - 1}]"):
            return short.name
    return key


# --- short names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShortName:
    """A top-level short name of conf/config.yaml (`norm=pre`), an ablation axis.

    path: where the model or train group reads it in a resolved config (`model.norm`);
    the cascade's `model.residual` is a list per stage, of which the short name is the last.
    """

    name: str
    path: str
    help: str

    def read(self, cfg: RunConfig) -> Any:
        """This short name's value in a run's config; None where the model does not read it."""
        node: Any = cfg
        for part in self.path.split("."):
            node = getattr(node, part, None)
        if self.name == "residual" and isinstance(node, list):  # the cascade's per stage: the last
            return node[-1] if node else None
        if self.name in ("clip", "update_clip") and node is None:
            return "none"
        return node


# The one table of short names: config composition (cli/config.py drops them after
# interpolation and refuses one the model does not read), the report's factors (a short name
# and its path are one factor), the trackers' params and the keys of `explain`'s messages all
# read it. Defaults are in conf/config.yaml.
SHORT_NAMES: dict[str, ShortName] = {
    s.name: s
    for s in (
        ShortName("residual", "model.residual", "last stage's residual weight (cascade)"),
        ShortName("norm", "model.norm", "norm placement: pre | post | deepnorm"),
        ShortName("clip", "train.clip", "gradient clipping on the total norm: none | a positive number"),
        ShortName("spectral_norm", "model.spectral_norm", "spectral norm on the output projection(s)"),
        ShortName("qk_norm", "model.qk_norm", "norm on queries and keys per head (arXiv 2309.14322)"),
        ShortName("sigma_reparam", "model.sigma_reparam", "sigma-reparametrised weights (arXiv 2303.06296)"),
        ShortName("v_scale", "model.v_scale", "value scaling by a learned saturating gain (arXiv 2603.17771)"),
        ShortName("z_loss", "model.z_loss", "z-loss coefficient on the output softmax (char LM)"),
        ShortName("warmup", "train.warmup", "steps of linear learning-rate warmup"),
        ShortName("on_spike", "train.on_spike", "what a loss or grad-norm spike does: none | skip | backoff"),
        ShortName("update_clip", "train.update_clip", "StableAdamW update clipping: none | a positive number"),
    )
}


def flatten(d: dict[str, Any], prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested dicts -> one level of dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}. An empty
    dict is dropped, or kept as a value with `keep_empty` (so `model.params: {}` still shows)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (v or not keep_empty):
            out.update(flatten(v, key + ".", keep_empty))
        else:
            out[key] = v
    return out
