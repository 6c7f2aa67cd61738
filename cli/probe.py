"""`stab probe init [OVERRIDES...]`: per-layer FFN gradient norms at initialisation, pre vs post.

stab probe init --depths 2,6,12 preset=smoke
stab probe init model=charlm --paper        # Xavier init, unit-scale embeddings, as in the paper
stab probe init model=charlm --paper --seeds 0,1,2,3,4    # the last/first ratio: median and interval over seeds
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.common import check_writable, console, fmt, user_errors, write_errors
from cli.config import UserError, compose_run
from stability.storage import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

    from stability.config import RunConfig

app = typer.Typer(help="Probes of a model's state, e.g. gradients at initialisation.", no_args_is_help=True)


@app.command("init")
def init(
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides for the model and data.")] = None,
    depths: Annotated[str, typer.Option("--depths", help="Comma list of layer counts per stage.")] = "2,6,12",
    batches: Annotated[int, typer.Option("--batches", help="K: batches the gradient is averaged over.")] = 4,
    out: Annotated[Path, typer.Option("--out", help="Folder for probe_init.csv and probe_init.png.")] = Path(
        "runs/probe"
    ),
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Xiong et al.'s setting: Xavier init (model.init_std=0) and, "
            "for the char LM, unit-scale embeddings (model.embed_scale=true).",
        ),
    ] = False,
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds",
            help="Comma list of seeds (model init and batches): the ratio is "
            "given as the median over them with its order-statistic interval.",
        ),
    ] = "0",
) -> None:
    """Frobenius norm of the mean gradient of each layer's MLP output weight at init (Xiong et al. 2020)."""
    overrides = list(overrides or [])
    if paper:
        charlm = any(o.replace(" ", "") == "model=charlm" for o in overrides)
        overrides = ["model.init_std=0", *(["model.embed_scale=true"] if charlm else []), *overrides]
    with user_errors():
        depth_list, seed_list, cfgs = _check(overrides, depths, batches, seeds, out)
    import pandas as pd

    from stability.probe import compare

    rows = [{"seed": x, **r} for x, c in zip(seed_list, cfgs) for r in compare(c, depth_list, ["pre", "post"], batches)]
    df = pd.DataFrame(rows)
    with write_errors():  # a full disk: one line naming the file, exit 1
        atomic_write_text(out / "probe_init.csv", df.to_csv(index=False))
    console.print(_table(df, batches, len(seed_list)))
    with write_errors():
        _plot(df, out / "probe_init.png")
    console.print(f"wrote {out / 'probe_init.csv'} and {out / 'probe_init.png'}")


def _check(
    overrides: list[str], depths: str, batches: int, seeds: str, out: Path
) -> tuple[list[int], list[int], list[RunConfig]]:
    """The depths, the seeds (duplicates dropped) and one config per seed, each checked before the
    probe's work: a one-line UserError naming a bad --depths, --batches, --seeds, a seed=
    override, an --out that cannot be written or a custom model."""
    try:
        depth_list = [int(d) for d in depths.split(",")]
    except ValueError:
        raise UserError(f"--depths {depths!r} is not allowed: expected a comma list of integers, e.g. 2,6,12") from None
    if any(d < 1 or d > 96 for d in depth_list):
        raise UserError(f"--depths {depths!r} is not allowed: each depth must be 1..96")
    if batches < 1:
        raise UserError(f"--batches {batches} is not allowed: expected an integer >= 1")
    try:
        seed_list = list(dict.fromkeys(int(x) for x in seeds.split(",")))
    except ValueError:
        raise UserError(f"--seeds {seeds!r} is not allowed: expected a comma list of integers, e.g. 0,1,2") from None
    if any(o.lstrip("+~").startswith("seed=") for o in overrides):
        raise UserError("seed=... is not allowed here: pass the seeds with --seeds (e.g. --seeds 0,1,2)")
    cfgs = [compose_run([*overrides, f"seed={x}"]) for x in seed_list]
    check_writable(out, "--out")  # before the probe's work, not after it
    if cfgs[0].model.name == "custom":  # it sets stab's n_layers and norm and reads stab's block.mlp.proj
        raise UserError(
            "stab probe init is for stab's own models (model=cascade or model=charlm): it sets their "
            "depth and norm placement; a custom model's are its factory's"
        )
    return depth_list, seed_list, cfgs


def _table(df: pd.DataFrame, batches: int, n: int) -> Table:
    """The last stage's per-layer norms (median over the `n` seeds) and the last/first ratio per
    depth and norm placement; with several seeds, the ratio's interval and each seed's ratio."""
    from stability.probe import growth
    from stability.report.factors import median_interval

    last_stage = df["stage"].iloc[-1]
    t = Table(
        title=f"||mean grad of MLP output weight||_F at init, {last_stage or 'the model'}, K={batches} batches, "
        f"{n} seed(s)" + (" (per layer: median over seeds)" if n > 1 else "")
    )
    t.add_column("depth")
    t.add_column("norm")
    t.add_column("per layer, first -> last")
    t.add_column("last / first" + (" (median)" if n > 1 else ""))
    if n > 1:
        t.add_column("interval (coverage)")
        t.add_column("per seed")
    shown = df[df["stage"] == last_stage]
    for (depth, norm), part in shown.groupby(["depth", "norm"], sort=False):
        per_layer = part.groupby("layer", sort=True)["grad_fro"].median()
        ratios = [growth(p.sort_values("layer").to_dict("records")) for _, p in part.groupby("seed", sort=False)]
        med, lo, hi, cov = median_interval(ratios)
        cells = [str(depth), norm, " ".join(fmt(v, 2) for v in per_layer), fmt(med, 3)]
        if n > 1:
            cells += [f"{fmt(lo, 3)}..{fmt(hi, 3)} ({cov:.0%})", " ".join(fmt(r, 3) for r in ratios)]
        t.add_row(*cells)
    return t


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(df["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.8), squeeze=False, sharey=True)
    styles = {"pre": ("-", "o"), "post": ("--", "s")}  # line style tells the norm placement ...
    colors = {d: f"C{i}" for i, d in enumerate(dict.fromkeys(df["depth"]))}  # ... colour the depth
    for ax, stage in zip(axes[0], stages):
        for (depth, norm), part in df[df["stage"] == stage].groupby(["depth", "norm"], sort=False):
            part = part.groupby("layer", as_index=False)["grad_fro"].median()  # over seeds
            ls, marker = styles[norm]
            ax.plot(
                part["layer"] + 1,
                part["grad_fro"],
                ls,
                marker=marker,
                ms=3,
                color=colors[depth],
                label=f"{norm}-norm, {depth} layers",
            )
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(stage or "model")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("||grad W_ffn_out||_F at init")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Gradient of each layer's FFN output weight at initialisation (Xiong et al. 2020, Fig. 3)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # StorageError naming the file
