"""The Hydra adapter for single runs: compose `conf/` with overrides into a `RunConfig`.

Hydra and OmegaConf stop here; `stability/` receives plain dataclasses. Struct mode stays on,
so a typo'd key fails with Hydra's message, which `UserError` turns into one line.

    cfg, overrides = compose_run(["preset=smoke", "norm=pre"])
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from stability.config import SHORT_NAMES, ConfigError, RunConfig, did_you_mean

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Top-level keys that are not RunConfig fields: the short names, interpolated into groups.
ALIASES = tuple(SHORT_NAMES)
GROUP_KEYS = ("preset", "experiment")
# Folders added to Hydra's config search path by `--config-dir` (a user's own conf/ with e.g.
# model/my_transformer.yaml), searched after stab's conf/; set once per command.
CONFIG_DIRS: list[Path] = []


def set_config_dirs(dirs: list[Path] | None) -> None:
    """`--config-dir DIR`: DIR's config groups join stab's (as Hydra's own --config-dir does)."""
    CONFIG_DIRS[:] = []
    for d in dirs or []:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            raise UserError(
                f"--config-dir {str(d)!r} is not a folder: pass the folder holding your config groups "
                f"(e.g. ./conf with model/my_transformer.yaml)"
            )
        CONFIG_DIRS.append(d)
    named = _model_only_presets()
    if named is not None:
        CONFIG_DIRS.append(named)


def _model_only_presets() -> Path | None:
    """A folder naming the presets that a --config-dir defines only as model_preset/MODEL/NAME.yaml
    (no preset/NAME.yaml anywhere): `preset` is a config group, so Hydra needs the name there too.
    The folder holds an empty preset/NAME.yaml for each (in the temp folder, one per set of names);
    None when there are none."""
    dirs = (CONF_DIR, *CONFIG_DIRS)
    have = {p.stem for d in dirs for p in (d / "preset").glob("*.yaml")}
    names = sorted({p.stem for d in CONFIG_DIRS for p in (d / "model_preset").glob("*/*.yaml")} - have)
    if not names:
        return None
    folder = Path(tempfile.gettempdir()) / f"stab-presets-{hashlib.sha256(' '.join(names).encode()).hexdigest()[:12]}"
    (folder / "preset").mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / "preset" / f"{name}.yaml"
        if not path.exists():
            path.write_text(f"# @package _global_\n# preset={name}: its values are in model_preset/MODEL/{name}.yaml\n")
    return folder


def search_path_overrides() -> list[str]:
    """The `hydra.searchpath` override for `--config-dir` (none without it)."""
    if not CONFIG_DIRS:
        return []
    return ["hydra.searchpath=[" + ",".join(hydra_quote(f"file://{d}") for d in CONFIG_DIRS) + "]"]


def hydra_quote(text: str) -> str:
    """`text` as a quoted value of Hydra's override grammar that composes back to exactly `text`:
    a path is data, never grammar (`'`, `${...}`, `,`, `=`, brackets, spaces, backslashes).

    Two readers see it: Hydra's quoted string, where a backslash escapes only a quote or the
    backslashes before one (and the closing quote), and OmegaConf, where `\\${` is a literal `${`.

        hydra_quote("runs/it's here") == "'runs/it\\'s here'"
    """
    literal = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf: no interpolation
    quoted = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), literal)
    return f"'{quoted}'"


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def to_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Resolve interpolations, drop the aliases (already interpolated) and validate."""
    if isinstance(cfg, DictConfig):
        _declared_short_names(cfg)
    try:
        raw = _container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as e:
        raise UserError(_one_line(e)) from None
    if isinstance(cfg, DictConfig):
        _check_aliases_used(cfg, raw)
    for key in (*ALIASES, *GROUP_KEYS, "hydra", "launch"):
        raw.pop(key, None)
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _container(cfg: DictConfig, resolve: bool) -> dict[str, Any]:
    """`cfg` as plain dicts and lists (a DictConfig's container is a dict with str keys)."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=resolve))


def _declared_short_names(cfg: DictConfig) -> None:
    """A custom model's factory declares the short names it reads by naming them as parameters
    (`def build(norm="pre", width=64)`): each one not set in the model's own keys is read from the
    short name, `model.norm: ${norm}`, as conf/model/charlm.yaml does for the char LM."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or model.get("name") != "custom":
        return
    if OmegaConf.is_missing(model, "_target_"):
        raise UserError(
            "model=custom needs model._target_: the dotted path of your factory function, "
            "e.g. model._target_=my_pkg.my_module.build (docs/your-model.md)"
        )
    from stability.workloads.custom import factory_parameters

    try:
        params = factory_parameters(str(model["_target_"]))
    except ConfigError as e:
        raise UserError(str(e)) from None
    with open_dict(model):
        for alias, short in SHORT_NAMES.items():
            section, _, key = short.path.partition(".")
            if section == "model" and alias in params and key not in model and alias in cfg:
                model[key] = "${" + alias + "}"


def _check_aliases_used(cfg: DictConfig, resolved: dict[str, Any]) -> None:
    """A short name changed from its default that no key of the chosen model reads would be
    silently ignored (e.g. `residual` with model=charlm, `z_loss` with the cascade): refuse it."""
    unresolved = _container(cfg, resolve=False)
    read = json.dumps({k: v for k, v in unresolved.items() if k not in ALIASES}, default=str)
    root = _root_values()
    for alias in ALIASES:
        if alias in resolved and "${" + alias + "}" not in read and resolved[alias] != root.get(alias):
            model = (resolved.get("model") or {}).get("name", "?")
            if model == "custom":
                raise UserError(
                    f"{alias}={resolved[alias]!r} is not allowed with model._target_="
                    f"{resolved['model'].get('_target_')}: the factory does not read {alias} (give it a "
                    f"parameter named {alias}, or set model.{alias} in your model's config)"
                )
            users = [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if "${" + alias + "}" in p.read_text()]
            raise UserError(
                f"{alias}={resolved[alias]!r} is not allowed with model={model}: it does not read "
                f"{alias}" + (f" (model={' or model='.join(users)} does)" if users else "")
            )


@functools.lru_cache(maxsize=1)
def _root_values() -> dict[str, Any]:
    """The short names' defaults, as conf/config.yaml sets them."""
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    assert isinstance(root, DictConfig)
    return {k: v for k, v in _container(root, resolve=False).items() if k in ALIASES}


def check_override_syntax(overrides: list[str]) -> None:
    """Catch the shell's word splitting before Hydra does: `residual=0.1 0.3` or `residual=0.1, 0.3`
    gives an argument with no `=`, which Hydra reports as `missing EQUAL at '<EOF>'`."""
    for i, arg in enumerate(overrides):
        if "=" in arg or arg.startswith("~"):
            continue
        prev = overrides[i - 1] if i else ""
        keys = _keys_under("") + list(GROUP_KEYS)
        dotted = re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", arg)  # train.lr, not 0.3
        key_like = dotted or difflib.get_close_matches(arg, keys, n=1, cutoff=0.75)
        if "=" in prev and not prev.startswith("~") and not key_like:
            key, _, value = prev.partition("=")
            lst = f"{value.rstrip(',')},{arg}"
            raise UserError(
                f"{arg!r} is not an override (key=value): lists are written without spaces, "
                f"{key}={lst} (a sweep: stab sweep {key}={lst})"
            )
        raise UserError(
            f"{arg!r} is not an override: expected key=value, e.g. residual=0.3"
            + (did_you_mean(arg, keys).replace("?", "=...?") if not dotted else "")
        )


def _unknown_key(key: str, others: list[str]) -> str:
    """`unknown key 'train.lrr': ...; did you mean train.lr?`, also when a parent is misspelt."""
    parts = key.lstrip("+~").split(".")
    for depth in range(len(parts)):  # the first part of the path that does not exist
        parent = ".".join(parts[:depth])
        keys = _keys_under(parent, others)
        if parts[depth] not in keys:
            break
    near = did_you_mean(parts[depth], keys + (list(GROUP_KEYS) if not parent else []))
    if near:  # suggest the whole corrected key: trian.lr -> train.lr
        near = f"; did you mean {'.'.join([*parts[:depth], near[len('; did you mean ') : -1], *parts[depth + 1 :]])}?"
    where = f" under {parent}" if parent else ""
    if parent == "model" and "_target_" in keys and not key.startswith("+") and not near:
        # model=custom: the factory's arguments are new keys to stab's config, added with `+`
        near = f"; a keyword argument of your factory is a new key: write +{key}=..."
    return f"unknown key {key!r}: allowed keys{where} are {', '.join(keys)}{near}"


def _one_line(e: BaseException, overrides: Sequence[str] = ()) -> str:
    """Hydra's multi-line messages, made into one line that names the key and what is allowed."""
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        return _unknown_key(key, [o for o in overrides if not o.lstrip("+~").startswith(key + "=")])
    m = re.search(r"Could not find 'model_preset/([^/']+)/([^']+)'", text)
    if m:  # a preset with no values for this model
        have = sorted(p.stem for p in (CONF_DIR / "model_preset" / m.group(1)).glob("*.yaml"))
        return (
            f"preset={m.group(2)!r} is not allowed with model={m.group(1)}: expected one of {', '.join(have)}"
            + did_you_mean(m.group(2), have)
        )
    m = re.search(
        r"Could not find '([^/']+)/([^']*)'.*?Available options in '[^']+':\s*(.*?)\s*Config search path", text, re.S
    )
    if m:
        have = m.group(3).split()
        return f"{m.group(1)}={m.group(2)!r} is not allowed: expected one of {', '.join(have)}" + did_you_mean(
            m.group(2), have
        )
    m = re.search(r"LexerNoViableAltException: (\S+?)=(.*?)\s*\^", text)
    if m:  # characters Hydra's override grammar does not take unquoted (~, non-ASCII, ...)
        key, value = m.group(1), m.group(2)
        return (
            f"{key}={value!r}: Hydra's override grammar cannot read this value unquoted; quote it: \"{key}='{value}'\""
        )
    m = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if m:
        key, _, value = m.group(1).partition("=")
        first = [f"{key}={value.split(',')[0]}" if o == m.group(1) else o for o in overrides]
        try:  # a misspelt key is the first thing to say, before how to sweep it
            compose_config(first)
        except UserError as inner:
            if "unknown key" in str(inner) or "is not allowed" in str(inner):
                return str(inner)
        quote = f"if the comma belongs to one value, quote it: \"{key}='{value}'\""
        sweep = f"a comma list is a sweep: use `stab sweep {m.group(1)}` (or key=[a,b] for a list)"
        looks_like_one_value = any(c in value for c in "/ ")  # a path or words: quoting is the likely fix
        return f"{m.group(1)!r}: " + (f"{quote}; {sweep}" if looks_like_one_value else f"{sweep}; {quote}")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(("full_key", "object_type", "reference_type")))


def _keys_under(parent: str, overrides: Sequence[str] = ()) -> list[str]:
    """Keys under `parent` in the config the other overrides compose (model=charlm has its own)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            base = compose(
                config_name="config", overrides=[o for o in overrides if "," not in o] + search_path_overrides()
            )
        except (HydraException, OmegaConfBaseException):
            base = compose(config_name="config", overrides=search_path_overrides())
    node = OmegaConf.select(base, parent) if parent else base
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra override syntax; errors become `UserError`."""
    check_override_syntax(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(
                config_name="config", overrides=list(overrides) + search_path_overrides(), return_hydra_config=True
            )
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(_one_line(e, list(overrides))) from None
    _check_preset(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _check_preset(choices: Any) -> None:
    """`model_preset` is optional in the defaults list (your own model needs no presets); a preset
    other than `default` must still exist for the chosen model, in stab's conf/ or a --config-dir."""
    model, preset = choices.get("model"), choices.get("preset")
    if not preset or preset == "default":
        return
    folders = [d / "model_preset" / str(model) for d in (CONF_DIR, *CONFIG_DIRS)]
    if any((f / f"{preset}.yaml").exists() for f in folders):
        return
    have = sorted({p.stem for f in folders for p in f.glob("*.yaml")})
    raise UserError(
        f"preset={preset!r} is not allowed with model={model}: expected "
        + (
            f"one of {', '.join(have)}" + did_you_mean(preset, have)
            if have
            else f"default (model={model} has no presets: add model_preset/{model}/{preset}.yaml)"
        )
    )


def compose_run(overrides: list[str]) -> RunConfig:
    return to_run_config(compose_config(overrides))
