"""Your own model as a stab workload: a factory function returns a model, its data and a loss.

    # my_pkg/my_module.py (on PYTHONPATH)
    def build(width: int = 64, norm: str = "pre"):   # `norm` is a short name: norm=pre,post sweeps it
        model = MyTransformer(width, norm)
        return {"model": model, "train": (x, y), "val": (x_val, y_val),
                "loss": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())}

    stab run model=custom model._target_=my_pkg.my_module.build +model.width=32 norm=pre

The factory is found by its dotted path as `hydra.utils.get_method` finds a `_target_` (the
longest importable module prefix, then attributes) and called with the other `model.*` keys as
keyword arguments. It returns a `Task` or a dict with the same keys:

    ======== =================================================================== ==============
    key      what                                                                default
    ======== =================================================================== ==============
    model    the nn.Module to train                                              (required)
    train    a Dataset, a TensorDataset, or tensors (x, y) with one row per       (required)
             example; a batch is (inputs..., target), or one tensor
    loss     loss(output, target) -> scalar tensor, output = model(*inputs)       (required)
             (one-tensor batches: loss(model(batch), batch))
    val      validation data, same forms: validation loss, scream check, health  None (no check)
    layers   regex of the transformer layers' module names (`blocks\\.\\d+`)      found by type
    groups   {name: modules or module names}: the grad-norm groups, overriding   from the layers
             the automatic ones (parameters left over go to a group `other`)
    tokens   how outputs become tokens for the scream check: "argmax" over the   "auto": argmax
             last dim, a function tensor -> int tensor (applied to the output      when the target
             and to the target), or None (no scream check)                        is integer
    info     extra facts for the run's data.json                                 {}
    ======== =================================================================== ==============

Module groups (one grad norm each per step, searched for the first NaN) come from the module
tree: transformer layers are `nn.TransformerEncoderLayer`/`DecoderLayer` and any module with an
attention child (`nn.MultiheadAttention` or a class named *Attention*), or the modules whose
names match `layers`. Each layer gives `<name>.attn`, `<name>.mlp` (its other children with
parameters) and `<name>.norm`; every other module that owns parameters is a group of its own
(`tok_emb`, `head`, a root-level `pos_emb`). A parameter shared by two modules (an LM head tied
to the token embedding) is counted once, in the first group that holds it; the tie is listed in
data.json (`tied`) and by `stab show`. Attention health (stability.health) needs the attention's
logits: it is measured for `nn.MultiheadAttention` (recomputed from its input projection), for
any attention module with a method `logits(x) -> (B, heads, T, T)`, and for attention that calls
`F.scaled_dot_product_attention` (q and k captured at the call: HF GPT-2/Llama, timm ViT, your own
SDPA block), and is reported "not available" otherwise (data.json, `stab run`, `stab show`).

Everything the factory returns is checked before training (`CustomWorkload.__init__`, which
`stab run`/`stab sweep` reach through `check` below): each problem is one `ConfigError` line naming
`model._target_` and what is wrong.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from stability.config import OWN_LOOP, ConfigError, CustomModelConfig, RunConfig, did_you_mean
from stability.detectors.collapse import mean_scores, scream_check
from stability.health import SdpaAttention, calls_sdpa
from stability.workloads.base import Workload
from stability.workloads.faults import check_fault_module, check_fault_steps

VAL_BATCHES = 64  # validation batches (of train.batch_size) the validation loss averages at most
HEALTH_ITEMS = 8  # validation examples the health probe's forward and backward use
SCREAM_SINGLE_ITEMS = 256  # one token per example (a classifier): these many predictions form one sequence
RESERVED_GROUPS = ("norm", "clipped")  # `grad/<group>` would be the total norm's or the clip flag's key
NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass
class Task:
    """What a factory returns (or a dict with these keys): see the module docstring."""

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
        raise ConfigError(f"{where}: importing it raised {type(error).__name__}: {_first_line(error)}")
    raise ConfigError(
        f"{where}: no module {parts[0]!r} can be imported (is its folder on PYTHONPATH? "
        f"stab also imports from the folder it runs in)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        raise ConfigError(f"{where} raised {type(e).__name__}: {_first_line(e)}") from e
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


# --- data -------------------------------------------------------------------------------------


class Examples:
    """Training or validation examples: tensors indexed directly (fast), or a Dataset collated
    with torch's default_collate. A batch is a tensor or a tuple of tensors."""

    def __init__(self, data: Any, what: str, where: str, device: torch.device) -> None:
        self.device = device
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.dataset: Dataset | None = None
        if isinstance(data, TensorDataset):
            data = data.tensors
        if isinstance(data, torch.Tensor):
            data = (data,)
        self.keys: tuple[str, ...] | None = None
        if isinstance(data, Mapping) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
            self.keys = tuple(data)  # a dict of model inputs ({"input_ids": ..., "labels": ...}): dict batches
            data = tuple(data.values())
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            sizes = {len(t) if t.dim() else -1 for t in data}
            if len(sizes) != 1 or -1 in sizes:
                raise ConfigError(
                    f"{where}: the {what} tensors have different numbers of rows "
                    f"({', '.join(str(tuple(t.shape)) for t in data)}): expected one row per example"
                )
            self.tensors = tuple(t.to(device) for t in data)
            self.single = len(data) == 1
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            self.dataset = data
            self.single = False
        else:
            raise ConfigError(f"{where}: {what} is a {type(data).__name__}: expected a torch Dataset or tensors (x, y)")
        try:
            n = len(self)
        except TypeError as e:
            raise ConfigError(f"{where}: {what} has no length: {e}") from None
        if n == 0:
            raise ConfigError(f"{where}: the {what} data has no examples (length 0)")

    def _dataset(self) -> Dataset:
        if self.dataset is None:
            raise RuntimeError("Examples holds tensors, not a Dataset")
        return self.dataset

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors is not None else len(self._dataset())  # type: ignore[arg-type]

    def __getitem__(self, idx: torch.Tensor) -> Any:
        """The examples `idx` (int64, (B,)) as one batch on the device."""
        if self.tensors is not None:
            idx = idx.to(self.tensors[0].device)
            rows = tuple(t[idx] for t in self.tensors)
            if self.keys is not None:
                return dict(zip(self.keys, rows))
            return rows[0] if self.single else rows
        dataset = self._dataset()
        batch = default_collate([dataset[i] for i in idx.tolist()])
        return _to(batch, self.device)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to(b, device) for b in batch)
    return batch


def split(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """(model inputs, target) of a batch: (inputs..., target), or one tensor that is both. A dict
    batch (keyword inputs, `model(**batch)`) is its own target: see `CustomWorkload.loss`."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), batch[0]
        return tuple(batch[:-1]), batch[-1]
    return (batch,), batch


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


# --- attention health -------------------------------------------------------------------------


class MultiheadAttentionLogits:
    """What `stability.health.measure` needs of an `nn.MultiheadAttention` used as self-attention:
    a hook on its input and `logits(x)`, the pre-softmax logits (B, heads, T, T) recomputed from
    its input projection with the mask of the call it saw (the module never returns them with
    need_weights=False, and then only averaged after the softmax)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        self.mha = mha
        self.sig = inspect.signature(mha.forward)
        self.attn_mask: torch.Tensor | None = None
        self.key_padding_mask: torch.Tensor | None = None
        self.is_causal = False

    def register_forward_pre_hook(self, hook: Callable) -> Any:
        """Calls `hook(module, (x,))` with the query x as (B, T, E) however the module is laid out;
        for a sequence-first module x is a transposed view that the forward then uses, so its
        gradient (the health probe's grad_sink) is the input's own."""
        mha = self.mha

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            a = self.sig.bind(*args, **kwargs).arguments
            self.attn_mask, self.key_padding_mask = a.get("attn_mask"), a.get("key_padding_mask")
            self.is_causal = bool(a.get("is_causal", False))
            q = a["query"]
            if mha.batch_first or q.dim() == 2:
                hook(module, (q,))
                return None
            qb = q.transpose(0, 1)  # (B, T, E), a view that becomes the forward's input
            hook(module, (qb,))
            q_new = qb.transpose(0, 1)  # (T, B, E)
            return (
                tuple(q_new if t is q else t for t in args),
                {k: (q_new if v is q else v) for k, v in kwargs.items()},
            )

        return mha.register_forward_pre_hook(pre, with_kwargs=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, E) -> pre-softmax self-attention logits (B, heads, T, T), masked positions -inf."""
        mha, E, H = self.mha, self.mha.embed_dim, self.mha.num_heads
        if mha._qkv_same_embed_dim:
            wq, wk = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
        else:
            wq, wk = mha.q_proj_weight, mha.k_proj_weight
        bq = mha.in_proj_bias[:E] if mha.in_proj_bias is not None else None
        bk = mha.in_proj_bias[E : 2 * E] if mha.in_proj_bias is not None else None
        if x.dim() == 2:
            x = x.unsqueeze(0)
        B, T, _ = x.shape
        q = nn.functional.linear(x, wq, bq).view(B, T, H, E // H).transpose(1, 2)  # (B, H, T, hd)
        k = nn.functional.linear(x, wk, bk).view(B, T, H, E // H).transpose(1, 2)  # (B, H, T, hd)
        att = q @ k.transpose(-2, -1) / math.sqrt(E // H)  # (B, H, T, T)
        mask = self.attn_mask
        if mask is not None:
            mask = mask.view(B, H, T, T) if mask.dim() == 3 else mask  # (B*H, T, T) -> (B, H, T, T)
            att = att.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else att + mask
        elif self.is_causal:
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=att.device).triu(1), float("-inf"))
        if self.key_padding_mask is not None and self.key_padding_mask.dtype == torch.bool:
            att = att.masked_fill(self.key_padding_mask.view(B, 1, 1, T), float("-inf"))
        return att


def attention_probe(layer: nn.Module) -> Any | None:
    """The layer's self-attention as `health.measure` reads it, or None if its logits cannot be had."""
    attns = [c for n, c in layer.named_children() if is_attention(c)]
    named = dict(layer.named_children())
    attn = (
        named.get("self_attn") if is_attention(named.get("self_attn", nn.Identity())) else (attns[0] if attns else None)
    )
    if isinstance(attn, nn.MultiheadAttention):
        return MultiheadAttentionLogits(attn)
    if attn is not None and callable(getattr(attn, "logits", None)):
        return attn
    if attn is not None:  # measured if it calls F.scaled_dot_product_attention (checked by a forward)
        return SdpaAttention(attn)
    return None


# --- the workload -----------------------------------------------------------------------------


class CustomWorkload(Workload):
    """A factory's model, data and loss behind stab's workload interface (`model=custom`)."""

    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device,
        task: Task | None = None,
        batch_loss: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        """The factory's task (`cfg.model`), or `task` as given (Monitor: your loop draws the
        batches, so `task.train` may be None); `batch_loss(batch)` (0-d) replaces `loss`'s own."""
        self.cfg, self.device = cfg, device
        self.batch_loss = batch_loss
        if not isinstance(cfg.model, CustomModelConfig):
            raise ConfigError(f"model={cfg.model.name}: a custom workload needs model=custom")
        mcfg = cfg.model
        target = mcfg.target
        self.where = where = f"model._target_={target}"
        if task is None:
            task = make_task(target, dict(mcfg.params))
        self.task = task
        self.model: nn.Module = task.model.to(device)
        self.train = Examples(task.train, "train", where, device) if task.train is not None else None
        self.val = Examples(task.val, "val", where, device) if task.val is not None else None
        self.loss_fn = task.loss
        self._groups = self._make_groups()
        if self.train is not None:
            self._check()
        self.tokenize, scream_note = self._scream_setup()
        layers = self._layers
        self._health = {n: (m, a) for n, m in layers.items() if (a := attention_probe(m)) is not None}
        sdpa = {n: a.module for n, (_, a) in self._health.items() if isinstance(a, SdpaAttention)}
        if sdpa and self.val is not None:  # keep those whose forward calls SDPA
            val = self.val
            idx = torch.arange(min(HEALTH_ITEMS, len(val)))
            calling = calls_sdpa(self.model, lambda: self.forward(val[idx]), sdpa)
            self._health = {n: v for n, v in self._health.items() if n not in sdpa or n in calling}
            sdpa = {n: m for n, m in sdpa.items() if n in calling}
        if self._health:
            how = " (q and k captured at F.scaled_dot_product_attention)" if sdpa else ""
            health_note = f"available: {len(self._health)} of {len(layers)} layers{how}"
        elif layers:
            health_note = (
                f"not available: no nn.MultiheadAttention, attention module with logits(x) or call of "
                f"F.scaled_dot_product_attention in the {len(layers)} layers found"
            )
        else:
            health_note = (
                "not available: no transformer layers found (nn.TransformerEncoderLayer, a module with "
                "an attention child, or the factory's layers=PATTERN)"
            )
        if self.val is None and self._health:
            health_note = "not available: no validation data (the factory's val)"
            self._health = {}
        self.info: dict[str, Any] = {
            "target": target,
            "params": dict(mcfg.params),
            "n_train": self.n_train,
            "n_val": len(self.val) if self.val is not None else 0,
            "layers": list(layers),
            "groups": list(self._groups),
            "tied": tied(self.model, self._groups),
            "scream": scream_note,
            "health": health_note,
            **task.info,
        }

    # groups ----------------------------------------------------------------------------------
    def _make_groups(self) -> dict[str, list[nn.Module]]:
        self._layers = find_layers(self.model, self.task.layers)
        if self.task.layers is not None and not self._layers:
            raise ConfigError(
                f"{self.where}: layers={self.task.layers!r} matches no module name "
                f"(names look like {', '.join(n for n, _ in list(self.model.named_modules())[1:4])})"
            )
        if self.task.groups is not None:
            return explicit_groups(self.model, self.task.groups, self.where)
        own = getattr(self.model, "module_groups", None)
        if callable(own):
            return own()
        return auto_groups(self.model, self._layers)

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """The module groups whose gradients are measured: the factory's `groups`, else by layer."""
        return self._groups

    # checks ------------------------------------------------------------------------------------
    def _check(self) -> None:
        """One forward and backward on two examples, in eval mode (no dropout draws, no batch-norm
        statistics updated): the loss must be a scalar with a gradient path to the parameters."""
        where, model = self.where, self.model
        train = self._split("train")
        idx = torch.arange(min(2, len(train)))
        was_training = model.training
        model.eval()
        try:
            try:
                loss = self.loss(train[idx])
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(
                    f"{where}: the forward or loss on a training batch raised {type(e).__name__}: {_first_line(e)}"
                ) from e
            if not isinstance(loss, torch.Tensor):
                raise ConfigError(f"{where}: the loss returned a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ConfigError(
                    f"{where}: the loss is not a scalar: shape {tuple(loss.shape)} (reduce it, e.g. .mean())"
                )
            if not loss.requires_grad:
                raise ConfigError(
                    f"{where}: the loss has no gradient path to the model's parameters (is the output "
                    f"detached, or computed under torch.no_grad?)"
                )
            model.zero_grad(set_to_none=True)
            loss.reshape(()).backward()
            if all(p.grad is None for p in model.parameters()):
                raise ConfigError(f"{where}: the loss reaches none of the model's parameters")
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    # training ----------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        """Training examples (0 without training data: the Monitor's own loop)."""
        return len(self.train) if self.train is not None else 0

    def _split(self, which: str) -> Examples:
        """`self.train` or `self.val`; RuntimeError when the factory gave none (Monitor: your own loop)."""
        examples = self.train if which == "train" else self.val
        if examples is None:
            raise RuntimeError(f"{self.where}: the factory returned no {which} data")
        return examples

    def batch(self, idx: torch.Tensor) -> Any:
        """The training examples at `idx` (a 1-d index tensor), on the device. RuntimeError without training data."""
        return self._split("train")[idx]

    def forward(self, batch: Any) -> Any:
        """The model's output on a batch: model(*inputs), or model(**batch) for a dict batch."""
        if isinstance(batch, Mapping):
            return self.model(**batch)
        return self.model(*split(batch)[0])

    def loss(self, batch: Any) -> torch.Tensor:
        """loss(model(*inputs), target); for a dict batch (a transformers model's keyword inputs,
        labels among them) loss(model(**batch), batch); `batch_loss(batch)` where one was given."""
        if self.batch_loss is not None:
            return self.batch_loss(batch)
        if isinstance(batch, Mapping):
            return self.loss_fn(self.model(**batch), batch)
        inputs, target = split(batch)
        return self.loss_fn(self.model(*inputs), target)

    # scream and validation ----------------------------------------------------------------------
    def _scream_setup(self) -> tuple[Callable[[Any], torch.Tensor] | None, str]:
        """How outputs become tokens, the fixed scream batch and the target's scores."""
        self.scream_idx = None
        if self.task.tokens is None:
            return None, "not available: the factory's tokens=None"
        if self.val is None:
            return None, "not available: no validation data (the factory's val)"
        idx = torch.arange(min(len(self.val), SCREAM_SINGLE_ITEMS))
        batch = self.val[idx]
        target = batch if isinstance(batch, Mapping) else split(batch)[1]
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            out = self.forward(batch)
            self.model.train(was)
        tokens = self.task.tokens
        if tokens == "auto":
            fits = (
                isinstance(out, torch.Tensor)
                and isinstance(target, torch.Tensor)
                and out.is_floating_point()
                and not target.is_floating_point()
                and out.dim() == target.dim() + 1
                and out.shape[:-1] == target.shape
            )
            if not fits:
                return None, (
                    "not available: the output is not scores over a vocabulary for an integer target "
                    "(give the factory's tokens=a function from outputs to integer tokens)"
                )
            tokens = "argmax"
        fn = (lambda t: t.argmax(-1)) if tokens == "argmax" else tokens
        for what, value in (("output", out), ("target", target)):
            if what == "target" and tokens == "argmax":
                target_tokens = target
                continue
            try:
                made = fn(value)
            except Exception as e:
                raise ConfigError(
                    f"{self.where}: tokens({what}) raised {type(e).__name__}: {_first_line(e)} (tokens "
                    f"is applied to the model's output and to the target)"
                ) from e
            if what == "output":
                out_tokens = made
            else:
                target_tokens = made
        for what, t in (("output", out_tokens), ("target", target_tokens)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dim() == 0:
                raise ConfigError(
                    f"{self.where}: the scream check's tokens of the {what} are not an integer tensor "
                    f"with one row per example"
                )
        per_item = out_tokens.dim() > 1
        n = min(self.cfg.detect.scream.items, len(self.val)) if per_item else len(idx)
        self.scream_idx = idx[:n]
        self.tokenize = fn
        self.target_scores = self._scores(target_tokens[:n])
        how = "argmax over the output's last dimension" if tokens == "argmax" else "the factory's tokens function"
        unit = (
            f"{n} validation sequences" if per_item else f"the predictions for {n} validation examples as one sequence"
        )
        return fn, f"{how}; {unit}"

    def _scores(self, tokens: torch.Tensor) -> dict[str, float]:
        rows = tokens.reshape(len(tokens), -1).tolist() if tokens.dim() > 1 else [tokens.tolist()]
        return mean_scores(rows, self.cfg.detect.scream.n)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (mean over at most VAL_BATCHES batches) and the scream check on a fixed batch."""
        if self.val is None:
            return super().evaluate()
        was_training = self.model.training
        self.model.eval()
        bs = self.cfg.train.batch_size
        val = self._split("val")
        total: float | torch.Tensor = 0.0
        count = 0
        for start in range(0, min(len(val), VAL_BATCHES * bs), bs):
            idx = torch.arange(start, min(start + bs, len(val)))
            total += self.loss(val[idx]).double() * len(idx)  # stays on the device
            count += len(idx)
        val_loss = float(total / count)  # host sync: once per epoch
        result: dict[str, Any] = {
            "val_loss": val_loss,
            "collapsed": None,
            "scores": {},
            "target_scores": self.target_scores,
        }
        # argmax over NaN would fake a collapse; _scream_setup sets tokenize and scream_idx together
        if self.tokenize is not None and self.scream_idx is not None and math.isfinite(val_loss):
            tokens = self.tokenize(self.forward(val[self.scream_idx]))
            scores = self._scores(tokens)
            sc = self.cfg.detect.scream
            result.update(
                scores=scores,
                collapsed=scream_check(scores, self.target_scores, sc.dominant, sc.longest_run),
                tokens_head=tokens.reshape(-1)[:32].tolist(),
            )
        self.model.train(was_training)
        return result

    # health ------------------------------------------------------------------------------------
    def health_layers(self) -> dict[str, tuple[nn.Module, Any]]:
        """{layer name: (layer, its attention probe)} for the layers whose attention can be measured."""
        return self._health

    def health_loss(self) -> torch.Tensor:
        """The loss on the first HEALTH_ITEMS validation examples (0-d): what the health probe differentiates."""
        val = self._split("val")
        return self.loss(val[torch.arange(min(HEALTH_ITEMS, len(val)))])


# --- the check before any work starts ---------------------------------------------------------

_CHECKED: dict[str, tuple[list[str], int]] = {}  # run identity -> (module groups, n_train), per process


def check(cfg: RunConfig) -> None:
    """Call the factory and check what it returns (a forward and backward, `CustomWorkload`),
    then `train.batch_size` against its training examples and the fault keys against its module
    groups and steps. Built once per configuration and process: `stab run` checks before it
    creates the run folder and the run checks again. Raises ConfigError naming the bad value."""
    key = cfg.identity()
    if key not in _CHECKED:
        work = CustomWorkload(cfg, torch.device("cpu"))
        _CHECKED[key] = (list(work.module_groups()), work.n_train)
    names, n_train = _CHECKED[key]
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is more than the training data: "
            f"model._target_={getattr(cfg.model, 'target', None)} gives {n_train} training examples; expected at most {n_train}"
        )
    if cfg.fault.nan_at_step is not None:
        check_fault_module(cfg, names)
    check_fault_steps(cfg, n_train)
