"""Probes that measure a training step without host syncs.

`GradProbe` turns all gradients into one total norm and one norm per module group with a single
`torch._foreach_norm` call and an `index_add_` (no `.item()` per parameter), and clips with
the same norms, so clipping costs no second pass. The sums of squares are accumulated in
float64: a float32 total of finite gradients of ~1e20 would overflow to inf and read as a NaN in
the model. It also says whether every parameter's gradient is finite, from the per-parameter
norms, not from the total. `StageProbe` reads the cascade's RMS-match
stats. Both return device tensors; the training loop concatenates them into one vector and
moves it to the host once per step.

`NonFiniteProbe` is the opposite: it syncs at every module and is used only to re-run the one
step where a non-finite value first appeared, to name the module group where it started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from stability.outputs import all_finite
from stability.steplayout import STAGE


class GradProbe:
    """Gradient norms of a run's module groups (a parameter shared by groups counts in the first),
    measured on the device in one pass (`measure`)."""

    def __init__(self, groups: dict[str, list[nn.Module]]) -> None:
        self.names = list(groups)
        self.params: list[nn.Parameter] = []
        index: list[int] = []
        seen: set[int] = set()
        for g, modules in enumerate(groups.values()):
            for m in modules:
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        self.params.append(p)
                        index.append(g)
        self._index = torch.tensor(index)
        self._index_on: dict[torch.device, torch.Tensor] = {}

    def measure(self, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total grad norm, per-group grad norms, whether every gradient is finite), all on the
        device, before clipping; the norms are float64.

        The per-parameter norms are float32 (fast); each is inf when a gradient holds inf, or
        when its finite elements' squares overflow float32 (|g| around 1e19 and up). A caller
        that sees an inf norm calls again with `exact=True`: the per-parameter norms are then
        computed in float64 (about 25x slower on CPU, so only on such a step), where finite
        float32 gradients always have a finite norm, so finiteness is the gradients' own.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError(
                "no parameter has a gradient: measure after loss.backward(), before the gradients are zeroed"
            )
        if len(grads) == len(self.params):
            idx = self._index_on.get(grads[0].device)
            if idx is None:
                idx = self._index_on[grads[0].device] = self._index.to(grads[0].device)
        else:  # some parameter got no gradient this step
            idx = torch.tensor(
                [i for p, i in zip(self.params, self._index.tolist()) if p.grad is not None], device=grads[0].device
            )
        norms = torch.stack(
            torch._foreach_norm(grads, dtype=torch.float64) if exact else torch._foreach_norm(grads)
        ).double()  # (P,)
        finite = torch.isfinite(norms).all()
        sq = torch.zeros(len(self.names), device=norms.device, dtype=torch.float64).index_add_(0, idx, norms**2)
        return sq.sum().sqrt(), sq.sqrt(), finite

    def clip_(self, total: torch.Tensor, max_norm: float | None) -> None:
        """Scale grads so their total norm is at most `max_norm` (no-op for None).

        Same rule as `torch.nn.utils.clip_grad_norm_`, reusing the norm already measured (which,
        unlike that function's float32 total, does not overflow for finite gradients).
        """
        if max_norm is not None:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0).float()
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)


class StageProbe:
    """Per-stage (rms(out) before matching, needed ratio, applied scale) from `RMSMatch.last`: a
    step probe (`stability.steplayout`) whose metrics are `steplayout.STAGE`, none without stages."""

    phase = "grads"

    def __init__(self, matchers: list[Any], device: torch.device) -> None:
        self.matchers, self.device = matchers, device
        self.metrics = STAGE if matchers else ()

    def measure(self) -> dict[str, torch.Tensor]:
        """{"stage_rms", "stage_ratio", "stage_scale": (n_stages,)} on the device ({} without stages)."""
        if not self.matchers:
            return {}
        rms, ratio, scale = zip(*(m.last for m in self.matchers))
        return {"stage_rms": torch.stack(rms), "stage_ratio": torch.stack(ratio), "stage_scale": torch.stack(scale)}


class NonFiniteProbe:
    """Finds where non-finite values start: the first group (in forward order) with a non-finite
    tensor anywhere in its output (tensors, tuples, dicts, `ModelOutput`: `stability.outputs`), else
    the first group (in backward order) whose gradient is. Syncs per module; only for re-running
    one step."""

    def __init__(self, groups: dict[str, list[nn.Module]]) -> None:
        self.first_forward: str | None = None
        self.first_backward: str | None = None
        self._handles: list[Any] = []
        for name, modules in groups.items():
            for m in modules:
                self._handles.append(m.register_forward_hook(self._forward_hook(name)))
                for p in m.parameters():
                    if p.requires_grad:
                        self._handles.append(p.register_hook(self._grad_hook(name)))

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self.first_forward is None and not all_finite(out):  # syncs: forensic mode only
                self.first_forward = name

        return hook

    def _grad_hook(self, name: str) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            if self.first_backward is None and not torch.isfinite(grad).all():
                self.first_backward = name

        return hook

    @property
    def first(self) -> tuple[str | None, str]:
        """(group, where) with where in {'forward', 'backward', 'none'}."""
        if self.first_forward:
            return self.first_forward, "forward"
        if self.first_backward:
            return self.first_backward, "backward"
        return None, "none"

    def close(self) -> None:
        """Remove the probe's hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
