"""Names of run-config keys the rest of stab reads: the short names (ablation axes, `norm=pre`),
the operational keys (not part of a run's identity) and `flatten` (nested -> dotted keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

N_STAGES = 3  # stages of the cascade transformer (SPEC §2); the `residual` short name is the last one's

# Keys that change where or how fast a run happens, or where it is reported, never what it computes.
OPERATIONAL_KEYS = (
    "train.device",
    "train.threads",
    "train.sync_every",
    "train.snapshot_every",
    "train.snapshot_keep",
    "detect.opt_state",
    "data.cache_dir",
    "log",
    "margin",
)


@dataclass(frozen=True)
class ShortName:
    """A top-level short name of conf/config.yaml (`norm=pre`), an ablation axis.

    path: where the model or train group reads it in a resolved config (`model.norm`);
    the cascade's `model.residual` is a list per stage, of which the short name is the last.
    """

    name: str
    path: str
    help: str

    def read(self, cfg: Any) -> Any:
        """This short name's value in a run's config (a `RunConfig`; this file sits below the
        schema, which reads its tables); None where the model does not read it."""
        node: Any = cfg
        for part in self.path.split("."):
            node = getattr(node, part, None)
        if self.name == "residual" and isinstance(node, list):  # the cascade's per stage: the last
            return node[-1] if node else None
        if self.name in ("clip", "update_clip") and node is None:
            return "none"
        return node


# The one table of short names: config composition (cli/config.py drops them after
# interpolation and refuses one the model does not read), the report's factors (a short name
# and its path are one factor), the trackers' params and the keys of `explain`'s messages all
# read it. Defaults are in conf/config.yaml.
SHORT_NAMES: dict[str, ShortName] = {
    s.name: s
    for s in (
        ShortName("residual", "model.residual", "last stage's residual weight (cascade)"),
        ShortName("norm", "model.norm", "norm placement: pre | post | deepnorm"),
        ShortName("clip", "train.clip", "gradient clipping on the total norm: none | a positive number"),
        ShortName("spectral_norm", "model.spectral_norm", "spectral norm on the output projection(s)"),
        ShortName("qk_norm", "model.qk_norm", "norm on queries and keys per head (arXiv 2309.14322)"),
        ShortName("sigma_reparam", "model.sigma_reparam", "sigma-reparametrised weights (arXiv 2303.06296)"),
        ShortName("v_scale", "model.v_scale", "value scaling by a learned saturating gain (arXiv 2603.17771)"),
        ShortName("z_loss", "model.z_loss", "z-loss coefficient on the output softmax (char LM)"),
        ShortName("warmup", "train.warmup", "steps of linear learning-rate warmup"),
        ShortName("on_spike", "train.on_spike", "what a loss or grad-norm spike does: none | skip | backoff"),
        ShortName("update_clip", "train.update_clip", "StableAdamW update clipping: none | a positive number"),
    )
}


def flatten(d: dict[str, Any], prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested dicts -> one level of dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}. An empty
    dict is dropped, or kept as a value with `keep_empty` (so `model.params: {}` still shows)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (v or not keep_empty):
            out.update(flatten(v, key + ".", keep_empty))
        else:
            out[key] = v
    return out
