"""Typed run configuration: what the library accepts, validated where it enters.

The CLI composes YAML from `conf/` with Hydra and hands the resolved mapping to
`RunConfig.from_dict`; nothing in `stability/` knows about Hydra. Every check raises
`ConfigError` naming the key, the bad value and what is allowed, so the CLI can print one
line and exit before any work starts.

    cfg = RunConfig.from_dict({"model": {"norm": "pre"}, "train": {"clip": 5.0}})
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

N_STAGES = 3


class ConfigError(ValueError):
    """A user-supplied configuration value is not allowed."""


def did_you_mean(word: str, candidates: Any) -> str:
    """'; did you mean X?' for the closest of `candidates` to a typo'd `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _number(
    key: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    integer: bool = False,
) -> Any:
    """Check that `value` is a number in range; return it as int or float."""
    what = "an integer" if integer else "a number"
    rng = ""
    if lo is not None:
        rng += f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        rng += f"{' and' if rng else ''} <= {hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, what + rng)
    if integer and not float(value).is_integer():
        _fail(key, value, what + rng)
    if not math.isfinite(value):
        _fail(key, value, "a finite " + what[2:] + rng)
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(key, value, what + rng)
    if hi is not None and value > hi:
        _fail(key, value, what + rng)
    return int(value) if integer else float(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        _fail(key, value, "one of " + ", ".join(allowed) + did_you_mean(value, allowed))
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def _per_stage(key: str, value: Any, last_key: str | None = None, **number_kw: Any) -> list:
    """A knob given once for all stages or as one value per stage.

    `last_key` names the last stage's value when it has a short alias (`residual`).
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value] * N_STAGES
    if len(values) != N_STAGES:
        _fail(key, value, f"one value or a list of {N_STAGES} (one per stage)")
    keys = [f"{key}[{i}]" for i in range(N_STAGES)]
    if last_key:
        keys[-1] = last_key
    return [_number(k, v, **number_kw) for k, v in zip(keys, values)]


# Norm placement in every transformer layer: post (x <- LN(x + f(x))), pre (x <- x + f(LN(x))),
# deepnorm (x <- LN(alpha x + f(x)) with beta-scaled init; Wang et al. 2022, arXiv 2203.00555).
NORMS = ("pre", "post", "deepnorm")


def _check_stabilizers(cfg: Any) -> None:
    """The layer-level stabilizer flags both workloads share (short names: see conf/config.yaml).

    qk_norm: LayerNorm/RMSNorm on queries and keys (Wortsman et al. 2023, arXiv 2309.14322);
    sigma_reparam: W <- gamma / sigma(W) * W on attention and MLP weights (Zhai et al. 2023,
    arXiv 2303.06296); v_scale: v <- phi(|v|^2) v per head (Chen & Yao, arXiv 2603.17771).
    """
    for key in ("qk_norm", "sigma_reparam", "v_scale"):
        _flag(key, getattr(cfg, key))


@dataclass
class ModelConfig:
    """The cascade transformer (SPEC §2). Lists are per stage (0, 1, 2)."""

    name: str = "cascade"
    d_model: Any = field(default_factory=lambda: [64, 96, 96])
    n_layers: Any = 4
    n_heads: Any = 4
    residual: Any = field(default_factory=lambda: [1.0, 1.0, 0.1])
    norm: str = "post"
    norm_type: str = "layer"
    final_norm: bool = True
    spectral_norm: bool = False
    rms_match: bool = True
    rms_clamp: Any = field(default_factory=lambda: [0.7, 1.5])
    mlp_ratio: int = 4
    latent_dim: int = 128
    init_std: float = 0.02  # std of linear weights at init; 0: Xavier-uniform
    qk_norm: bool = False  # stabilizers shared with the char LM: see `_check_stabilizers`
    sigma_reparam: bool = False
    v_scale: bool = False

    def __post_init__(self) -> None:
        _choice("model.name", self.name, ("cascade",))
        self.d_model = _per_stage("model.d_model", self.d_model, lo=1, integer=True)
        self.n_layers = _per_stage("model.n_layers", self.n_layers, lo=1, hi=96, integer=True)
        self.n_heads = _per_stage("model.n_heads", self.n_heads, lo=1, integer=True)
        for i, (d, h) in enumerate(zip(self.d_model, self.n_heads)):
            if d % h:
                _fail(f"model.n_heads[{i}]", h, f"a divisor of model.d_model[{i}]={d}")
        self.residual = _per_stage("model.residual", self.residual, "residual", lo=0.0, hi=10.0)
        _choice("norm", self.norm, NORMS)
        _choice("model.norm_type", self.norm_type, ("layer", "rms"))
        _flag("model.final_norm", self.final_norm)
        _flag("spectral_norm", self.spectral_norm)
        _check_stabilizers(self)
        _flag("model.rms_match", self.rms_match)
        if not isinstance(self.rms_clamp, (list, tuple)) or len(self.rms_clamp) != 2:
            _fail("model.rms_clamp", self.rms_clamp, "[lo, hi] with 0 < lo <= 1 <= hi")
        lo = _number("model.rms_clamp[0]", self.rms_clamp[0], lo=0.0, lo_open=True, hi=1.0)
        hi = _number("model.rms_clamp[1]", self.rms_clamp[1], lo=1.0)
        self.rms_clamp = [lo, hi]
        self.mlp_ratio = _number("model.mlp_ratio", self.mlp_ratio, lo=1, hi=16, integer=True)
        self.latent_dim = _number("model.latent_dim", self.latent_dim, lo=1, integer=True)
        self.init_std = _number("model.init_std", self.init_std, lo=0.0, hi=10.0)


@dataclass
class CodecConfig:
    """Which EnCodec weights encode the audio (SPEC §3)."""

    weights: str = "random"  # random | pretrained | path to a checkpoint file
    seed: int = 0  # seeds random-init weights and the codebook k-means
    calib_codebooks: int = 2  # RVQ codebooks calibrated by k-means when weights are random

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights:
            _fail("data.codec.weights", self.weights, "random, pretrained or a checkpoint path")
        self.seed = _number("data.codec.seed", self.seed, lo=0, integer=True)
        self.calib_codebooks = _number("data.codec.calib_codebooks", self.calib_codebooks, lo=1, hi=32, integer=True)


@dataclass
class DataConfig:
    """Audio pairs encoded to EnCodec latents: embedded synthetic clips, or a folder of your own."""

    name: str = "synthetic"  # synthetic | folder
    n_train: Any = 64  # clips (folder: at most this many training segments; null = all)
    n_val: int = 8  # clips; the first `scream_items` are the fixed scream-check batch
    seconds: float = 2.0  # clip length; 75 latent frames per second
    seed: int = 0  # seeds the generated audio (folder: the train/validation split)
    latent_rms: Any = (
        "auto"  # auto (seed: input 5.66, target 5.69) | off | positive float: rescale each side to this RMS
    )
    latent_center: str = "auto"  # auto | on | off: remove the per-channel offset before scaling
    cache_dir: Any = None  # null: $STAB_CACHE or ~/.cache/stab
    path: Any = None  # folder data: the folder holding input/ and target/
    on_bad_file: str = "error"  # folder data: error | skip (with a warning) on a bad file or pair
    codec: CodecConfig = field(default_factory=CodecConfig)

    def __post_init__(self) -> None:
        if isinstance(self.codec, dict):
            self.codec = _build(CodecConfig, self.codec, "data.codec")
        _choice("data.name", self.name, ("synthetic", "folder"))
        _choice("data.on_bad_file", self.on_bad_file, ("error", "skip"))
        if self.name == "folder":
            if not isinstance(self.path, str) or not self.path:
                _fail("data.path", self.path, "the folder holding input/ and target/ (data=folder data.path=DIR)")
            if self.n_train is not None:  # null: every segment of the folder
                self.n_train = _number("data.n_train", self.n_train, lo=1, integer=True)
        else:
            self.n_train = _number("data.n_train", self.n_train, lo=1, integer=True)
        self.n_val = _number("data.n_val", self.n_val, lo=1, integer=True)
        self.seconds = _number("data.seconds", self.seconds, lo=0.1, hi=600.0)
        self.seed = _number("data.seed", self.seed, lo=0, integer=True)
        if self.latent_rms not in ("auto", "off", None):
            if isinstance(self.latent_rms, (str, bool)):
                _fail("data.latent_rms", self.latent_rms, "auto, off or a number > 0")
            self.latent_rms = _number("data.latent_rms", self.latent_rms, lo=0.0, lo_open=True)
        if self.latent_rms is None:
            self.latent_rms = "off"
        _choice("data.latent_center", self.latent_center, ("auto", "on", "off"))
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            _fail("data.cache_dir", self.cache_dir, "a folder path or null")


@dataclass
class TrainConfig:
    """The optimisation loop: AdamW with linear warmup, epochs x batches."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: Any = field(default_factory=lambda: [0.9, 0.95])
    warmup: int = 10  # steps of linear learning-rate warmup
    clip: Any = 10.0  # total-norm clipping threshold, or "none"
    on_nan: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    stop_early: bool = False  # stop once the verdict is certain to be unstable (see detectors.certainly_unstable)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Any = None  # torch CPU threads; null: all cores (split among concurrent jobs)
    precision: str = "fp32"  # fp32 | bf16 (autocast of forward and loss)
    compile: bool = False  # torch.compile the model
    sync_every: int = 1  # steps whose measurements stay on the device between host transfers
    # Recovery policies (stability/recovery.py): what a detected spike does, and update clipping.
    on_spike: str = "none"  # none | skip (OLMo-core's SkipStepAdamW rule) | backoff (lower the lr)
    spike_window: int = 128  # steps in the on-device spike detector's window (OLMo-core: 128)
    spike_sigma: float = 6.0  # a loss or total grad norm this many std above the window's mean (OLMo-core: 6)
    backoff_factor: float = 0.5  # on_spike=backoff: the lr multiplier at a spike ...
    backoff_steps: int = 100  # ... growing back geometrically to 1 over this many steps
    update_clip: Any = None  # StableAdamW update clipping threshold (arXiv 2304.13013: 1.0), or none
    snapshot_every: int = 0  # steps between snapshots in RUN/snapshots/ (0: none), for stab doctor --try
    snapshot_keep: int = 4  # snapshots kept, spread over the run
    rewind_from: Any = None  # a snapshot file (RUN/snapshots/stepN.pt) to continue a run from

    def __post_init__(self) -> None:
        self.epochs = _number("train.epochs", self.epochs, lo=1, integer=True)
        self.batch_size = _number("train.batch_size", self.batch_size, lo=1, integer=True)
        self.lr = _number("train.lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        self.weight_decay = _number("train.weight_decay", self.weight_decay, lo=0.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            _fail("train.betas", self.betas, "[beta1, beta2] in [0, 1)")
        self.betas = [_number(f"train.betas[{i}]", b, lo=0.0, hi=0.9999) for i, b in enumerate(self.betas)]
        self.warmup = _number("train.warmup", self.warmup, lo=0, integer=True)
        self.clip = parse_clip(self.clip)
        _choice("train.on_nan", self.on_nan, ("stop", "skip"))
        _flag("train.stop_early", self.stop_early)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            _fail("train.device", self.device, "auto, cpu, cuda or cuda:N")
        if self.threads is not None:
            self.threads = _number("train.threads", self.threads, lo=1, hi=1024, integer=True)
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        _flag("train.compile", self.compile)
        self.sync_every = _number("train.sync_every", self.sync_every, lo=1, hi=10_000, integer=True)
        _choice("train.on_spike", self.on_spike, ON_SPIKE)
        self.spike_window = _number("train.spike_window", self.spike_window, lo=2, hi=100_000, integer=True)
        self.spike_sigma = _number("train.spike_sigma", self.spike_sigma, lo=0.0, lo_open=True)
        self.backoff_factor = _number("train.backoff_factor", self.backoff_factor, lo=0.0, lo_open=True, hi=0.999)
        self.backoff_steps = _number("train.backoff_steps", self.backoff_steps, lo=1, integer=True)
        self.update_clip = parse_positive("update_clip", self.update_clip, "a positive number (StableAdamW: 1.0)")
        self.snapshot_every = _number("train.snapshot_every", self.snapshot_every, lo=0, integer=True)
        self.snapshot_keep = _number("train.snapshot_keep", self.snapshot_keep, lo=1, hi=1000, integer=True)
        if self.rewind_from is not None and (not isinstance(self.rewind_from, str) or not self.rewind_from):
            _fail("train.rewind_from", self.rewind_from, "null or the path of a snapshot file (RUN/snapshots/stepN.pt)")


ON_SPIKE = ("none", "skip", "backoff")  # train.on_spike (stability.recovery)


def parse_positive(key: str, value: Any, what: str) -> float | None:
    """`none|<positive float>` -> None or the number (`clip`, `update_clip`)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off")):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            _fail(key, value, "none or " + what)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        _fail(key, value, "none or " + what)  # a negative, zero or non-finite number: `none` is allowed too
    return _number(key, value, lo=0.0, lo_open=True)


def parse_clip(value: Any) -> float | None:
    """`clip=none|<positive float>` -> None or the threshold."""
    return parse_positive("clip", value, "a positive number (total gradient norm)")


@dataclass
class ScreamConfig:
    """When is an output 'one repeated token' (SPEC §4)."""

    dominant: float = 0.6  # degenerate if the most common code covers at least this share
    longest_run: float = 0.5  # ... or one code repeats for this share of the sequence
    n: int = 4  # n of distinct-n and seq-rep-n
    items: int = 4  # validation clips in the fixed scream-check batch (char LM: prompts)
    loop: float = 0.5  # char LM: ... or it ends in a loop of period <= loop_period this long (share)
    loop_period: int = 3  # char LM: longest period that still counts as a collapse ("e e e", "ab")
    seq_rep: float = 0.5  # ... or at least this share of its n-grams repeat an earlier one (seq-rep-n) where the
    #                       target's own seq-rep-n is below it ("the the the ale ale": 0.83 against 0.09)
    prompt_chars: int = 32  # char LM: characters of validation text each greedy generation starts from
    gen_chars: int = 128  # char LM: characters generated greedily from each prompt
    min_epochs: int = 2  # a scream is a collapse that lasts at least this many evaluated epochs ...
    learning: float = 0.05  # ... and not an undertrained model: collapsed to the end while the validation
    #                         loss is below its start and still falls by more than this share per epoch

    def __post_init__(self) -> None:
        self.dominant = _number("detect.scream.dominant", self.dominant, lo=0.0, lo_open=True, hi=1.0)
        self.longest_run = _number("detect.scream.longest_run", self.longest_run, lo=0.0, lo_open=True, hi=1.0)
        self.n = _number("detect.scream.n", self.n, lo=1, hi=16, integer=True)
        self.items = _number("detect.scream.items", self.items, lo=1, integer=True)
        self.loop = _number("detect.scream.loop", self.loop, lo=0.0, lo_open=True, hi=1.0)
        self.loop_period = _number("detect.scream.loop_period", self.loop_period, lo=1, hi=64, integer=True)
        self.prompt_chars = _number("detect.scream.prompt_chars", self.prompt_chars, lo=1, integer=True)
        self.gen_chars = _number("detect.scream.gen_chars", self.gen_chars, lo=8, hi=100_000, integer=True)
        self.min_epochs = _number("detect.scream.min_epochs", self.min_epochs, lo=1, integer=True)
        self.learning = _number("detect.scream.learning", self.learning, lo=0.0, hi=1.0)
        self.seq_rep = _number("detect.scream.seq_rep", self.seq_rep, lo=0.0, lo_open=True, hi=1.0)


@dataclass
class DetectConfig:
    """Thresholds of the detectors that turn histories into events and a verdict."""

    explode_factor: float = 2.0  # 'exploding' if grad norm grows by more than this per epoch ...
    explode_window: int = 3  # ... over this many consecutive epochs (geometric mean)
    explode_step_factor: float = 1000.0  # ... or if one step's (finite) grad norm exceeds the run's median by this
    spike_window: int = 20  # steps in the running baseline of the spike detector
    spike_z: float = 6.0  # robust z-score (median/MAD) that counts as a spike
    spike_warmup: int = 10  # steps before spikes are looked for
    spike_ratio: float = 3.0  # ... and a spike is at least this many times the running median
    health: bool = True  # attention/activation health on the validation batch each epoch
    clamp_warn: float = 0.5  # warn when a stage's RMS-match clamp binds on more than this share of steps
    logit_growth: float = 10.0  # quote the max attention logit's growth when it grew by this factor (supporting)
    attn_logit_max: float = 50.0  # warn when the max attention logit reaches this (near one-hot attention)
    attn_entropy_min: float = 0.1  # warn when a layer's mean attention entropy falls to this (nats)
    band: float = 0.1  # relative band around a threshold: a value within it is `borderline`; a collapse
    #                    ends only below (1 - band) x its threshold (hysteresis)
    opt_state: bool = False  # optimizer-state and output signals every step (stability/optstate.py); off: cost
    scream: ScreamConfig = field(default_factory=ScreamConfig)

    def __post_init__(self) -> None:
        _flag("detect.health", self.health)
        _flag("detect.opt_state", self.opt_state)
        if isinstance(self.scream, dict):
            self.scream = _build(ScreamConfig, self.scream, "detect.scream")
        self.explode_factor = _number("detect.explode_factor", self.explode_factor, lo=1.0, lo_open=True)
        self.explode_window = _number("detect.explode_window", self.explode_window, lo=2, integer=True)
        self.clamp_warn = _number("detect.clamp_warn", self.clamp_warn, lo=0.0, hi=1.0)
        self.logit_growth = _number("detect.logit_growth", self.logit_growth, lo=1.0, lo_open=True)
        self.attn_logit_max = _number("detect.attn_logit_max", self.attn_logit_max, lo=0.0, lo_open=True)
        self.attn_entropy_min = _number("detect.attn_entropy_min", self.attn_entropy_min, lo=0.0)
        self.band = _number("detect.band", self.band, lo=0.0, hi=0.5)
        self.explode_step_factor = _number("detect.explode_step_factor", self.explode_step_factor, lo=1.0, lo_open=True)
        self.spike_window = _number("detect.spike_window", self.spike_window, lo=3, integer=True)
        self.spike_z = _number("detect.spike_z", self.spike_z, lo=0.0, lo_open=True)
        self.spike_warmup = _number("detect.spike_warmup", self.spike_warmup, lo=0, integer=True)
        self.spike_ratio = _number("detect.spike_ratio", self.spike_ratio, lo=1.0)


@dataclass
class FaultConfig:
    """Fault injection, for checking that the detectors and the sweep's bookkeeping work."""

    nan_at_step: Any = None  # global step (0-based) whose forward produces a NaN
    nan_module: str = "stage2.layer0.mlp"  # module group whose output the NaN is put into
    crash_at_step: Any = None  # global step at which the job raises an exception
    spike_at_step: Any = None  # global step whose loss (and so gradient) is multiplied by spike_factor
    spike_factor: float = 100.0

    def __post_init__(self) -> None:
        self.spike_factor = _number("fault.spike_factor", self.spike_factor, lo=0.0, lo_open=True)
        for key in ("nan_at_step", "crash_at_step", "spike_at_step"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, _number(f"fault.{key}", value, lo=0, integer=True))


@dataclass
class MarginConfig:
    """`stab margin`: bracketing then bisection of the learning rate on a log scale (stability/margin.py)."""

    lo: float = 1e-3  # first bracket of learning rates
    hi: float = 1e-1
    tolerance: float = 1.5  # stop when largest stable / smallest unstable lr are within this factor
    steps: int = 10  # at most this many probe runs per configuration

    def __post_init__(self) -> None:
        self.lo = _number("margin.lo", self.lo, lo=0.0, lo_open=True, hi=10.0)
        self.hi = _number("margin.hi", self.hi, lo=0.0, lo_open=True, hi=10.0)
        if self.hi <= self.lo:
            _fail("margin.hi", self.hi, f"a learning rate above margin.lo={self.lo:g}")
        self.tolerance = _number("margin.tolerance", self.tolerance, lo=1.0, lo_open=True)
        self.steps = _number("margin.steps", self.steps, lo=2, hi=1000, integer=True)


@dataclass
class ListenConfig:
    """Decode the model's output on a few validation items to WAV files at chosen epochs."""

    epochs: Any = field(default_factory=list)  # epochs (1-based) to write audio at
    every: Any = None  # ... or every N epochs; null: only `epochs`
    items: int = 2  # validation items decoded (the first ones of the scream-check batch)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, (list, tuple)):
            _fail("listen.epochs", self.epochs, "a list of epochs, e.g. [1,5]")
        self.epochs = sorted({_number(f"listen.epochs[{i}]", e, lo=1, integer=True) for i, e in enumerate(self.epochs)})
        if self.every is not None:
            self.every = _number("listen.every", self.every, lo=1, integer=True)
        self.items = _number("listen.items", self.items, lo=1, hi=64, integer=True)

    @property
    def enabled(self) -> bool:
        return bool(self.epochs or self.every)

    def at(self, epoch: int) -> bool:
        return epoch in self.epochs or bool(self.every and epoch % self.every == 0)


@dataclass
class CharLMConfig:
    """The character-level causal LM (`model=charlm`): the text-side scream, same layers and knobs."""

    name: str = "charlm"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    context: int = 64  # characters the model attends over (block size)
    mlp_ratio: int = 4
    norm: str = "post"
    norm_type: str = "layer"
    final_norm: bool = True
    spectral_norm: bool = False  # on the lm_head, the char LM's output projection
    init_std: float = 0.02  # std of linear weights at init; 0: Xavier-uniform
    embed_scale: bool = False  # embeddings N(0, 1/d) times sqrt(d) (Vaswani et al. 2017), not GPT-2's N(0, 0.02)
    qk_norm: bool = False  # shared stabilizers: see `_check_stabilizers`
    sigma_reparam: bool = False
    v_scale: bool = False
    z_loss: float = 0.0  # coefficient on log^2 Z of the output softmax (Wortsman et al. 2023: 1e-4)

    def __post_init__(self) -> None:
        _choice("model.name", self.name, ("charlm",))
        self.d_model = _number("model.d_model", self.d_model, lo=1, integer=True)
        self.n_layers = _number("model.n_layers", self.n_layers, lo=1, hi=96, integer=True)
        self.n_heads = _number("model.n_heads", self.n_heads, lo=1, integer=True)
        if self.d_model % self.n_heads:
            _fail("model.n_heads", self.n_heads, f"a divisor of model.d_model={self.d_model}")
        self.context = _number("model.context", self.context, lo=2, hi=65536, integer=True)
        _flag("model.embed_scale", self.embed_scale)
        self.mlp_ratio = _number("model.mlp_ratio", self.mlp_ratio, lo=1, hi=16, integer=True)
        _choice("norm", self.norm, NORMS)
        _choice("model.norm_type", self.norm_type, ("layer", "rms"))
        _flag("model.final_norm", self.final_norm)
        _flag("spectral_norm", self.spectral_norm)
        self.init_std = _number("model.init_std", self.init_std, lo=0.0, hi=10.0)
        _check_stabilizers(self)
        self.z_loss = _number("z_loss", self.z_loss, lo=0.0, hi=1.0)


@dataclass
class TextDataConfig:
    """Text for the char LM: the embedded corpus (the docstrings of this Python's standard
    library, read at run time) or a UTF-8 text file of your own (`data.path`)."""

    name: str = "text"
    path: Any = None  # null: the embedded corpus; else a UTF-8 text file
    max_chars: Any = 200_000  # read at most this many characters; null: all
    val_fraction: float = 0.1  # share of the chunks held out for validation
    chunk_chars: int = 1024  # the split assigns whole chunks of this many characters
    seed: int = 0  # seeds the train/validation split
    n_val: int = 64  # validation windows (of model.context characters) the validation loss averages

    def __post_init__(self) -> None:
        _choice("data.name", self.name, ("text",))
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            _fail("data.path", self.path, "null (the embedded corpus) or the path of a UTF-8 text file")
        if self.max_chars is not None:
            self.max_chars = _number("data.max_chars", self.max_chars, lo=1000, integer=True)
        self.val_fraction = _number("data.val_fraction", self.val_fraction, lo=0.0, lo_open=True, hi=0.5)
        self.chunk_chars = _number("data.chunk_chars", self.chunk_chars, lo=64, integer=True)
        self.seed = _number("data.seed", self.seed, lo=0, integer=True)
        self.n_val = _number("data.n_val", self.n_val, lo=1, integer=True)


OWN_LOOP = "(own loop)"  # model._target_ of a run recorded by stab's Monitor without a factory


@dataclass
class CustomModelConfig:
    """Your own model (`model=custom model._target_=my_pkg.my_module.build`): `target` is the
    dotted path of a factory function; `params` are the other `model.*` keys, passed to it as
    keyword arguments (`+model.width=64` -> `build(width=64)`). A factory parameter named like a
    short name (norm, residual, ...) receives that short name's value. The factory and what it
    returns are checked before training (`stability.workloads.custom`)."""

    name: str = "custom"
    target: Any = None  # written `_target_` in YAML and on the command line, as Hydra's instantiate reads it
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("model.name", self.name, ("custom",))
        if not isinstance(self.target, str) or not self.target or self.target.startswith("."):
            _fail(
                "model._target_",
                self.target,
                "the dotted path of your factory function, e.g. model._target_=my_pkg.my_module.build",
            )

    def __getattr__(self, key: str) -> Any:  # model.norm etc. where the factory declares them
        params = self.__dict__.get("params") or {}
        if key in params:
            return params[key]
        raise AttributeError(key)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], prefix: str) -> CustomModelConfig:
        rest = {k: v for k, v in raw.items() if k not in ("name", "_target_", "target")}
        return cls(name=raw.get("name", "custom"), target=raw.get("_target_", raw.get("target")), params=rest)

    def to_dict(self) -> dict[str, Any]:
        """As written in YAML: name, `_target_`, then the factory's keys (report factors: model.width)."""
        return {"name": self.name, "_target_": self.target, **self.params}


@dataclass
class NoDataConfig:
    """`data=none`: the workload brings its own data (model=custom: the factory returns it)."""

    name: str = "none"

    def __post_init__(self) -> None:
        _choice("data.name", self.name, ("none",))


# Trackers that receive the run folder's records (stability/trackers.py); `log` is operational.
TRACKERS = ("tensorboard", "mlflow", "wandb")


def parse_log(value: Any) -> list[str]:
    """`log=none | NAME | [NAME,...]` -> the trackers, in the order given, each once."""
    allowed = f"one of {', '.join(TRACKERS)}, a list of them (log=[tensorboard,mlflow]) or none"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off", "")):
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        _fail("log", value, allowed)
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            _fail("log", name, allowed)
        if name not in out:
            out.append(name)
    return out


@dataclass
class RunConfig:
    """Everything that defines one training run."""

    seed: int = 0
    model: ModelConfig | CharLMConfig | CustomModelConfig = field(default_factory=ModelConfig)  # by model.name
    data: DataConfig | TextDataConfig | NoDataConfig = field(default_factory=DataConfig)  # by data.name
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)  # `stab margin` only (operational)
    log: Any = field(default_factory=list)  # trackers: [] | [tensorboard, mlflow, wandb] (operational)

    def __post_init__(self) -> None:
        self.seed = _number("seed", self.seed, lo=0, integer=True)
        self.log = parse_log(self.log)
        text_model, text_data = self.model.name == "charlm", self.data.name == "text"
        if text_model and not text_data:
            _fail("data.name", self.data.name, "text with model=charlm (the char LM reads text: data=text)")
        custom_model, no_data = self.model.name == "custom", self.data.name == "none"
        if custom_model and not no_data:
            _fail(
                "data.name",
                self.data.name,
                "none with model=custom (your factory returns the data; in your own "
                "model file: `defaults: [override /data: none]`)",
            )
        if no_data and not custom_model:
            _fail("data.name", self.data.name, f"data for model={self.model.name}: data=none is for model=custom")
        if text_data and not text_model:
            _fail("data.name", self.data.name, f"audio data with model={self.model.name} (text is for model=charlm)")
        late = [e for e in self.listen.epochs if e > self.train.epochs]
        if late:
            _fail("listen.epochs", self.listen.epochs, f"epochs between 1 and train.epochs={self.train.epochs}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a plain nested mapping; unknown keys are errors."""
        return _build(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
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
        if getattr(self.model, "rms_match", False) is False and hasattr(self.model, "rms_clamp"):
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

_NESTED = {
    ("RunConfig", "model"): ModelConfig,
    ("RunConfig", "data"): DataConfig,
    ("RunConfig", "train"): TrainConfig,
    ("RunConfig", "detect"): DetectConfig,
    ("RunConfig", "fault"): FaultConfig,
    ("RunConfig", "listen"): ListenConfig,
    ("RunConfig", "margin"): MarginConfig,
}


# Sections whose dataclass depends on their `name`: the char LM and the text it reads.
_VARIANTS = {
    ("RunConfig", "model"): {"charlm": CharLMConfig, "custom": CustomModelConfig},
    ("RunConfig", "data"): {"text": TextDataConfig, "none": NoDataConfig},
}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        _fail(prefix or "config", raw, "a mapping")
    if hasattr(cls, "from_mapping"):  # free-form keys (a custom model's own)
        return cls.from_mapping(raw, prefix)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key {key!r}: allowed keys here are {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        sub: type | None = _NESTED.get((cls.__name__, name))
        if isinstance(value, dict):
            variants: dict[Any, type] = _VARIANTS.get((cls.__name__, name), {})
            sub = variants.get(value.get("name"), sub)
        kwargs[name] = _build(sub, value, f"{prefix}.{name}" if prefix else name) if sub else value
    return cls(**kwargs)


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
# and its path are one factor) and the trackers' params all read it. Defaults are in
# conf/config.yaml.
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
