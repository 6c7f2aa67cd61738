"""Typed run configuration: what the library accepts, validated where it enters.

The CLI composes YAML from `conf/` with Hydra and hands the resolved mapping to
`RunConfig.from_dict`; nothing in `stability/` knows about Hydra. The schema (`schema.py`) is
frozen pydantic v2 models built from the value types in `values.py`; a value it does not allow
raises `ConfigError` with one line naming the key, the bad value and what is allowed
(`messages.explain`), so the CLI can print it and exit before any work starts. `names.py` holds
the key names the rest of stab reads (short names, operational keys).

    cfg = RunConfig.from_dict({"model": {"norm": "pre"}, "train": {"clip": 5.0}})
    cfg = cfg.resolve(threads=2, device="cpu")  # operational values decided later: a new config
"""

from stability.config.messages import ConfigError, did_you_mean, explain
from stability.config.names import N_STAGES, OPERATIONAL_KEYS, SHORT_NAMES, ShortName, flatten
from stability.config.schema import (
    OWN_LOOP,
    CharLMConfig,
    CodecConfig,
    CustomModelConfig,
    DataConfig,
    DetectConfig,
    FaultConfig,
    ListenConfig,
    MarginConfig,
    ModelConfig,
    NoDataConfig,
    RunConfig,
    ScreamConfig,
    Section,
    TextDataConfig,
    TrainConfig,
    TransformerConfig,
    data_for,
)
from stability.config.values import TRACKERS

__all__ = [
    "N_STAGES",
    "OPERATIONAL_KEYS",
    "OWN_LOOP",
    "SHORT_NAMES",
    "TRACKERS",
    "CharLMConfig",
    "CodecConfig",
    "ConfigError",
    "CustomModelConfig",
    "DataConfig",
    "DetectConfig",
    "FaultConfig",
    "ListenConfig",
    "MarginConfig",
    "ModelConfig",
    "NoDataConfig",
    "RunConfig",
    "ScreamConfig",
    "Section",
    "ShortName",
    "TextDataConfig",
    "TrainConfig",
    "TransformerConfig",
    "data_for",
    "did_you_mean",
    "explain",
    "flatten",
]
