"""Your own training loop, watched by stab: a plain PyTorch loop with `Monitor.step(loss)` in place
of `loss.backward(); optimizer.step()`. It writes a run folder that `stab show`, `stab report` and
`stab replay` read, and prints the verdict as the run goes.

    python examples/own_loop.py --runs runs            # then: stab report runs   stab show runs/own/*
    python examples/own_loop.py --runs runs --lr 0.3   # a learning rate that makes it blow up
"""

from __future__ import annotations

import argparse

import torch
from gpt import build  # examples/gpt.py, beside this file: a small GPT and its data

from stability.monitor import Monitor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="folder the run folder is created in")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    torch.manual_seed(0)
    config = {"max_chars": 6000, "context": 16, "width": 16, "norm": "post"}  # build's arguments
    task = build(**config)
    model, loss_fn, (x, y) = task["model"], task["loss"], task["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    with Monitor(
        model,
        opt,
        args.runs,
        name="own_loop",
        loss=loss_fn,
        val=task["val"],
        clip=5.0,
        config=config,
        factory="examples.gpt.build",
        epochs=args.epochs,
        batch_size=16,
    ) as monitor:
        for epoch in range(1, args.epochs + 1):
            for idx in torch.randperm(len(x)).split(16):
                loss = loss_fn(model(x[idx]), y[idx])
                monitor.step(loss, batch=(x[idx], y[idx]), indices=idx)  # backward, measure, clip, step
                if monitor.should_stop:  # a non-finite step (on_nan="stop")
                    break
            record = monitor.end_epoch()  # validation loss, scream check, attention health
            print(
                f"epoch {epoch}: loss {record['loss']:.3f}  val {record['val_loss']:.3f}  "
                f"grad norm {record['grad_norm_mean']:.3g}  verdict so far: {monitor.verdict}"
            )
            if monitor.should_stop:
                break
    s = monitor.summary
    print(f"verdict: {s['verdict']}  {s['evidence']}\nrun folder: {monitor.dir}")


if __name__ == "__main__":
    main()
