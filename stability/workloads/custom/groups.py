"""A custom model's module groups from its module tree: transformer layers found by type or by a
name pattern, each split into attn, mlp and norm; the factory's own groups; shared parameters.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from stability.config import ConfigError

RESERVED_GROUPS = ("norm", "clipped")  # `grad/<group>` would be the total norm's or the clip flag's key
NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


# --- module groups ----------------------------------------------------------------------------


def is_attention(m: nn.Module) -> bool:
    """An attention module: nn.MultiheadAttention, or a class whose name says attention."""
    return isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: one of NORM_TYPES, or a class whose name says norm."""
    return isinstance(m, NORM_TYPES) or "norm" in type(m).__name__.lower()


def find_layers(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """{qualified name: module} of the transformer layers, outermost only, in registration order:
    names matching `pattern` (re.fullmatch), else `nn.TransformerEncoderLayer`/`DecoderLayer` and
    modules with an attention child."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        if pattern is not None:
            hit = re.fullmatch(pattern, name) is not None
        else:
            hit = isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or (
                not is_attention(m) and any(is_attention(c) for c in m.children())
            )
        if hit:
            found[name] = m
    return found


class ParamGroup(nn.Module):
    """Parameters owned directly by a module that is not a group of its own (a root-level
    position embedding, a layer's own scale), held so the probes see them as a group. Not part of
    the model: its state_dict and forward are the model's own."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name.replace(".", "_"), p)


def _kind(child: nn.Module) -> str:
    return "attn" if is_attention(child) else "norm" if is_norm(child) else "mlp"


def auto_groups(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[nn.Module]]:
    """Every trainable parameter in exactly one group, in the order the model registers them:
    `<layer>.attn|mlp|norm` for each layer, the owning module's name elsewhere."""
    groups: dict[str, list[nn.Module]] = {}
    seen: set[int] = set()  # a parameter shared by two modules (tied weights) belongs to the first
    loose: dict[str, dict[str, nn.Parameter]] = {}

    def add(group: str, module: nn.Module) -> None:
        mods = groups.setdefault(group, [])
        if not any(m is module for m in mods):
            mods.append(module)

    for mname, m in model.named_modules():
        direct = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad and id(p) not in seen}
        seen.update(id(p) for p in direct.values())
        if not direct:  # no parameters, or only ones tied to a module seen before (an LM head tied to the embedding)
            continue
        layer = next((lay for lay in layers if mname == lay or mname.startswith(lay + ".")), None)
        if layer is None:
            if not mname:
                for n, p in direct.items():  # root-level parameters: one group each
                    loose.setdefault(n, {})[n] = p
                    groups.setdefault(n, [])
            elif any(True for c in m.children() for _ in c.parameters()):
                # a module that owns parameters and has children that do (a wrapped model: a
                # LightningModule's `self.model`, a timm ViT's cls_token beside its blocks): its own
                # parameters only, so that its children's go to their own groups, not all to this one
                loose.setdefault(mname, {}).update(direct)
                groups.setdefault(mname, [])
            else:
                add(mname, m)
            continue
        if mname == layer:  # parameters of the layer itself, not of a child
            loose.setdefault(f"{layer}.params", {}).update(direct)
            groups.setdefault(f"{layer}.params", [])
            continue
        child_name = mname[len(layer) + 1 :].split(".")[0]
        child = layers[layer].get_submodule(child_name)
        add(f"{layer}.{_kind(child)}", child)
    for g, params in loose.items():
        groups[g] = [ParamGroup(params)]
    # a group named like a step field (timm's final `norm`: `grad/norm` is the total) gets `_module`
    return {(f"{g}_module" if g in RESERVED_GROUPS else g): mods for g, mods in groups.items() if mods}


def tied(model: nn.Module, groups: dict[str, list[nn.Module]]) -> list[dict[str, str]]:
    """Parameters registered under two names (tied weights, e.g. `lm_head.weight` is
    `transformer.wte.weight`): [{param, same_as, counted_in}], the group whose gradient norm counts
    it (the first that holds it; the probes count a parameter once)."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append({"param": name, "same_as": first[id(p)]})
        else:
            first[id(p)] = name
    if out:
        owner: dict[int, str] = {}
        for g, mods in groups.items():
            for m in mods:
                for p in m.parameters():
                    owner.setdefault(id(p), g)
        by_name = dict(model.named_parameters())
        for tie in out:
            tie["counted_in"] = owner.get(id(by_name[tie["same_as"]]), "none (not trainable)")
    return out


def explicit_groups(model: nn.Module, spec: dict[str, Any], where: str) -> dict[str, list[nn.Module]]:
    """The factory's `groups` (module objects or names), plus `other` for parameters none covers."""
    out: dict[str, list[nn.Module]] = {}
    for name, value in spec.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        mods = []
        for item in items:
            if isinstance(item, str):
                try:
                    item = model.get_submodule(item)
                except AttributeError:
                    raise ConfigError(
                        f"{where}: groups[{name!r}] names {item!r}, which is not a module of the model"
                    ) from None
            if not isinstance(item, nn.Module):
                raise ConfigError(
                    f"{where}: groups[{name!r}] holds a {type(item).__name__}: expected modules or module names"
                )
            mods.append(item)
        out[str(name)] = mods
    covered = {id(p) for mods in out.values() for m in mods for p in m.parameters()}
    rest = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered}
    if rest:
        out["other"] = [ParamGroup(rest)]
    return out
