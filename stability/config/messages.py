"""The one line a bad config value gets: `explain` turns pydantic's `ValidationError` into
`KEY=VALUE is not allowed: expected WHAT[; did you mean X?]` (or `unknown key ...`), naming the
key as the user writes it; `ConfigError` carries it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, Tag, ValidationError
from pydantic.fields import FieldInfo

from stability.config.names import N_STAGES, SHORT_NAMES


class ConfigError(ValueError):
    """A user-supplied configuration value is not allowed; the message is one line."""


def did_you_mean(word: object, candidates: Iterable[object]) -> str:
    """'; did you mean X?' for the closest of `candidates` to a typo'd `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def explain(error: ValidationError, root: type[BaseModel], section: str = "") -> str:
    """pydantic's `ValidationError` (of `root`, which sits at `section` of a run's config) as
    the one line stab prints: `KEY=VALUE is not allowed: expected WHAT[; did you mean X?]`, or
    `unknown key 'KEY': allowed keys under PARENT are ...[; did you mean KEY?]`. WHAT comes from
    the schema (a Literal's choices, a number's type and bounds) or from the rule that raised
    (`not_allowed`); a short name (norm, clip, ...) is named as the user writes it."""
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
