"""Issue 25's closing table: model x planted module x loop -> where stab says the NaN started, how
it knows, and what `stab replay` finds.

    python scripts/nan_table.py                       # every row (about 10 min on 2 busy CPU cores)
    python scripts/nan_table.py --models gpt2 --loops monitor,lightning

Models: transformers' GPT2LMHeadModel and LlamaForCausalLM and timm's VisionTransformer (tiny,
random init, examples/hf.py), and a user's own small GPT (examples/gpt.py, nn.MultiheadAttention).
In each a NaN is planted in one attention, MLP or norm module's output, by a hook that fires
whenever the batch holds one chosen training example (`planted` below): a bad example, so the
fault is part of the model the factory builds and `stab replay` can reproduce it from the saved
batch. Loops: `stab run` with stab's own injector (`fault.nan_at_step`/`fault.nan_module`, the
whole group poisoned at one step), `stab run` of the planted factory, `Monitor` in a plain loop,
Lightning with `accumulate_grad_batches=2` (`StabCallback`), and the transformers `Trainer` with
`gradient_accumulation_steps=2` (`StabTrainerCallback`; models that return their loss: GPT-2 and
Llama). Every run stops at its first non-finite step (on_nan=stop). Two more `Monitor` loops show
the answer when stab cannot re-run the step: `monitor no batch` (`monitor.step(loss)` without
`batch=`) and `monitor fires once` (the fault fires on its first forward only, so the re-run is
clean): no module is named, and the table gives the planted group's rank among the candidates;
`stab replay` rebuilds the factory's model, whose fault fires again, and locates it.

The table is printed as Markdown; `--out FILE` also writes it there.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stability.outputs import poison  # noqa: E402

FACTORY = "scripts.nan_table.planted"
LIT_FACTORY = "scripts.nan_table.planted_lit"
BAD_ROW = 20  # the planted training example: micro-batch 2 at batch size 8 (optimizer step 1 at accumulation 2)

# model -> (factory, its keyword arguments, {kind: planted submodule})
MODELS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "gpt2": (
        "examples.hf.build",
        {"arch": "gpt2"},
        {"attention": "transformer.h.1.attn", "MLP": "transformer.h.0.mlp", "norm": "transformer.h.0.ln_2"},
    ),
    "llama": (
        "examples.hf.build",
        {"arch": "llama"},
        {
            "attention": "model.layers.0.self_attn",
            "MLP": "model.layers.1.mlp",
            "norm": "model.layers.0.input_layernorm",
        },
    ),
    "timm ViT": (
        "examples.hf.vit",
        {},
        {"attention": "blocks.1.attn", "MLP": "blocks.0.mlp", "norm": "blocks.1.norm1"},
    ),
    "own GPT": (
        "examples.gpt.build",
        {"max_chars": 3000, "context": 16, "width": 16, "norm": "pre"},
        {"attention": "blocks.0.attn", "MLP": "blocks.1.mlp", "norm": "blocks.1.ln1"},
    ),
}
LOOPS = ("stab run fault.*", "stab run", "monitor", "lightning", "trainer", "monitor no batch", "monitor fires once")
HOW = {"monitor no batch": "no batch", "monitor fires once": "not reproduced"}  # else "located"
HF_ONLY = {"trainer"}


# --- the planted fault, part of the factory's model ---------------------------------------------
def _inputs(args: tuple, kwargs: dict) -> torch.Tensor:
    if "input_ids" in kwargs:
        return kwargs["input_ids"]
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


class Plant:
    """NaN in `module`'s output (whatever its form) in every forward whose batch holds `row`."""

    def __init__(self, model: nn.Module, module: str, row: torch.Tensor) -> None:
        self.row, self.armed, self.fired = row, False, 0
        self.once = False  # fire on the first armed forward only (a transient fault: the re-run is clean)
        model.register_forward_pre_hook(self._arm, with_kwargs=True)
        model.get_submodule(module).register_forward_hook(self._poison)

    def _arm(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _inputs(args, kwargs)
        self.armed = x.shape[1:] == self.row.shape and bool((x == self.row).flatten(1).all(1).any())

    def _poison(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if self.armed and not (self.once and self.fired):
            self.fired += 1
            return poison(out)
        return None


def _train_rows(train: Any) -> torch.Tensor:
    return train["input_ids"] if isinstance(train, dict) else train[0]


def planted(net: str = "gpt2", module: str = "transformer.h.1.attn") -> dict:
    """A `model=custom` factory: model `net`'s task (MODELS) with a NaN planted in `module`'s
    output whenever a batch holds training example BAD_ROW."""
    from stability.workloads.custom import locate

    target, params, _ = MODELS[net]
    task = locate(target)(**params)
    task["model"].plant = Plant(task["model"], module, _train_rows(task["train"])[BAD_ROW].clone())
    return task


def _lit_class() -> type:
    import pytorch_lightning as pl

    class Lit(pl.LightningModule):
        """A LightningModule around a task's model and loss (AdamW, lr 1e-3)."""

        def __init__(self, model: nn.Module, loss: Any) -> None:
            super().__init__()
            self.model, self.loss = model, loss

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.model(*args, **kwargs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if isinstance(batch, dict):
                return self.loss(self.model(**batch), batch)
            *inputs, target = batch
            return self.loss(self.model(*inputs), target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Lit


def planted_lit(net: str = "gpt2", module: str = "transformer.h.1.attn") -> dict:
    """`planted`, its model wrapped in a LightningModule (what the Lightning loop trains and what
    `stab replay` rebuilds)."""
    task = planted(net, module)
    task["model"] = _lit_class()(task["model"], task["loss"])
    return task


# --- the loops ------------------------------------------------------------------------------------
def _batches(train: Any, size: int = 8) -> list[Any]:
    n = len(_train_rows(train))
    if isinstance(train, dict):
        return [{k: v[i : i + size] for k, v in train.items()} for i in range(0, n - size + 1, size)]
    return [tuple(t[i : i + size] for t in train) for i in range(0, n - size + 1, size)]


def _stab_run(runs: Path, model: str, module: str, group: str, injector: bool) -> Path:
    from typer.testing import CliRunner

    from cli.main import app

    target, params, _ = MODELS[model]
    if injector:  # stab's own fault: the whole group, at step 2
        args = [f"model._target_={target}", *(f"+model.{k}={v}" for k, v in params.items())]
        args += ["fault.nan_at_step=2", f"fault.nan_module={group}"]
    else:
        args = [f"model._target_={FACTORY}", f"+model.net={model}", f"+model.module={module}"]
    result = CliRunner().invoke(
        app, ["run", "--runs", str(runs), "model=custom", "preset=smoke", "train.batch_size=8", *args]
    )
    if result.exit_code != 0:
        raise RuntimeError(result.output + repr(result.exception))
    return _only_run(runs)


def _monitor(runs: Path, model: str, module: str, batch: bool = True, once: bool = False) -> Path:
    from stability.monitor import Monitor

    task = planted(model, module)
    net = task["model"]
    net.plant.once = once
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with Monitor(
        net, opt, run_dir=runs / "own", loss=task["loss"], factory=FACTORY, config={"net": model, "module": module}
    ) as mon:
        for b in _batches(task["train"]):
            out = net(**b) if isinstance(b, dict) else net(*b[:-1])
            mon.step(task["loss"](out, b if isinstance(b, dict) else b[-1]), batch=b if batch else None)
            if mon.should_stop:
                break
    return runs / "own"


def _lightning(runs: Path, model: str, module: str) -> Path:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from stability.lightning import StabCallback

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # after its import: its start-up notes
        logging.getLogger(name).setLevel(logging.ERROR)
    task = planted_lit(model, module)
    train = task["train"]
    rows = (
        [{k: v[i] for k, v in train.items()} for i in range(len(_train_rows(train)))]
        if isinstance(train, dict)
        else list(zip(*train))
    )
    cb = StabCallback(str(runs), factory=LIT_FACTORY, config={"net": model, "module": module})
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(task["model"], DataLoader(rows, batch_size=8, shuffle=False))
    return _only_run(runs)


def _trainer(runs: Path, model: str, module: str) -> Path:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from stability.hf import StabTrainerCallback

    task = planted(model, module)
    train = task["train"]
    rows = [{k: v[i] for k, v in train.items()} for i in range(len(_train_rows(train)))]
    args = TrainingArguments(
        output_dir=str(runs / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    with StabTrainerCallback(str(runs), factory=FACTORY, config={"net": model, "module": module}) as cb:
        trainer = Trainer(model=task["model"], args=args, train_dataset=rows, callbacks=[cb])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return _only_run(runs)


def _only_run(runs: Path) -> Path:
    found = [p.parent for p in runs.rglob("summary.json")]
    if len(found) != 1:
        raise RuntimeError(f"expected one run folder under {runs}, found {found}")
    return found[0]


# --- one row ----------------------------------------------------------------------------------------
def expected_group(model: str, module: str, lit: bool = False) -> str:
    """The module group stab should name: the group holding the planted module."""
    from stability.config import CustomModelConfig, NoDataConfig, RunConfig
    from stability.replay import _group_of
    from stability.workloads.custom import CustomWorkload

    target, params, _ = MODELS[model]
    cfg = RunConfig(model=CustomModelConfig(target=target, params=params), data=NoDataConfig())
    work = CustomWorkload(cfg, torch.device("cpu"))
    group = _group_of(work.model, work.module_groups())[module]
    return f"model.{group}" if lit else group


def row(loop: str, model: str, kind: str, tmp: Path) -> dict[str, Any]:
    from stability.replay import replay
    from stability.storage import read_jsonl

    module = MODELS[model][2][kind]
    group = expected_group(model, module)
    want = f"model.{group}" if loop == "lightning" else group
    runs = tmp / f"{loop}-{model}-{kind}".replace(" ", "_").replace("*", "")
    t0 = time.perf_counter()
    if loop.startswith("stab run"):
        run_dir = _stab_run(runs, model, module, group, injector=loop == "stab run fault.*")
    else:
        run_dir = {
            "monitor": _monitor,
            "lightning": _lightning,
            "trainer": _trainer,
            "monitor no batch": lambda *a: _monitor(*a, batch=False),
            "monitor fires once": lambda *a: _monitor(*a, once=True),
        }[loop](runs, model, module)
    ev = next((e for e in read_jsonl(run_dir / "events.jsonl")[0] if e["event"] == "first_nan"), None)
    out: dict[str, Any] = {"loop": loop, "model": model, "planted": f"{kind}: {module}", "expected": want}
    if ev is None:
        return {**out, "located": "(no first_nan event)", "how": "", "ok": False, "replay": "", "s": 0.0}
    how = ev.get("how", "")
    cands = [c["group"] for c in ev.get("candidates") or []]
    if ev.get("module"):
        located = ev["module"]
    else:
        rank = f"{cands.index(want) + 1} of {len(cands)}" if want in cands else f"not among {len(cands)}"
        located = f"none; candidates: {', '.join(cands[:3])}{', ...' if len(cands) > 3 else ''} (planted group: {rank})"
    expect_how = HOW.get(loop, "located")
    ok = how == expect_how and (
        ev.get("module") == want if expect_how == "located" else not ev.get("module") and want in cands
    )
    try:
        r = replay(run_dir)
        rep = f"{r.group or '-'} ({r.where}); {r.cause.split(':')[0]}"
        rep_ok = r.group == want
    except Exception as e:  # a row that cannot replay says why, the table goes on
        rep, rep_ok = f"{type(e).__name__}: {e}"[:80], False
    return {
        **out,
        "step": ev.get("step"),
        "located": located,
        "how": how,
        "ok": ok,
        "replay": rep,
        "replay_ok": rep_ok,
        "s": time.perf_counter() - t0,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| loop | model | planted in | stab says (step) | how | right? | stab replay | replay right? |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['loop']} | {r['model']} | {r['planted']} | {r['located']} ({r.get('step')}) | {r['how']} | "
            f"{'yes' if r['ok'] else 'NO (expected ' + r['expected'] + ')'} | {r['replay']} | "
            f"{'yes' if r.get('replay_ok') else 'no'} |"
        )
    right = sum(r["ok"] for r in rows)
    replayed = sum(bool(r.get("replay_ok")) for r in rows)
    lines.append("")
    lines.append(
        f"{right} of {len(rows)} rows as expected (located in the planted module's group, or with a NaN that "
        f"fired once or no batch: no module named and the planted group among the candidates); "
        f"{replayed} of {len(rows)} replayed in the planted group."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of: {', '.join(LOOPS)}")
    ap.add_argument("--kinds", default="attention,MLP,norm", help="comma-separated, of: attention, MLP, norm")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    models, loops, kinds = (s.split(",") for s in (a.models, a.loops, a.kinds))
    for bad, allowed, what in (
        (models, MODELS, "--models"),
        (loops, LOOPS, "--loops"),
        (kinds, ("attention", "MLP", "norm"), "--kinds"),
    ):
        unknown = [x for x in bad if x not in allowed]
        if unknown:
            ap.error(f"{what} {','.join(unknown)} is not allowed: expected some of {', '.join(allowed)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stab-nan-table-") as tmp:
        for loop in loops:
            for model in models:
                if loop in HF_ONLY and model not in ("gpt2", "llama"):
                    continue
                for kind in kinds:
                    r = row(loop, model, kind, Path(tmp))
                    print(
                        f"{loop} | {model} | {kind}: {r['located']} ({r['how']}), replay {r['replay']} [{r['s']:.0f} s]",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(r)
    table = markdown(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
