"""The value types of the run config's schema and the rules a type and its bounds cannot say.

`Int`, `Float` (numbers only: no bools, no strings, finite), `Flag` (true or false), `PerStage`
(one value or one per cascade stage); the rules raise `not_allowed(...)`, a pydantic error that
carries the "what is allowed" text `stability.config.messages.explain` puts in the message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Strict
from pydantic_core import PydanticCustomError

from stability.config.messages import did_you_mean
from stability.config.names import N_STAGES

# Each rule below is a pydantic validator: it returns the (normalised) value or raises
# `not_allowed(...)`, which pydantic reports as a validation error at the value's location.


def not_allowed(allowed: str, **where: Any) -> PydanticCustomError:
    """The error a rule raises: `allowed` is the text after "expected"; `where` may name the
    `key` (relative to the model that raises it) and `value` the message shows."""
    return PydanticCustomError("not_allowed", "expected {allowed}", {"allowed": allowed, **where})


def a_number(value: object) -> object:
    """Numbers only: a bool, a string ('1e-3') or a list is not a number, whatever it parses to."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("not_a_number", "not a number")
    return value


Int = Annotated[int, BeforeValidator(a_number)]  # an integral float (5.0) is accepted as 5
Float = Annotated[float, BeforeValidator(a_number)]  # finite: schema.Section sets allow_inf_nan=False
Flag = Annotated[bool, Strict()]  # true or false, not 'yes' or 1

T = TypeVar("T")


def per_stage(value: object) -> object:
    """A knob given once for all stages or as one value per stage -> a list of `N_STAGES`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * N_STAGES
    if len(values) != N_STAGES:
        raise not_allowed(f"one value or a list of {N_STAGES} (one per stage)")
    return values


PerStage = Annotated[list[T], BeforeValidator(per_stage)]


def pair(allowed: str) -> BeforeValidator:
    """Exactly two values (`[lo, hi]`, `[beta1, beta2]`); each is then checked on its own."""

    def check(value: object) -> object:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise not_allowed(allowed)
        return value

    return BeforeValidator(check)


def rule(allowed: str, ok: Callable[[Any], bool]) -> BeforeValidator:
    """A value `ok` accepts, else `allowed` is what the message says is expected."""

    def check(value: object) -> object:
        if not ok(value):
            raise not_allowed(allowed)
        return value

    return BeforeValidator(check)


def is_text(value: object) -> bool:
    """A non-empty string (a path, a checkpoint name)."""
    return isinstance(value, str) and bool(value)


def positive_or_none(what: str) -> BeforeValidator:
    """`none|off|null|<positive number>` -> None or the number (`clip`, `update_clip`)."""

    def parse(value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "off")):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise not_allowed("none or " + what) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise not_allowed("none or " + what)  # a negative, zero or non-finite number
        return float(value)

    return BeforeValidator(parse)


def latent_rms_value(value: object) -> object:
    """data.latent_rms: auto | off (null) | a number > 0."""
    if value in ("auto", "off", None):
        return "off" if value is None else value
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise not_allowed("auto, off or a number > 0")
    return float(value)


def is_device(value: object) -> bool:
    """train.device: auto | cpu | cuda | cuda:N (whether it exists is preflight's question)."""
    return isinstance(value, str) and (value in ("auto", "cpu", "cuda") or value.startswith("cuda:"))


# Trackers that receive the run folder's records (stability/trackers.py); `log` is operational.
TRACKERS = ("tensorboard", "mlflow", "wandb")


def trackers(value: object) -> list[str]:
    """`log=none | NAME | [NAME,...]` -> the trackers, in the order given, each once."""
    allowed = f"one of {', '.join(TRACKERS)}, a list of them (log=[tensorboard,mlflow]) or none"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off", "")):
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise not_allowed(allowed)
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise not_allowed(allowed + did_you_mean(name, TRACKERS), value=name)
        if name not in out:
            out.append(name)
    return out


def epoch_list(value: object) -> object:
    """listen.epochs is a list (its items are then checked as epochs >= 1)."""
    if not isinstance(value, (list, tuple)):
        raise not_allowed("a list of epochs, e.g. [1,5]")
    return value
