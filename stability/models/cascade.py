"""The 3-stage cascade transformer on EnCodec latents (SPEC §2).

Stage i reads concat([prev, target]) over channels (prev: the input latents for stage 0, the
previous stage's output after that), projects to d_model[i], runs a transformer stack, projects
back to the latent size with `output_proj`, adds `residual[i] x prev`, and optionally matches
the RMS of the target: scale = clamp(rms(target) / rms(out), lo, hi). The seed's weak stage-2
residual (0.1) left stage 2's output at RMS 1.09 against a target of 5.69: it needed 5.2x and
the clamp allowed 1.5x. That is the arithmetic the probes here record every step.

    model = Cascade(ModelConfig())
    out = model(inp, target)          # (B, 128, T) -> (B, 128, T)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from stability.config import ModelConfig
from stability.distributed import global_mean
from stability.models.layers import Stack, init_weights, sinusoidal_positions, stabilizers


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over the whole batch: in a distributed training step, over the global batch (the
    ranks' mean squares are all-reduced, as SyncBatchNorm does), so the scale is the same at
    any world size."""
    return global_mean(x.float().pow(2)).sqrt()


class RMSMatch(nn.Module):
    """out x clamp(rms(target) / rms(out), lo, hi); a no-op scale of 1 when disabled.

    Keeps the last call's (rms(out), needed ratio, applied scale) as detached device tensors in
    `self.last` for the stage probe to read; nothing here leaves the device.
    """

    def __init__(self, enabled: bool, lo: float, hi: float) -> None:
        super().__init__()
        self.enabled, self.lo, self.hi = enabled, lo, hi
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`out` times the clamped ratio rms(target) / rms(out) (a 0-d scale: any shape); keeps `last`."""
        out_rms = rms(out)
        ratio = rms(target) / out_rms
        scale = ratio.clamp(self.lo, self.hi) if self.enabled else torch.ones_like(ratio)
        self.last = (out_rms.detach(), ratio.detach(), scale.detach())
        return out * scale.to(out.dtype)


class Stage(nn.Module):
    """Stage `i` of the cascade: concat(prev, target) -> in_proj -> transformer stack ->
    output_proj, plus residual[i] x prev, then the RMS match (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        d, C = cfg.d_model[i], cfg.latent_dim
        self.residual = cfg.residual[i]
        self.in_proj = nn.Linear(2 * C, d)
        self.stack = Stack(
            d,
            cfg.n_layers[i],
            cfg.n_heads[i],
            cfg.mlp_ratio,
            cfg.norm,
            cfg.norm_type,
            cfg.final_norm,
            causal=False,
            **stabilizers(cfg),
        )
        self.output_proj = nn.Linear(d, C)
        self.rms_match = RMSMatch(cfg.rms_match, *cfg.rms_clamp)

    def forward(self, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`prev` and `target` (B, C, T) latents -> this stage's output (B, C, T)."""
        x = torch.cat([prev, target], dim=1).transpose(1, 2)  # (B, T, 2C)
        x = self.in_proj(x)  # (B, T, d)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        x = self.stack(x)  # (B, T, d)
        out = self.output_proj(x).transpose(1, 2)  # (B, C, T)
        out = out + self.residual * prev
        return self.rms_match(out, target)


class Cascade(nn.Module):
    """The stages in sequence, weights drawn by `init_weights` (and spectral norm on each
    output projection with `model.spectral_norm`); see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage(cfg, i) for i in range(len(cfg.d_model)))
        init_weights(self, cfg.init_std)
        if cfg.spectral_norm:
            # Bounds each projection's gain by its largest singular value (Miyato et al. 2018,
            # arXiv 1802.05957); one power iteration per training forward.
            for stage in self.stage_list():
                spectral_norm(stage.output_proj)

    def stage_list(self) -> list[Stage]:
        """The stages in order, typed (iterating the `nn.ModuleList` yields plain modules)."""
        return [s for s in self.stages if isinstance(s, Stage)]

    def forward(self, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`inp` and `target` (B, 128, T) latents -> the last stage's output (B, 128, T)."""
        x = inp
        for stage in self.stages:
            x = stage(x, target)
        return x

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Named groups whose gradient norms are recorded, in forward (execution) order."""
        groups: dict[str, list[nn.Module]] = {}
        for i, stage in enumerate(self.stage_list()):
            groups[f"stage{i}.in_proj"] = [stage.in_proj]
            for j, layer in enumerate(stage.stack.blocks()):
                groups[f"stage{i}.layer{j}.attn"] = [layer.attn]
                groups[f"stage{i}.layer{j}.mlp"] = [layer.mlp]
                groups[f"stage{i}.layer{j}.norm"] = [layer.norm1, layer.norm2]
            if any(True for _ in stage.stack.final_norm.parameters()):
                groups[f"stage{i}.final_norm"] = [stage.stack.final_norm]
            groups[f"stage{i}.output_proj"] = [stage.output_proj]
        return groups

    def health_layers(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """Each transformer layer and its attention, named like its gradient groups."""
        return {
            f"stage{i}.layer{j}": (layer, layer.attn)
            for i, stage in enumerate(self.stage_list())
            for j, layer in enumerate(stage.stack.blocks())
        }

    def rms_matchers(self) -> list[RMSMatch]:
        """Each stage's RMS match, in order (the stage probe reads their `last`)."""
        return [stage.rms_match for stage in self.stage_list()]
