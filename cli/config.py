"""The Hydra adapter for single runs: compose `conf/` with overrides into a `RunConfig`.

Hydra and OmegaConf stop here; `stability/` receives plain dataclasses. Struct mode stays on, so
a typo'd key fails; the one-line message is made from data, not from Hydra's error text: each
override as Hydra's own parser reads it, looked up in the config the other overrides compose
(the key, the bad value, what is allowed there, did-you-mean). A path given to a path key is data,
quoted on its way into Hydra. `--config-dir` folders travel as an argument (`dirs`).

    cfg = compose_run(["preset=smoke", "norm=pre"])
    cfg = compose_run(["model=my_transformer"], dirs=config_dirs([Path("conf")]))
"""

from __future__ import annotations

import difflib
import functools
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from stability.config import SHORT_NAMES, ConfigError, RunConfig, data_for, did_you_mean

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Top-level keys that are not RunConfig fields: the short names, interpolated into groups.
ALIASES = tuple(SHORT_NAMES)
GROUP_KEYS = ("preset", "experiment")
# Keys whose value is a path: what the user types is the path, never override grammar (a comma
# still separates a sweep's values; quote the path to keep one in it).
PATH_KEYS = ("data.path", "data.cache_dir", "data.codec.weights", "train.rewind_from")


def config_dirs(dirs: Sequence[Path] | None) -> tuple[Path, ...]:
    """`--config-dir DIR`: DIR's config groups join stab's (as Hydra's own --config-dir does),
    searched after stab's conf/. Returns the folders resolved; raises UserError for one that is
    not a folder."""
    out = []
    for d in dirs or []:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            raise UserError(
                f"--config-dir {str(d)!r} is not a folder: pass the folder holding your config groups "
                f"(e.g. ./conf with model/my_transformer.yaml)"
            )
        out.append(d)
    return tuple(out)


def search_path_overrides(dirs: Sequence[Path] = ()) -> list[str]:
    """The `hydra.searchpath` override for `--config-dir` folders (none without them)."""
    if not dirs:
        return []
    return ["hydra.searchpath=[" + ",".join(hydra_quote(f"file://{d}") for d in dirs) + "]"]


def paths_as_data(overrides: Sequence[str]) -> list[str]:
    """The overrides with each path key's value quoted for Hydra (`data.path=runs/it's here` ->
    `data.path='runs/it\\'s here'`), so `${...}`, quotes, `=`, brackets and spaces are part of the
    path. A value already quoted whole, `null`, or one with a comma (a sweep of paths) is left as
    the user wrote it."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+") in PATH_KEYS and value != "null" and "," not in value and not _quoted(value):
            o = f"{key}={hydra_quote(value)}"
        out.append(o)
    return out


def _quoted(value: str) -> bool:
    """`value` is one quoted string of Hydra's grammar (`'a, b'`), as the user may already write it."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        return isinstance(OverridesParser.create().parse_override(f"k={value}").value(), str)
    except HydraException:
        return False


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


def shell_override(key: str, value: str) -> str:
    """`key=value` as a hint prints it to copy: the value quoted for Hydra (`hydra_quote`), the
    whole quoted for a POSIX shell, so pasting it gives Hydra exactly `value`.

        shell_override("data.note", "a, b") == "\"data.note='a, b'\""
    """
    text = f"{key}={hydra_quote(value)}"
    # in a shell's double quotes, `\'` stays as it is; `"`, `$`, backquote, `!` and other
    # backslashes would be read by the shell
    return f'"{text}"' if not re.search(r"[\"$`!]|\\(?!')", text) else shlex.quote(text)


def shell_command(*words: str | Path) -> str:
    """A command for the user to copy, each word quoted for a POSIX shell only where it needs it
    (`stab report 'runs/my sweep'`)."""
    return shlex.join(str(w) for w in words)


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


class UnreadShortName(UserError):
    """A short name (`alias`: residual, z_loss, ...) set to a value that the chosen model does not
    read; the message is `head` (`residual=0.3`) then `rest` (why, and what to do)."""

    def __init__(self, alias: str, head: str, rest: str) -> None:
        super().__init__(head + rest)
        self.alias, self.head, self.rest = alias, head, rest


def _check_aliases_used(cfg: DictConfig, resolved: dict[str, Any]) -> None:
    """A short name changed from its default that no key of the chosen model reads would be
    silently ignored (e.g. `residual` with model=charlm, `z_loss` with the cascade): refuse it."""
    unresolved = _container(cfg, resolve=False)
    read = _interpolated({k: v for k, v in unresolved.items() if k not in ALIASES})
    root = _root_values()
    for alias in ALIASES:
        if alias in resolved and alias not in read and resolved[alias] != root.get(alias):
            model = (resolved.get("model") or {}).get("name", "?")
            if model == "custom":
                raise UnreadShortName(
                    alias,
                    f"{alias}={resolved[alias]!r}",
                    " is not allowed with model._target_="
                    f"{resolved['model'].get('_target_')}: the factory does not read {alias} (give it a "
                    f"parameter named {alias}, or set model.{alias} in your model's config)",
                )
            users = [
                p.stem
                for p in sorted((CONF_DIR / "model").glob("*.yaml"))
                if alias in _interpolated(_container(cast(DictConfig, OmegaConf.load(p)), resolve=False))
            ]
            raise UnreadShortName(
                alias,
                f"{alias}={resolved[alias]!r}",
                f" is not allowed with model={model}: it does not read "
                f"{alias}" + (f" (model={' or model='.join(users)} does)" if users else ""),
            )


def _interpolated(node: Any) -> set[str]:
    """The top-level keys that the values under `node` (a config as plain containers, unresolved)
    interpolate: `{"model": {"norm": "${norm}"}}` -> {"norm"}."""
    if isinstance(node, dict):
        return set().union(*(_interpolated(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_interpolated(v) for v in node))
    if isinstance(node, str) and "${" in node:
        return {name for name in ALIASES if "${" + name + "}" in node}
    return set()


@functools.lru_cache(maxsize=1)
def _root_values() -> dict[str, Any]:
    """The short names' defaults, as conf/config.yaml sets them."""
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    assert isinstance(root, DictConfig)
    return {k: v for k, v in _container(root, resolve=False).items() if k in ALIASES}


def check_override_syntax(overrides: list[str], dirs: Sequence[Path] = ()) -> None:
    """Catch the shell's word splitting before Hydra does: `residual=0.1 0.3` or `residual=0.1, 0.3`
    gives an argument with no `=`, which Hydra reports as `missing EQUAL at '<EOF>'`."""
    for i, arg in enumerate(overrides):
        if "=" in arg or arg.startswith("~"):
            continue
        prev = overrides[i - 1] if i else ""
        keys = _keys_under(_base((), dirs), "") + list(GROUP_KEYS)
        dotted = re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", arg)  # train.lr, not 0.3
        key_like = dotted or difflib.get_close_matches(arg, keys, n=1, cutoff=0.75)
        if "=" in prev and not prev.startswith("~") and not key_like:
            key, _, value = prev.partition("=")
            lst = f"{value.rstrip(',')},{arg}"
            raise UserError(
                f"{arg!r} is not an override (key=value): lists are written without spaces, "
                f"{key}={lst} (a sweep: {shell_command('stab', 'sweep', f'{key}={lst}')})"
            )
        raise UserError(
            f"{arg!r} is not an override: expected key=value, e.g. residual=0.3"
            + (did_you_mean(arg, keys).replace("?", "=...?") if not dotted else "")
        )


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Each override as Hydra's own parser reads it; one it cannot read is a UserError naming it
    and how to quote it (`~`, non-ASCII, an apostrophe: characters the grammar takes only quoted)."""
    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            out.append(parser.parse_override(text))
        except HydraException:
            key, _, value = text.partition("=")
            raise UserError(
                f"{key}={value!r}: Hydra's override grammar cannot read this value unquoted; "
                f"quote it: {shell_override(key, value)}"
            ) from None
    return out


def explain(overrides: Sequence[str], dirs: Sequence[Path] = ()) -> str | None:
    """What is wrong with `overrides`, in one line, found by looking each one up (not by reading
    Hydra's error): a group option that does not exist, a key the composed config does not have
    (`+` needed), a key that `+` would add twice. None when each one looks right."""
    parsed = parse_overrides(overrides)
    groups = _groups(dirs)
    for o in parsed:
        group = o.key_or_group
        if group not in groups or o.is_delete() or group == "preset":  # preset: _check_preset, per model
            continue
        have, model = _options(group, parsed, dirs)
        for value in o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]:
            if value not in have:
                where = f" with model={model}" if model else ""
                return f"{group}={value!r} is not allowed{where}: expected one of {', '.join(have)}" + did_you_mean(
                    value, have
                )
    base = _base([o.input_line or "" for o in parsed if o.key_or_group in groups], dirs)
    for o in parsed:
        key = o.key_or_group
        if key in groups or o.is_force_add() or key.startswith("hydra"):
            continue
        exists = _has_key(base, key)
        if o.is_add() and exists:
            value = (o.input_line or "").partition("=")[2]  # as typed: 1e-3, not Hydra's 0.001
            return f"{o.input_line!r}: {key} is already a key; set it without +: {key}={value}"
        if not o.is_add() and not exists:
            return _unknown_key(("~" if o.is_delete() else "") + key, base)
    return None


def _options(group: str, parsed: Sequence[Override], dirs: Sequence[Path]) -> tuple[list[str], str | None]:
    """The options of config group `group` (its .yaml files in conf/ and each --config-dir); for
    `data`, only those the chosen model reads (`stability.config.data_for`: model=charlm takes
    text, not synthetic), with that model's name (None where the model is not one choice)."""
    have = _group_options(group, dirs)
    models = [o for o in parsed if o.key_or_group == "model"]
    if group != "data" or any(o.is_sweep_override() for o in models):
        return have, None
    model = str(_base([o.input_line or "" for o in models], dirs).model.name)
    return [h for h in have if _data_name(h, dirs) in data_for(model)], model


def _data_name(option: str, dirs: Sequence[Path]) -> str:
    """The `data.name` that data option `option` (data/OPTION.yaml in conf/ or a --config-dir) sets."""
    for d in (CONF_DIR, *dirs):
        if (d / "data" / f"{option}.yaml").exists():
            loaded = OmegaConf.load(d / "data" / f"{option}.yaml")
            return str(loaded.get("name", option)) if isinstance(loaded, DictConfig) else option
    return option


def _one_line(e: BaseException, overrides: Sequence[str] = (), dirs: Sequence[Path] = ()) -> str:
    """The one line for a composition error: `explain`'s, else Hydra's own message on one line."""
    if overrides:
        found = explain(overrides, dirs)
        if found:
            return found
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(("full_key", "object_type", "reference_type")))


def _unknown_key(key: str, base: DictConfig) -> str:
    """`unknown key 'train.lrr': ...; did you mean train.lr?`, also when a parent is misspelt."""
    parts = key.lstrip("+~").split(".")
    for depth in range(len(parts)):  # the first part of the path that does not exist
        parent = ".".join(parts[:depth])
        keys = _keys_under(base, parent)
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


def _keys_under(base: DictConfig, parent: str) -> list[str]:
    """The keys of `base` under `parent` (a dotted path; '' for the root), sorted."""
    node: Any = _container(base, resolve=False)
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    return sorted(str(k) for k in node) if isinstance(node, dict) else []


def _has_key(base: DictConfig, key: str) -> bool:
    """`key` (dotted) is in `base`, whatever its value (`???` and interpolations included)."""
    node: Any = _container(base, resolve=False)
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _compose(overrides: Sequence[str], dirs: Sequence[Path], hydra_config: bool = False) -> DictConfig:
    """Hydra's Compose API over stab's conf/ and `dirs`; Hydra's and OmegaConf's errors as raised."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(
            config_name="config",
            overrides=[*overrides, *search_path_overrides(dirs)],
            return_hydra_config=hydra_config,
        )


def _base(group_overrides: Sequence[str], dirs: Sequence[Path]) -> DictConfig:
    """The config the group choices compose (model=charlm has keys of its own), or the defaults'
    where those choices do not compose."""
    try:
        return _compose([o for o in group_overrides if "," not in o], dirs)
    except (HydraException, OmegaConfBaseException):
        return _compose([], dirs)


def _groups(dirs: Sequence[Path]) -> set[str]:
    """The config groups of the defaults list (model, data, preset, experiment, ...)."""
    choices = _compose([], dirs, hydra_config=True).hydra.runtime.choices
    return {str(g) for g in choices if not str(g).startswith("hydra/")}


def _group_options(group: str, dirs: Sequence[Path]) -> list[str]:
    """The options of a config group: its .yaml files in stab's conf/ and each `--config-dir`."""
    return sorted({p.stem for d in (CONF_DIR, *dirs) for p in (d / group).glob("*.yaml")})


def compose_config(overrides: list[str], dirs: Sequence[Path] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra override syntax; errors become one-line `UserError`s."""
    overrides = paths_as_data(overrides)
    check_override_syntax(list(overrides), dirs)
    for o in parse_overrides(overrides):
        if o.is_sweep_override():  # one run: a comma list is a sweep, or one value to quote
            raise UserError(_a_list_in_one_run(o, overrides, dirs))
    try:
        cfg = _compose(overrides, dirs, hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(_one_line(e, overrides, dirs)) from None
    _check_preset(cfg.hydra.runtime.choices, dirs)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _a_list_in_one_run(o: Override, overrides: Sequence[str], dirs: Sequence[Path]) -> str:
    """`residual=0.1,0.3` given to `stab run`: a misspelt key first, else how to sweep or quote."""
    text = o.input_line or ""
    key, _, value = text.partition("=")
    first = [f"{key}={next(iter(o.sweep_string_iterator()))}" if x == text else x for x in overrides]
    found = explain(first, dirs)  # a misspelt key is the first thing to say, before how to sweep it
    if found:
        return found
    quote = f"if the comma belongs to one value, quote it: {shell_override(key, value)}"
    sweep = f"a comma list is a sweep: use `{shell_command('stab', 'sweep', text)}` (or key=[a,b] for a list)"
    looks_like_one_value = any(c in value for c in "/ ")  # a path or words: quoting is the likely fix
    return f"{text!r}: " + (f"{quote}; {sweep}" if looks_like_one_value else f"{sweep}; {quote}")


def _check_preset(choices: Any, dirs: Sequence[Path] = ()) -> None:
    """`preset` and `model_preset` are optional in the defaults list: a preset is a name, its values
    for the chosen model are model_preset/MODEL/NAME.yaml (in stab's conf/ or a --config-dir; a
    preset/NAME.yaml is not needed). A preset other than `default` must have them for this model;
    the message lists only the presets this model takes."""
    model, preset = choices.get("model"), choices.get("preset")
    if not preset or preset == "default":
        return
    folders = [d / "model_preset" / str(model) for d in (CONF_DIR, *dirs)]
    if any((f / f"{preset}.yaml").exists() for f in folders):
        return
    have = sorted({"default"} | {p.stem for f in folders for p in f.glob("*.yaml")})
    raise UserError(
        f"preset={preset!r} is not allowed with model={model}: expected one of {', '.join(have)}"
        + (did_you_mean(preset, have) or f" (add model_preset/{model}/{preset}.yaml for a preset of your own)")
    )


def compose_run(overrides: list[str], dirs: Sequence[Path] = ()) -> RunConfig:
    """`compose_config`, then resolved and validated into a `RunConfig`; raises UserError. A short
    name the model does not read that an experiment or preset set, not the user, is said to come
    from there (`residual=0.3 ... (set by experiment=seed_fix)`)."""
    cfg = compose_config(overrides, dirs)
    try:
        return to_run_config(cfg)
    except UnreadShortName as e:
        typed = {o.partition("=")[0].lstrip("+~") for o in overrides}
        if e.alias in typed:
            raise
        source = _set_by(e.alias, overrides, dirs)
        raise UnreadShortName(e.alias, f"{e.head} (set by {source})" if source else e.head, e.rest) from None


def _set_by(key: str, overrides: Sequence[str], dirs: Sequence[Path]) -> str | None:
    """The `experiment=NAME` or `preset=NAME` among `overrides` whose file sets top-level `key`."""
    for o in reversed(overrides):  # the last choice of a group is the one composed
        group, _, name = o.lstrip("+").partition("=")
        if group not in GROUP_KEYS or "," in name:
            continue
        for d in (CONF_DIR, *dirs):
            path = d / group / f"{name}.yaml"
            if path.exists():
                loaded = OmegaConf.load(path)
                if isinstance(loaded, DictConfig) and key in loaded:
                    return f"{group}={name}"
                break
    return None
