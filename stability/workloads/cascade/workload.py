"""The cascade workload: its data, model, loss, validation loss and scream check.

The data are pairs of EnCodec latents (`data.py`: synthetic audio from `synth.py`, or a folder
read by `audio.py`, encoded by `codec.py`); the model is `stability.models.cascade.Cascade`;
the scream check quantizes the output with k-means codebooks and compares code statistics with
the target's. The loop sees it only through `stability.workloads.base.Workload`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from stability.config import ConfigError, DataConfig, ModelConfig, RunConfig
from stability.detectors.collapse import mean_scores, scream_check
from stability.models.cascade import Cascade
from stability.workloads.base import Workload
from stability.workloads.cascade.audio import write_listening
from stability.workloads.cascade.codec import load_codec
from stability.workloads.cascade.data import load_latents


class CascadeWorkload(Workload):
    """Latent-to-latent regression with the cascade: MSE loss on (B, T, D) latents."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        if not isinstance(cfg.model, ModelConfig) or not isinstance(cfg.data, DataConfig):
            raise ConfigError(
                f"model={cfg.model.name} data={cfg.data.name}: the cascade needs model=cascade and audio data"
            )
        self.data_cfg = cfg.data
        self.data = load_latents(cfg.data)
        self.info: dict[str, Any] = dict(self.data.info)
        # `net`: the cascade itself, for its own methods; `model`: what is trained (it may be compiled or DDP-wrapped)
        self.net = Cascade(cfg.model).to(device)
        self.model: nn.Module = self.net
        d = self.data
        self.train_input, self.train_target = d.train_input.to(device), d.train_target.to(device)
        self.val_input, self.val_target = d.val_input.to(device), d.val_target.to(device)
        k = min(cfg.detect.scream.items, len(d.val_target))
        self._scream_slice = slice(0, k)
        target_codes = d.codebook.codes(self.to_codec(d.val_target[:k])).tolist()
        self.target_scores = mean_scores(target_codes, cfg.detect.scream.n)
        # the no-learning baseline: the MSE of predicting every validation frame by the target's mean over
        # items and frames (per channel), i.e. the target's variance: what a model scores that ignores its input
        vt = d.val_target.double()
        self.info["baseline_loss"] = float(((vt - vt.mean(dim=(0, 1), keepdim=True)) ** 2).mean())
        self.info["baseline"] = "variance of the validation target (MSE of predicting its per-channel mean)"

    def to_codec(self, latents: torch.Tensor, side: str = "target") -> torch.Tensor:
        """Model space -> the codec's own latent space (see `LatentData.to_codec`)."""
        return self.data.to_codec(latents, side)

    @property
    def n_train(self) -> int:
        """Training items (latent pairs)."""
        return len(self.train_input)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pairs at `idx` (1-d): (input, target) latents, each (B, 128, T), on the device."""
        idx = idx.to(self.device)
        return self.train_input[idx], self.train_target[idx]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """MSE between the cascade's output and the target latents, in float32 (0-d)."""
        inp, target = batch
        return F.mse_loss(self.model(inp, target).float(), target.float())

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """The cascade's gradient groups (`Cascade.module_groups`)."""
        return self.net.module_groups()

    def health_layers(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """Each transformer layer and its attention (`Cascade.health_layers`)."""
        return self.net.health_layers()

    def health_loss(self) -> torch.Tensor:
        """The loss on the fixed validation (scream-check) batch, for the health probe."""
        s = self._scream_slice
        return self.loss((self.val_input[s], self.val_target[s]))

    def rms_matchers(self) -> list[Any]:
        """Each stage's RMS match, in order."""
        return self.net.rms_matchers()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss and the scream check on the fixed validation batch."""
        was_training = self.model.training
        self.model.eval()
        out = self.model(self.val_input, self.val_target).float()
        val_loss = F.mse_loss(out, self.val_target.float()).item()  # host sync: once per epoch
        s = self._scream_slice
        sc = self.cfg.detect.scream
        if torch.isfinite(out[s]).all():
            codes = self.data.codebook.codes(self.to_codec(out[s].cpu())).tolist()
            scores = mean_scores(codes, sc.n)
            screamed = scream_check(scores, self.target_scores, sc.dominant, sc.longest_run)
        else:
            codes, scores, screamed = [], {}, None
        self.model.train(was_training)
        return {
            "val_loss": val_loss,
            "collapsed": screamed,
            "scores": scores,
            "target_scores": self.target_scores,
            "codes_head": [c[:32] for c in codes],
        }

    @torch.no_grad()
    def listen(self, epoch: int, run_dir: Path) -> dict[str, Any]:
        """At `listen` epochs, the output for the first validation items decoded by EnCodec to
        RUN/audio/epoch{E}_item{i}_output.wav, next to item{i}_input.wav and item{i}_target.wav.
        Returns {"audio": [paths relative to the run folder]} for the epoch record, or {}."""
        if not self.cfg.listen.at(epoch):
            return {}
        if getattr(self, "_codec", None) is None:  # the decoder is loaded only to listen (~2 s)
            self._codec = load_codec(self.data_cfg.codec)
        k = min(self.cfg.listen.items, len(self.val_input))
        was_training = self.model.training
        self.model.eval()
        out = self.model(self.val_input[:k], self.val_target[:k]).float()
        self.model.train(was_training)
        refs = (
            None
            if getattr(self, "_listened", False)
            else {"input": self.to_codec(self.val_input[:k], "input"), "target": self.to_codec(self.val_target[:k])}
        )
        self._listened = True
        return write_listening(self._codec.model, run_dir, epoch, self.to_codec(out), refs)
