"""A factory's model, data and loss behind stab's workload interface (`model=custom`): module
groups, the forward-and-backward check, validation, the scream check and attention health.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from stability.config import ConfigError, CustomModelConfig, RunConfig
from stability.detectors.collapse import mean_scores, scream_check
from stability.health import SdpaAttention, calls_sdpa
from stability.workloads.base import Workload
from stability.workloads.custom.attention import attention_probe
from stability.workloads.custom.examples import Examples, split
from stability.workloads.custom.factory import Task, first_line, make_task
from stability.workloads.custom.groups import auto_groups, explicit_groups, find_layers, tied

VAL_BATCHES = 64  # validation batches (of train.batch_size) the validation loss averages at most
HEALTH_ITEMS = 8  # validation examples the health probe's forward and backward use
SCREAM_SINGLE_ITEMS = 256  # one token per example (a classifier): these many predictions form one sequence
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
                    f"{where}: the forward or loss on a training batch raised {type(e).__name__}: {first_line(e)}"
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
                    f"{self.where}: tokens({what}) raised {type(e).__name__}: {first_line(e)} (tokens "
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
