"""The factory behind `model._target_`: found by its dotted path, called with the other `model.*`
keys, and what it returns checked into a `Task` (see `stability.workloads.custom`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from stability.config import OWN_LOOP, ConfigError, did_you_mean


@dataclass
class Task:
    """What a factory returns (or a dict with these keys): see `stability.workloads.custom`."""

    model: nn.Module
    train: Any
    loss: Callable[[Any, Any], torch.Tensor]
    val: Any = None
    layers: str | None = None
    groups: dict[str, Any] | None = None
    tokens: Any = "auto"
    info: dict[str, Any] = field(default_factory=dict)


# --- the factory ------------------------------------------------------------------------------


def locate(path: str) -> Any:
    """The object at dotted `path` (`pkg.module.attr`), found as `hydra.utils.get_method` does: the
    longest prefix that imports as a module, then attributes. ConfigError naming the path."""
    where = f"model._target_={path}"
    parts = path.split(".")
    if not path or any(not p.isidentifier() for p in parts):
        raise ConfigError(f"{where}: not a dotted path of Python names (expected e.g. my_pkg.my_module.build)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # stab imports from the folder it runs in: also when a script (python examples/x.py, whose
        # sys.path starts at examples/) names a factory for Monitor, as `stab run` does
        sys.path.append(os.getcwd())
    module: Any = None
    error: BaseException | None = None
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if (e.name and ".".join(parts[:i]).startswith(e.name)) or e.name is None:
                continue  # this prefix is not a module: try a shorter one
            error = e  # the module exists but imports something that does not
            break
        except Exception as e:  # the user's module raised while importing
            error = e
            break
        obj = module
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                raise ConfigError(
                    f"{where}: module {'.'.join(parts[:i])} has no attribute {'.'.join(parts[i : j + 1])!r}"
                )
            obj = getattr(obj, attr)
        return obj
    if error is not None:
        raise ConfigError(f"{where}: importing it raised {type(error).__name__}: {first_line(error)}")
    raise ConfigError(
        f"{where}: no module {parts[0]!r} can be imported (is its folder on PYTHONPATH? "
        f"stab also imports from the folder it runs in)"
    )


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (its lines joined, cut at `limit` characters), or its
    type's name when it has none. A message whose first line only introduces the rest
    (`Validation error for field 'n_embd':` then the reason) keeps the reason."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@functools.lru_cache(maxsize=64)
def factory_parameters(path: str) -> frozenset[str]:
    """The names of the factory's parameters (the short names it declares are among them)."""
    factory = locate(path)
    if not callable(factory):
        raise ConfigError(
            f"model._target_={path}: {type(factory).__name__} is not callable: expected a function "
            f"returning the model, its data and a loss"
        )
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def make_task(target: str, params: dict[str, Any]) -> Task:
    """Call the factory at `target` with `params`; its result as a checked `Task`."""
    if target == OWN_LOOP:
        raise ConfigError(
            f"model._target_={target}: this run was recorded by stab's Monitor in your own loop "
            f"without a factory, so nothing can rebuild its model; Monitor(factory='my_pkg.build') "
            f"records one"
        )
    factory = locate(target)
    factory_parameters(target)  # callable
    where = f"model._target_={target}"
    try:
        sig = inspect.signature(factory)
        sig.bind(**params)
    except TypeError as e:
        have = ", ".join(n for n in sig.parameters) or "none"
        takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [] if takes_any else sorted(k for k in params if k not in sig.parameters)
        if not unknown:  # a required parameter with no key, or a positional-only one
            raise ConfigError(f"{where}: cannot be called with the model keys {sorted(params)}: {e}") from None
        raise ConfigError(
            f"{where}: cannot take the model keys {unknown} (its parameters: {have})"
            + "".join(did_you_mean(k, sig.parameters) for k in unknown)
        ) from None
    except ValueError:
        pass
    try:
        out = factory(**params)
    except Exception as e:
        raise ConfigError(f"{where} raised {type(e).__name__}: {first_line(e)}") from e
    return as_task(out, where)


def as_task(out: Any, where: str) -> Task:
    """A factory's return value (`out`: a Task or a dict of its fields) as a checked Task.

    Raises:
        ConfigError: naming `where` (the factory), for an unknown or missing key, a model that is
            not an nn.Module or has no trainable parameter, or a loss that is not callable.
    """
    if isinstance(out, Task):
        task = out
    elif isinstance(out, dict):
        names = [f.name for f in fields(Task)]
        unknown = sorted(set(out) - set(names))
        if unknown:
            raise ConfigError(f"{where} returned the key {unknown[0]!r}: allowed keys are {', '.join(names)}")
        missing = [k for k in ("model", "train", "loss") if out.get(k) is None]
        if missing:
            raise ConfigError(
                f"{where} returned no {missing[0]!r}: expected a dict with model, train and loss (docs/your-model.md)"
            )
        task = Task(**out)
    else:
        raise ConfigError(
            f"{where} returned {type(out).__name__}: expected a dict with model, train and loss, "
            f"or a stability.workloads.custom.Task"
        )
    if not isinstance(task.model, nn.Module):
        raise ConfigError(f"{where}: model is a {type(task.model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in task.model.parameters()):
        raise ConfigError(f"{where}: the model has no trainable parameters")
    if not callable(task.loss):
        raise ConfigError(f"{where}: loss is a {type(task.loss).__name__}, not a function loss(output, target)")
    if task.layers is not None:
        try:
            re.compile(task.layers)
        except re.error as e:
            raise ConfigError(f"{where}: layers={task.layers!r} is not a regular expression: {e}") from None
    if not (task.tokens in ("auto", "argmax", None) or callable(task.tokens)):
        raise ConfigError(
            f"{where}: tokens={task.tokens!r} is not allowed: expected 'auto', 'argmax', None or a "
            f"function from an output tensor to an integer tensor"
        )
    return task
