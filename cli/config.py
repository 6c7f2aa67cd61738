"""The Hydra adapter for single runs: compose `conf/` with overrides into a `RunConfig`.

Hydra and OmegaConf stop here; `stability/` receives plain dataclasses. Struct mode stays on,
so a typo'd key fails with Hydra's message, which `UserError` turns into one line.

    cfg, overrides = compose_run(["preset=smoke", "norm=pre"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stability.config import ConfigError, RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Top-level keys that are not RunConfig fields: the short aliases, interpolated into groups.
ALIASES = ("residual", "norm", "clip", "spectral_norm")
GROUP_KEYS = ("preset", "experiment")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def to_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Resolve interpolations, drop the aliases (already interpolated) and validate."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as e:
        raise UserError(_one_line(e)) from None
    for key in (*ALIASES, *GROUP_KEYS, "hydra", "launch"):
        raw.pop(key, None)
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line messages, made into one line that names the key and what is allowed."""
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        parent, _, _ = key.rpartition(".")
        return f"unknown key {key!r}: allowed keys{' under ' + parent if parent else ''} are " + \
            ", ".join(_keys_under(parent))
    m = re.search(r"Could not find '([^/']+)/([^']+)'.*?Available options in '[^']+':\s*(.*?)\s*Config search path",
                  text, re.S)
    if m:
        return f"{m.group(1)}={m.group(2)!r} is not allowed: expected one of {', '.join(m.group(3).split())}"
    m = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if m:
        return f"{m.group(1)!r}: a comma list is a sweep; use `stab sweep {m.group(1)}` (or key=[a,b] for a list)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(("full_key", "object_type", "reference_type")))


def _keys_under(parent: str) -> list[str]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        base = compose(config_name="config")
    node = OmegaConf.select(base, parent) if parent else base
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra override syntax; errors become `UserError`."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(_one_line(e)) from None


def compose_run(overrides: list[str]) -> RunConfig:
    return to_run_config(compose_config(overrides))
