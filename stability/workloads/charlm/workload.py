"""The char-LM workload: text data, the character LM, its loss and the text scream check.

Same interface as the cascade's (see `stability.workloads.base.Workload`), so the instrumented loop
trains it unchanged. Training examples are the non-overlapping windows of `model.context + 1`
characters of the training text (input: the first `context`, target: the last `context`).

Scream check, at each epoch end: greedy continuations of `detect.scream.gen_chars` characters
from `detect.scream.items` fixed prompts (`prompt_chars` characters of validation text each).
The continuations are scored (dominant-character share, longest run, distinct-n, seq-rep-n,
the share of the short loop they end in) and compared with the same scores of the real text
that follows each prompt. Collapsed = degenerate while the real text is not. The generated
text is returned under "samples" and lands in epochs.jsonl and samples.txt.

    stab run model=charlm preset=smoke norm=post train.lr=3e-2
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from stability.config import CharLMConfig, ConfigError, RunConfig, TextDataConfig
from stability.detectors.collapse import loop_share, mean_scores, scream_check
from stability.models.charlm import CharLM, lm_loss
from stability.workloads.base import Workload
from stability.workloads.charlm.text import TextSplit, check_sizes, read_source, split_text

HEALTH_WINDOWS = 8  # validation windows the health probe's forward and backward use


def configs(cfg: RunConfig) -> tuple[CharLMConfig, TextDataConfig]:
    """`cfg.model` and `cfg.data`, typed; ConfigError when they are not the char LM's."""
    if not isinstance(cfg.model, CharLMConfig) or not isinstance(cfg.data, TextDataConfig):
        raise ConfigError(f"model={cfg.model.name} data={cfg.data.name}: the char LM needs model=charlm and text data")
    return cfg.model, cfg.data


def load_split(cfg: RunConfig) -> TextSplit:
    """Read and split the configured text; `ConfigError` (naming data.path) if it cannot serve
    this configuration. Cheap to call twice: the corpus and files are cached per process."""
    mcfg, dcfg = configs(cfg)
    text, info = read_source(dcfg)
    split = split_text(text, dcfg, info)
    sc = cfg.detect.scream
    check_sizes(
        split, dcfg, mcfg.context, cfg.train.batch_size, need_val=max(mcfg.context + 1, sc.prompt_chars + sc.gen_chars)
    )
    return split


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping (context + 1)-character windows with stride `context`: (N, context + 1)."""
    return ids.unfold(0, context + 1, context)


def prompt_starts(val: torch.Tensor, n: int, span: int, space_ids: set[int]) -> list[int]:
    """`n` evenly spaced offsets in the validation text, each moved just past a whitespace
    character when one is near, so prompts start at a word."""
    last = len(val) - span
    starts = []
    for k in range(n):
        s = round(k * last / max(1, n - 1)) if n > 1 else 0
        for j in range(s, min(s + 64, last)):
            if int(val[j]) in space_ids:
                s = j + 1
                break
        starts.append(min(s, last))
    return starts


def unigram_entropy(ids: torch.Tensor, vocab: int) -> float:
    """Entropy (nats) of the character frequencies of `ids` (N,) int64 over a vocabulary of `vocab`:
    the cross-entropy of a model that predicts each character by its frequency alone."""
    counts = torch.bincount(ids.flatten(), minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


class CharLMWorkload(Workload):
    """Next-character prediction with the char LM: cross-entropy (+ z-loss) on (B, context) ids."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        split = load_split(cfg)
        self.tokenizer = tok = split.tokenizer
        mcfg, dcfg = configs(cfg)
        self.z_loss = mcfg.z_loss
        T = mcfg.context
        # `net`: the char LM itself, for its own methods; `model`: what is trained (it may be compiled or DDP-wrapped)
        self.net = CharLM(mcfg, vocab_size=len(tok)).to(device)
        self.model: nn.Module = self.net
        self.train_windows = windows(split.train, T).to(device)  # (N, T + 1)
        self.val_windows = windows(split.val, T)[: dcfg.n_val].to(device)  # (n_val, T + 1)

        sc = cfg.detect.scream
        P, G = sc.prompt_chars, sc.gen_chars
        spaces = {i for i, c in enumerate(tok.chars) if c.isspace()}
        starts = prompt_starts(split.val, sc.items, P + G, spaces)
        self.prompts = torch.stack([split.val[s : s + P] for s in starts]).to(device)  # (items, P)
        references = [split.val[s + P : s + P + G].tolist() for s in starts]  # the real continuations
        self.target_scores = self._scores(references)
        self.info: dict[str, Any] = {
            **split.info,
            "train_windows": len(self.train_windows),
            "val_windows": len(self.val_windows),
            "prompts": [tok.decode(p.tolist()) for p in self.prompts],
            "references": [tok.decode(r) for r in references],
            # the no-learning baseline: the cross-entropy of predicting every character by its frequency in
            # the training text (nats), what a model scores that has learned the unigram and nothing else
            "baseline_loss": unigram_entropy(split.train, len(tok)),
            "baseline": "unigram entropy of the training text",
        }

    def _scores(self, rows: list[list[int]]) -> dict[str, float]:
        sc = self.cfg.detect.scream
        scores = mean_scores(rows, sc.n)
        scores["loop"] = float(sum(loop_share(r, sc.loop_period) for r in rows) / len(rows))
        return scores

    @property
    def n_train(self) -> int:
        """Training windows of context + 1 characters."""
        return len(self.train_windows)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at `idx` (1-d) as (inputs, next characters), each (B, T) token ids, on the device."""
        w = self.train_windows[idx.to(self.device)]  # (B, T + 1)
        return w[:, :-1], w[:, 1:]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the next character in nats per token, plus the z-loss if configured (0-d)."""
        x, y = batch
        return lm_loss(self.model(x), y, self.z_loss)  # the one place z_loss is used

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """The char LM's gradient groups (`CharLM.module_groups`)."""
        return self.net.module_groups()

    def health_layers(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """Each transformer layer and its attention (`CharLM.health_layers`)."""
        return self.net.health_layers()

    def health_loss(self) -> torch.Tensor:
        """The loss on the first validation windows, for the health probe."""
        w = self.val_windows[:HEALTH_WINDOWS]
        return self.loss((w[:, :-1], w[:, 1:]))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (cross-entropy only, comparable across z_loss) and the scream check."""
        was_training = self.model.training
        self.model.eval()
        sc = self.cfg.detect.scream
        w = self.val_windows
        val_loss = lm_loss(self.model(w[:, :-1]), w[:, 1:]).item()  # host sync: once per epoch
        if math.isfinite(val_loss):
            out = self.net.generate(self.prompts, sc.gen_chars)[:, self.prompts.shape[1] :]  # (items, G)
            rows = out.tolist()
            scores = self._scores(rows)
            screamed = scream_check(scores, self.target_scores, sc.dominant, sc.longest_run, sc.loop, sc.seq_rep, sc.n)
            samples = [
                {"prompt": self.tokenizer.decode(p.tolist()), "output": self.tokenizer.decode(r)}
                for p, r in zip(self.prompts, rows)
            ]
        else:  # non-finite weights: argmax over NaN logits would fake a collapse
            scores, screamed, samples = {}, None, []
        self.model.train(was_training)
        return {
            "val_loss": val_loss,
            "collapsed": screamed,
            "scores": scores,
            "target_scores": self.target_scores,
            "samples": samples,
        }
