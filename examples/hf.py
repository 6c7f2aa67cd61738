"""Tiny Hugging Face transformers models (random weights, no download) and a timm ViT as stab workloads.

    stab run model=custom model._target_=examples.hf.build preset=smoke
    stab run model=custom model._target_=examples.hf.build +model.arch=llama preset=smoke \\
        fault.nan_at_step=2 fault.nan_module=model.layers.0.attn
    stab run model=custom model._target_=examples.hf.vit preset=smoke

`build` returns a GPT-2 (`arch=gpt2`) or Llama (`arch=llama`, grouped-query attention) language
model on random tokens: batches are dicts of the model's keyword inputs (`input_ids`, `labels`),
and the loss is the one the model computes (`stability.hf.hf_loss`). Both use PyTorch's
scaled_dot_product_attention, so stab's attention health captures q and k there. `vit` is a timm
VisionTransformer classifying random images. Needs `pip install -e '.[transformers]'`.
"""

from __future__ import annotations

import torch


def _tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def build(
    arch: str = "gpt2",
    n_layer: int = 2,
    n_embd: int = 16,
    n_head: int = 2,
    vocab: int = 32,
    length: int = 8,
    n_train: int = 48,
    n_val: int = 8,
    seed: int = 0,
) -> dict:
    """A randomly initialised `GPT2LMHeadModel` or `LlamaForCausalLM` and random token data."""
    import transformers

    from stability.hf import hf_loss

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=length,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
            bos_token_id=None,  # GPT-2's 50256 is outside a tiny vocabulary (transformers warns)
            eos_token_id=None,
        )  # no dropout: a re-run is the same step
        model = transformers.GPT2LMHeadModel(config)
        # transformers names a loss by the class name, and GPT2LMHeadModel's matches none: its loss is the
        # causal-LM one anyway, but unnamed it warns, and the Trainer counts num_items_in_batch before the
        # label shift. Named, both agree with the model.
        model.loss_type = "ForCausalLM"
    elif arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=n_embd,
            intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=max(1, n_head // 2),
            max_position_embeddings=length,
            attn_implementation="sdpa",
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch={arch!r}: expected gpt2 or llama")
    x = _tokens(n_train + n_val, length, vocab, seed + 1)
    return {
        "model": model,
        "train": {"input_ids": x[n_val:], "labels": x[n_val:]},
        "val": {"input_ids": x[:n_val], "labels": x[:n_val]},
        "loss": hf_loss,
        "tokens": None,
        "info": {"arch": arch},
    }


def vit(
    depth: int = 2,
    width: int = 16,
    heads: int = 2,
    image: int = 8,
    patch: int = 4,
    classes: int = 4,
    n_train: int = 32,
    n_val: int = 8,
    seed: int = 0,
) -> dict:
    """A randomly initialised timm `VisionTransformer` on random images and labels."""
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=image,
        patch_size=patch,
        in_chans=3,
        num_classes=classes,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=2.0,
    )
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n_train + n_val, 3, image, image, generator=g)
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    return {"model": model, "train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val]), "loss": F.cross_entropy}
