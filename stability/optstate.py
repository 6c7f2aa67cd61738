"""Optimizer-state and output signals of a training step, measured on the device.

What large-model teams found to come before a loss spike, measured every step without a host
sync (device tensors the step's one transfer carries to the host):

- `update_rel/<group>`: the relative update, RMS of Adam's update over RMS of the parameters of
  one module group. Update-norm spikes come before loss spikes and start in the lower layers
  (marin-community/marin#1368); the update is recomputed from the optimizer's own state after
  its step: lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), exactly what
  torch's AdamW applies, without the decoupled weight-decay term (lr * weight_decay relative to
  the parameters, <= 1e-4 at stab's presets). 0 on a step whose update was skipped.
- `adam_m/<group>`, `adam_v/<group>`: L2 norms of Adam's first and second moments (exp_avg,
  exp_avg_sq, not bias-corrected), as Levanter, Composer and OLMo-core log them.
- `eps_share/<group>`: the share of the group's coordinates whose bias-corrected sqrt(v) is
  below Adam's epsilon, 0..1: the epsilon regime, where the second moment under-estimates and the
  update stops being normalised (Wortsman et al. 2023, arXiv 2309.14322, Sec. 3.4).
- `lm/log_z`, `lm/log_z_max`: mean and largest log-partition log Z = logsumexp of the output
  logits over the batch's positions (output-logit divergence, arXiv 2309.14322 Sec. 3.2; PaLM's
  z-loss keeps it near 0, arXiv 2204.02311). Workloads with an `lm_head` (the char LM).
- `lm/attn_logit_max`: the largest pre-softmax attention logit of any layer in the step's
  forward (attention-logit growth, Dehghani et al. 2023, arXiv 2302.05442; marin#4239). One extra
  (B, nh, T, T) product per layer under no_grad; scaled dot-product attention never
  materialises the logits.

    probe = OptStateProbe(groups, opt)
    opt.step(); vec = probe.vector(skipped)       # (4 * G,) float64 on the device
    lm = LMProbe(model); loss = work.loss(batch); lm.vector()    # (3,) float64, or (0,)

Both are step probes (`stability.steplayout`): `measure()` gives {metric name: device tensor} and
`metrics` declares the record keys, so the run's `StepLayout` packs them into the step's one
transfer and unpacks them into metrics.jsonl.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from stability.steplayout import Metric

# Per module group, in this order in `OptStateProbe.measure`'s vector (G values each).
OPT_STATS = ("update_rel", "adam_m", "adam_v", "eps_share")
LM_STATS = ("log_z", "log_z_max", "attn_logit_max")


def opt_key(stat: str, group: str) -> str:
    """`<stat>/<group>` for one of OPT_STATS (see the module docstring for units)."""
    return f"{stat}/{group}"


def lm_key(stat: str) -> str:
    """`lm/<stat>` for one of LM_STATS."""
    return f"lm/{stat}"


class OptStateProbe:
    """Per-group relative update, moment norms and epsilon-regime share of an AdamW's state.

    `groups`: module group name -> modules (the gradient groups, forward order); a parameter is
    counted in the first group that holds it, as `instrument.GradProbe` counts it. `opt`: a
    torch AdamW (any implementation: its state is exp_avg, exp_avg_sq and step). Parameters the
    optimizer has no state for yet (before its first step) count as zero update and moments.
    """

    def __init__(self, groups: dict[str, list[nn.Module]], opt: torch.optim.Optimizer) -> None:
        self.names = list(groups)
        self.opt = opt
        hyper: dict[int, int] = {}  # parameter -> its param group's index (load_state_dict replaces the dicts)
        for i, pg in enumerate(opt.param_groups):
            for p in pg["params"]:
                hyper[id(p)] = i
        self.params: list[nn.Parameter] = []
        index: list[int] = []
        seen: set[int] = set()
        for g, modules in enumerate(groups.values()):
            for m in modules:
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen and id(p) in hyper:
                        seen.add(id(p))
                        self.params.append(p)
                        index.append(g)
        self.pg_index = [hyper[id(p)] for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.device = device
        self.index = torch.tensor(index, device=device, dtype=torch.long)
        counts = torch.zeros(len(self.names), dtype=torch.float64)
        counts.index_add_(
            0,
            torch.tensor(index, dtype=torch.long),
            torch.tensor([float(p.numel()) for p in self.params], dtype=torch.float64),
        )
        self.counts = counts.to(device)  # coordinates per group
        # one device scalar per optimizer param group, refilled with its lr each step (no sync)
        self._lr = [torch.zeros((), device=device, dtype=torch.float64) for _ in opt.param_groups]
        self._flat: tuple | None = None
        self.skipped: torch.Tensor | None = None  # set by the step: 1.0 = this step did not update
        self._numels = torch.zeros(0)
        self._idx = self.index

    phase = "update"  # measured after the optimizer step (stability.steplayout)
    metrics = (
        Metric(
            "update_rel",
            "update_rel/{group}",
            "RMS of Adam's update over RMS of the parameters (unitless; 0 on a skipped step)",
        ),
        Metric("adam_m", "adam_m/{group}", "L2 norm of Adam's first moment exp_avg (gradient units)"),
        Metric("adam_v", "adam_v/{group}", "L2 norm of Adam's second moment exp_avg_sq (gradient units squared)"),
        Metric("eps_share", "eps_share/{group}", "share of coordinates with bias-corrected sqrt(v) < eps, 0..1"),
    )

    @property
    def size(self) -> int:
        """Values this probe adds to the step vector: one per statistic per module group."""
        return len(OPT_STATS) * len(self.names)

    def measure(self) -> dict[str, torch.Tensor]:
        """{metric name: (G,) device tensor} (`steplayout.StepProbe`); `skipped`, when a step sets
        it, zeroes the relative update of a step that did not update."""
        vec = self.vector(self.skipped)
        return dict(zip(OPT_STATS, vec.split(len(self.names))))

    def keys(self) -> list[str]:
        """The record keys of `measure`'s vector, in order."""
        return [opt_key(s, g) for s in OPT_STATS for g in self.names]

    @torch.no_grad()
    def vector(self, skipped: torch.Tensor | None = None) -> torch.Tensor:
        """(4 * G,) float64 on the device, after `opt.step()`: update_rel..., adam_m..., adam_v...,
        eps_share... per group. `skipped` (0-dim, 1.0 = the step's update was skipped on the
        device, e.g. by `found_inf`) zeroes the relative update. No host sync.

        On its first call with optimizer state, the probe moves each moment into one flat
        buffer per moment (the optimizer's state tensors become views of it, in group order),
        so a signal costs a few whole-buffer passes and one `torch._foreach_norm` call over the
        groups' slices, with no per-parameter Python loop: the moment norms read M and V once;
        the epsilon-regime count is the squared L2 norm per group of v < eps^2 (1 - beta2^t) as
        0.0/1.0 floats; the update is
        m / (sqrt(v) + eps sqrt(1 - beta2^t)) in one scratch buffer of the same size (the
        probe's only extra memory: 4 bytes per parameter), and the weights' norms are one
        `_foreach_norm` over the parameters. A state the optimizer replaced (`load_state_dict`)
        is flattened again. The bias correction uses the step count of the first parameter
        (AdamW steps every parameter that has a gradient together).
        """
        if not self._flat_ok():
            if not any("exp_avg" in self.opt.state.get(p, {}) for p in self.params):
                return torch.zeros(self.size, device=self.device, dtype=torch.float64)
            self._flatten()
        assert self._flat is not None
        params, M, V, buf, views, lr_of = self._flat
        step = self.opt.state[params[0]]["step"]
        step = (
            step.to(self.device, torch.float64)
            if torch.is_tensor(step)
            else torch.tensor(float(step), device=self.device, dtype=torch.float64)
        ).clamp(min=1)
        pg = self.opt.param_groups[self.pg_index[0]]
        b1, b2 = pg["betas"]
        eps = float(pg["eps"])
        for g, t in zip(self.opt.param_groups, self._lr):  # device scalars refilled from host floats: no sync
            t.copy_(g["lr"]) if torch.is_tensor(g["lr"]) else t.fill_(float(g["lr"]))
        G = len(self.names)
        sbc2 = (1 - b2**step).sqrt()
        bc1 = 1 - b1**step
        thr = (eps * sbc2).float()  # sqrt(v_hat) < eps  <=>  sqrt(v) < thr
        moments = torch.stack(torch._foreach_norm(views[: 2 * G])).double()  # (2G,): |m| per group, |v| per group
        torch.lt(V, thr * thr, out=buf)  # 1.0 where v < thr^2, else 0.0 (a bool buffer costs 10x more on a CPU)
        count = torch.stack(torch._foreach_norm(views[2 * G :])).double().square().round()
        torch.sqrt(V, out=buf).add_(thr)
        torch.div(M, buf, out=buf)  # Adam's update is lr / bc1 * sqrt(bc2) * buf
        if len(self._lr) == 1:
            scale = self._lr[0] * sbc2 / bc1
        else:  # several param groups: each coordinate's own lr
            scale = sbc2 / bc1
            buf.mul_(torch.stack(lr_of).float().repeat_interleave(self._numels))
        u = torch.stack(torch._foreach_norm(views[2 * G :])).double()
        p_sq = torch.zeros(G, device=self.device, dtype=torch.float64).index_add_(
            0, self._idx, torch.stack(torch._foreach_norm(params)).double() ** 2
        )
        rel = u * scale / p_sq.sqrt().clamp_min(1e-30)  # RMS ratio = norm ratio (same count)
        if skipped is not None:
            rel = rel * (1 - skipped.to(rel.dtype))
        share = count / self.counts.clamp_min(1)
        return torch.cat([rel, moments, share])

    def _flat_ok(self) -> bool:
        """The flat buffers still back the optimizer's state (first and last parameter checked)."""
        if self._flat is None:
            return False
        params, M, V = self._flat[:3]
        for p, at in ((params[0], 0), (params[-1], M.numel() - params[-1].numel())):
            st = self.opt.state.get(p, {})
            if (
                "exp_avg" not in st
                or st["exp_avg"].data_ptr() != M[at:].data_ptr()
                or st["exp_avg_sq"].data_ptr() != V[at:].data_ptr()
            ):
                return False
        return len(params) == len(self.params) or not any(
            "exp_avg" in self.opt.state.get(p, {}) for p in self.params if p not in set(params)
        )

    def _flatten(self) -> None:
        """Copy the moments of the parameters that have optimizer state into two flat buffers
        (group order) and point the optimizer's state at views of them."""
        have = [i for i, p in enumerate(self.params) if "exp_avg" in self.opt.state.get(p, {})]
        params = [self.params[i] for i in have]
        numels = [p.numel() for p in params]
        self._numels = torch.tensor(numels, device=self.device)
        idx = self.index[have]
        lens = torch.zeros(len(self.names), dtype=torch.long).index_add_(0, idx.cpu(), self._numels.cpu()).tolist()
        bufs = []
        for key in ("exp_avg", "exp_avg_sq"):
            old = [self.opt.state[p][key] for p in params]
            flat = torch.cat([t.reshape(-1) for t in old])
            for p, view in zip(params, flat.split(numels)):
                self.opt.state[p][key] = view.view_as(p)
            bufs.append(flat)
        lr_of = [self._lr[self.pg_index[i]] for i in have]
        scratch = torch.empty_like(bufs[0])
        # each group's slice of M, then of V, then of the scratch buffer: the `_foreach_norm` inputs
        views = [v for flat in (bufs[0], bufs[1], scratch) for v in flat.split(lens)]
        self._idx = idx
        self._flat = (params, bufs[0], bufs[1], scratch, views, lr_of)


class LMProbe:
    """log Z of the output logits and the largest attention logit, captured in the training
    forward by hooks, on the device. `size` is 0 (nothing measured) for a model with neither an
    `lm_head` nor stab's attention layers.

    Call `measure()` after the forward whose values it should report; a forward in eval mode
    (validation, generation) does not overwrite them.
    """

    def __init__(self, model: nn.Module) -> None:
        from stability.models.layers import Attention

        inner = getattr(model, "_orig_mod", model)
        inner = getattr(inner, "module", inner)  # DDP
        head = getattr(inner, "lm_head", None)
        self.attn = [m for m in inner.modules() if isinstance(m, Attention)] if head is not None else []
        device = next(inner.parameters()).device
        self._empty = torch.zeros(0, device=device, dtype=torch.float64)
        self._nan = torch.full((), math.nan, device=device, dtype=torch.float64)
        self.log_z = self.log_z_max = self._nan
        self.handles = []
        if head is not None:
            self.handles.append(head.register_forward_hook(self._head_hook))
            for a in self.attn:
                a.watch_logits = True

    phase = "grads"  # captured in the forward: travels with the step's first transfer

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """log Z (mean, max) and the largest attention logit; none for a model with neither an `lm_head` nor stab's attention."""
        if not self.handles:
            return ()
        return (
            Metric("log_z", lm_key("log_z"), "mean log Z = logsumexp of the output logits over the batch (nats)"),
            Metric("log_z_max", lm_key("log_z_max"), "largest log Z of the batch's positions (nats)"),
            Metric(
                "attn_logit_max",
                lm_key("attn_logit_max"),
                "largest pre-softmax attention logit of any "
                "layer in the training forward (unitless; NaN without attention layers)",
            ),
        )

    @property
    def size(self) -> int:
        """Values this probe adds to the step vector (0: nothing measured)."""
        return len(LM_STATS) if self.handles else 0

    def keys(self) -> list[str]:
        """The step record keys of its values (`lm/log_z`, ...), in vector order."""
        return [lm_key(s) for s in LM_STATS] if self.size else []

    def _head_hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if module.training:
            with torch.no_grad():
                z = torch.logsumexp(out.detach().float(), dim=-1)  # (B, T)
                self.log_z, self.log_z_max = z.mean().double(), z.max().double()

    def measure(self) -> dict[str, torch.Tensor]:
        """{metric name: 0-dim device tensor} (`steplayout.StepProbe`); {} without an lm_head."""
        vec = self.vector()
        return dict(zip(LM_STATS, vec.unbind())) if self.size else {}

    @torch.no_grad()
    def vector(self) -> torch.Tensor:
        """(3,) float64 on the device: mean log Z, max log Z, max attention logit (NaN where the
        model has no attention layer); (0,) when the model has no lm_head."""
        if not self.size:
            return self._empty
        logits = [a.logit_max for a in self.attn if a.logit_max is not None]
        top = torch.stack(logits).max().double() if logits else self._nan
        return torch.stack([self.log_z, self.log_z_max, top])

    def close(self) -> None:
        """Remove the forward hooks and stop the attention layers recording their logits."""
        for h in self.handles:
            h.remove()
        for a in self.attn:
            a.watch_logits = False
        self.handles = []
