"""Recovery policies: what a training step does about a spike, decided on the device.

Three ablation axes (each a sweep factor, off by default, so a run without them is the run it
always was):

- `train.on_spike=skip`: OLMo-core's `SkipStepOptimizer` rule (allenai/OLMo-core#424; its
  default: 6 sigma over the last 128 steps, deciding only once half the window is filled): the
  step is skipped when its loss or its total grad norm exceeds the mean of the previous
  `spike_window` finite steps by more than `spike_sigma` standard deviations. The skip goes
  through the fused AdamW's `found_inf`, the path `training.Stepper` already uses for a
  non-finite step: weights, moments and step count stay as they were, without a host sync. As in
  OLMo-core, a skipped step's finite loss and grad norm still enter the window.
- `train.on_spike=backoff`: the same detector; a spike multiplies the learning rate by
  `backoff_factor` (default 0.5) from that step on, and the factor grows back geometrically to 1
  over `backoff_steps` (default 100) steps. OPT-175B's logbook (Zhang et al. 2022, arXiv
  2205.01068, Sec. 2.4 and its chronicles) lowered the learning rate after a divergence by hand;
  this does it at the step, on the device (the fused AdamW takes a tensor learning rate).
- `train.update_clip=D`: StableAdamW's update clipping (Wortsman et al. 2023, arXiv 2304.13013,
  Alg. 2, after Adafactor's, Shazeer & Stern 2018, arXiv 1804.04235): each tensor's learning
  rate is divided by max(1, RMS(g^2 / max(v_hat, eps^2)) / D), where v_hat is this step's
  bias-corrected second moment (including g). It bites exactly when a gradient is large against
  the moment that normalises it: at a spike. StableAdamW uses D = 1.

Whether skipping helps is disputed (pytorch/torchtitan#916; marin-community/marin#1368 found it
does not shorten recovery): stab measures it (`stability.report.recovery`).

    guard = SpikeGuard(window=128, sigma=6.0, device=device)
    spike = guard.check(loss, grad_norm)   # 0-dim float, 1.0 = spike; then the policies act
"""

from __future__ import annotations

import math

import torch

ON_SPIKE = ("none", "skip", "backoff")


class SpikeGuard:
    """A rolling window of the last `window` finite (loss, total grad norm) pairs on the device,
    and OLMo-core's n-sigma rule over it. No host sync; the state is two tensors, saved with a
    snapshot (`state_dict`)."""

    def __init__(self, window: int = 128, sigma: float = 6.0, device: torch.device | str = "cpu") -> None:
        if window < 2:
            raise ValueError(f"train.spike_window={window} is not allowed: expected an integer >= 2")
        self.window, self.sigma = window, sigma
        self.min_count = max(2, window // 2)  # OLMo-core: decide once half the window is there
        self.buf = torch.zeros(2, window, device=device, dtype=torch.float64)  # loss, grad norm
        self.count = torch.zeros((), device=device, dtype=torch.long)  # values seen (finite ones)

    @torch.no_grad()
    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether this step's loss or grad norm is a spike (0-dim float64, 1.0 = spike), from the
        previous steps; then add this step's values to the window if both are finite.
        loss, grad_norm: 0-dim (or (1,)) device tensors."""
        x = torch.stack([loss.reshape(()).double(), grad_norm.reshape(()).double()])  # (2,)
        n = self.count.clamp(max=self.window)
        valid = (torch.arange(self.window, device=self.buf.device) < n).double()  # (W,)
        cnt = valid.sum()
        mean = (self.buf * valid).sum(1) / cnt.clamp(min=1)
        var = (((self.buf - mean[:, None]) * valid) ** 2).sum(1) / (cnt - 1).clamp(min=1)  # torch.std's correction=1
        over = (x - mean) > self.sigma * var.sqrt()
        spike = (over.any() & (n >= self.min_count) & torch.isfinite(x).all()).double()
        finite = torch.isfinite(x).all()
        slot = (self.count % self.window).view(1)
        self.buf.index_copy_(1, slot, torch.where(finite, x, self.buf.index_select(1, slot).view(2)).view(2, 1))
        self.count += finite.long()
        return spike

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The spike window (2, W) and its count, as device copies a snapshot keeps."""
        return {"buf": self.buf.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the window from `state_dict()` (a rewind), in place on this device."""
        self.buf.copy_(state["buf"])
        self.count.copy_(state["count"])


class LRBackoff:
    """A learning-rate multiplier on the device: a spike multiplies it by `factor`; each step it
    grows back by factor^(-1/steps), up to 1. `apply(opt)` hands the fused AdamW a tensor
    learning rate (the schedule's value times the multiplier) for one step; `restore` puts the
    schedule's floats back, so the schedule and the record's `lr` stay host floats."""

    def __init__(self, factor: float = 0.5, steps: int = 100, device: torch.device | str = "cpu") -> None:
        if not 0 < factor < 1:
            raise ValueError(f"train.backoff_factor={factor} is not allowed: expected a number in (0, 1)")
        self.factor, self.steps = factor, steps
        self.growth = factor ** (-1.0 / max(1, steps))
        self.scale = torch.ones((), device=device, dtype=torch.float64)
        self._lr: list[torch.Tensor] = []
        self._saved: list[float] = []

    @torch.no_grad()
    def update(self, spike: torch.Tensor) -> torch.Tensor:
        """This step's multiplier (0-dim): last step's grown back toward 1, times `factor` on a spike."""
        grown = (self.scale * self.growth).clamp(max=1.0)
        self.scale = torch.where(spike > 0, self.scale * self.factor, grown)
        return self.scale

    def apply(self, opt: torch.optim.Optimizer) -> None:
        """Give every param group a 0-dim tensor lr: the schedule's float times the multiplier (one step)."""
        if len(self._lr) != len(opt.param_groups):
            self._lr = [torch.zeros((), device=self.scale.device, dtype=torch.float32) for _ in opt.param_groups]
        self._saved = [g["lr"] for g in opt.param_groups]
        for g, t in zip(opt.param_groups, self._lr):
            t.fill_(float(g["lr"])).mul_(self.scale.float())
            g["lr"] = t

    def restore(self, opt: torch.optim.Optimizer) -> None:
        """Put the schedule's float learning rates back after the step (`apply` saved them)."""
        for g, lr in zip(opt.param_groups, self._saved):
            g["lr"] = lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learning-rate multiplier (0-dim), as a device copy a snapshot keeps."""
        return {"scale": self.scale.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the multiplier from `state_dict()` (a rewind)."""
        self.scale = state["scale"].clone().to(self.scale.device)


class UpdateClip:
    """StableAdamW's update clipping for torch's AdamW (see the module docstring): measure the
    per-tensor factor 1 / max(1, RMS(g^2 / max(v_hat, eps^2)) / D) before the step, remember
    the weights, and after the step scale each tensor's update by its factor. Costs a copy of
    the weights and a few passes over the gradients per step; `stab bench train.update_clip=1`
    measures it. `last_clipped` (0-dim) is the share of tensors whose update was scaled down."""

    def __init__(self, threshold: float, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        if not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"train.update_clip={threshold} is not allowed: expected a positive number or none")
        self.d, self.opt = threshold, opt
        self.params = [p for p in params if p.requires_grad]
        self._old: list[torch.Tensor] = []
        self._factor: list[torch.Tensor] = []
        self.factors: list[torch.Tensor] = []  # the last step's per-tensor factors (0-dim each)
        self._params: list[torch.nn.Parameter] = []
        device = self.params[0].device if self.params else torch.device("cpu")
        self.last_clipped = torch.zeros((), device=device, dtype=torch.float64)

    @torch.no_grad()
    def before(self) -> None:
        """Measure the factors from the gradients about to be applied; keep the weights."""
        group_of = {id(p): g for g in self.opt.param_groups for p in g["params"]}
        ps = [p for p in self.params if p.grad is not None]
        self._params = ps
        if not ps:
            self._factor = []
            return
        factors = []
        for p in ps:
            g = group_of[id(p)]
            b2, eps = g["betas"][1], g["eps"]
            st = self.opt.state.get(p, {})
            assert p.grad is not None  # `ps` holds the parameters with a gradient
            g2 = p.grad.float().square()
            if "exp_avg_sq" in st:
                t = st["step"] + 1 if torch.is_tensor(st["step"]) else torch.tensor(float(st["step"]) + 1)
                v_hat = (st["exp_avg_sq"] * b2 + g2 * (1 - b2)) / (1 - b2 ** t.to(g2.device).float())
            else:  # the first step: v_hat = g^2
                v_hat = g2
            rms = (g2 / v_hat.clamp_min(eps**2)).mean().sqrt()
            # a non-finite gradient (a step the device skips, train.sync_every > 1): factor 1, so
            # `after` leaves the weights as the skipped step left them, not NaN
            factors.append(torch.nan_to_num(1.0 / (rms / self.d).clamp(min=1.0), nan=1.0))
        self._factor = factors
        self.factors = factors
        self._old = list(torch._foreach_mul([p.detach() for p in ps], 1.0))  # a copy of the weights
        self.last_clipped = (torch.stack(factors) < 1).double().mean()

    @torch.no_grad()
    def after(self) -> None:
        """Scale each tensor's update (new - old weights) by its factor."""
        if not self._factor:
            return
        # p <- p + (1 - f) (old - p) = old + f (p - old)
        torch._foreach_lerp_([p.detach() for p in self._params], self._old, [1 - f for f in self._factor])
        self._old = []


class Recovery:
    """A run's recovery policies around the optimizer step, and the step probe that records them
    (`steplayout.StepProbe`, "update" phase): `recover/spike` (1.0: the detector fired),
    `recover/skipped` (1.0: the update was skipped, on_spike=skip), `recover/lr_scale` (the
    learning-rate multiplier the step used, on_spike=backoff) and `recover/update_clipped` (the
    share of tensors whose update was scaled down, update_clip).

        skip = recovery.before(values)    # device tensors of the step's "grads" metrics
        opt.found_inf = max(guard, skip); opt.step(); recovery.after()
    """

    phase = "update"

    def __init__(
        self,
        on_spike: str,
        opt: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        device: torch.device,
        window: int = 128,
        sigma: float = 6.0,
        backoff_factor: float = 0.5,
        backoff_steps: int = 100,
        update_clip: float | None = None,
    ) -> None:
        from stability.steplayout import Metric

        if on_spike not in ON_SPIKE:
            raise ValueError(f"train.on_spike={on_spike!r} is not allowed: expected one of {', '.join(ON_SPIKE)}")
        self.opt = opt
        self.guard = SpikeGuard(window, sigma, device) if on_spike != "none" else None
        self.skip = on_spike == "skip"
        self.backoff = LRBackoff(backoff_factor, backoff_steps, device) if on_spike == "backoff" else None
        self.clip = UpdateClip(update_clip, opt, params) if update_clip is not None else None
        self._zero = torch.zeros((), device=device, dtype=torch.float64)
        self.spike = self.skipped = self._zero
        metrics = []
        if self.guard is not None:
            metrics += [
                Metric(
                    "spike",
                    "recover/spike",
                    "1 if the spike detector fired on this step "
                    "(loss or grad norm > spike_sigma std above the window's mean)",
                ),
                Metric("skipped", "recover/skipped", "1 if this step's update was skipped (on_spike=skip)"),
            ]
        if self.backoff is not None:
            metrics.append(
                Metric("lr_scale", "recover/lr_scale", "the learning-rate multiplier this step used (on_spike=backoff)")
            )
        if self.clip is not None:
            metrics.append(
                Metric(
                    "update_clipped",
                    "recover/update_clipped",
                    "share of tensors whose update was scaled down by update_clip, 0..1",
                )
            )
        self.metrics = tuple(metrics)

    @property
    def active(self) -> bool:
        """True when any policy (skip, backoff, update clip) is on, i.e. it measures something."""
        return bool(self.metrics)

    def before(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Decide on the device, before the optimizer step: returns the skip flag (0-dim float32,
        1.0 = skip this update), sets the backed-off learning rate, measures the update clip."""
        if self.guard is not None:
            self.spike = self.guard.check(loss, grad_norm)
            self.skipped = self.spike if self.skip else self._zero
        if self.backoff is not None:
            self.backoff.update(self.spike)
            self.backoff.apply(self.opt)
        if self.clip is not None:
            self.clip.before()
        return self.skipped.float()

    def after(self) -> None:
        """After the optimizer step: the schedule's learning rate back, the clipped updates scaled."""
        if self.backoff is not None:
            self.backoff.restore(self.opt)
        if self.clip is not None:
            self.clip.after()

    def idle(self) -> None:
        """A step that does not update (non-finite): nothing was detected, skipped or clipped by a policy."""
        self.spike = self.skipped = self._zero
        if self.clip is not None:
            self.clip.last_clipped = self._zero

    def measure(self) -> dict[str, torch.Tensor]:
        """{metric: 0-dim device tensor} of this step: spike and skipped, lr_scale, update_clipped (the policies on)."""
        out: dict[str, torch.Tensor] = {}
        if self.guard is not None:
            out.update(spike=self.spike, skipped=self.skipped)
        if self.backoff is not None:
            out["lr_scale"] = self.backoff.scale
        if self.clip is not None:
            out["update_clipped"] = self.clip.last_clipped
        return out

    def state_dict(self) -> dict[str, object]:
        """The device state a snapshot keeps (the spike window, the lr multiplier)."""
        return {
            "guard": self.guard.state_dict() if self.guard else None,
            "backoff": self.backoff.state_dict() if self.backoff else None,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the policies' device state from `state_dict()` (a rewind); a policy off or absent in `state` is left."""
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])  # type: ignore[arg-type]
        if self.backoff is not None and state.get("backoff"):
            self.backoff.load_state_dict(state["backoff"])  # type: ignore[arg-type]
