"""Module outputs of any shape: the tensors inside them, and a copy with each tensor replaced.

A module returns a tensor, a tuple (every Hugging Face attention: `(attn_output, attn_weights)`),
a list, a dict, a dataclass or a `ModelOutput` (an ordered dict that is also a dataclass), nested
in any way. The NaN locator, fault injection and the health probes look inside all of them.
Containers `torch.utils._pytree` knows (tuple, list, dict, namedtuple, OrderedDict, and
`ModelOutput`, which transformers registers) are walked by it; a dataclass it does not know is
walked field by field; anything else is a leaf.

    tensors(("x", torch.ones(2), {"a": torch.zeros(1)}))        # [tensor([1., 1.]), tensor([0.])]
    map_tensors(lambda t: t * 2, out)                           # same structure, tensors doubled
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree


def _is_plain_dataclass(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type) and not isinstance(x, dict)


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor inside `out`, in a stable order (depth first)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if _is_plain_dataclass(out) and not _registered(out):
        return [t for f in dataclasses.fields(out) for t in tensors(getattr(out, f.name, None))]
    leaves = pytree.tree_leaves(out)
    if len(leaves) == 1 and leaves[0] is out:
        return []
    return [t for leaf in leaves for t in tensors(leaf)]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], out: Any) -> Any:
    """`out` with every tensor `t` inside it replaced by `fn(t)`, the containers rebuilt as they were."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if _is_plain_dataclass(out) and not _registered(out):
        changes = {f.name: map_tensors(fn, getattr(out, f.name)) for f in dataclasses.fields(out) if f.init}
        return dataclasses.replace(out, **changes)
    leaves, spec = pytree.tree_flatten(out)
    if len(leaves) == 1 and leaves[0] is out:
        return out
    return pytree.tree_unflatten([map_tensors(fn, leaf) for leaf in leaves], spec)


def _registered(x: Any) -> bool:
    return type(x) in pytree.SUPPORTED_NODES


def all_finite(out: Any) -> bool:
    """Whether every floating tensor inside `out` is finite (a host sync per tensor: forensics only)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors(out) if t.is_floating_point() or t.is_complex())


def poison(out: Any) -> Any:
    """`out` with every floating tensor multiplied by NaN (integer tensors, masks and None kept):
    `fault.nan_module`'s injected fault."""
    return map_tensors(lambda t: t * float("nan") if t.is_floating_point() else t, out)
