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
`stab run`/`stab sweep` reach through `preflight.check`): each problem is one `ConfigError` line naming
`model._target_` and what is wrong.

Beside this file, one job each: `factory.py` (find and call the factory, check what it returns),
`examples.py` (its data as batches), `groups.py` (module groups from the module tree),
`attention.py` (attention logits for the health probe), `workload.py` (`CustomWorkload`) and
`preflight.py` (the check before any work starts).
"""

from stability.workloads.custom.attention import MultiheadAttentionLogits, attention_probe
from stability.workloads.custom.examples import Examples, split
from stability.workloads.custom.factory import Task, as_task, factory_parameters, locate, make_task
from stability.workloads.custom.groups import auto_groups, explicit_groups, find_layers, tied
from stability.workloads.custom.preflight import check
from stability.workloads.custom.workload import CustomWorkload

__all__ = [
    "CustomWorkload",
    "Examples",
    "MultiheadAttentionLogits",
    "Task",
    "as_task",
    "attention_probe",
    "auto_groups",
    "check",
    "explicit_groups",
    "factory_parameters",
    "find_layers",
    "locate",
    "make_task",
    "split",
    "tied",
]
