"""`stab data inspect [OVERRIDES...]`: what a run would train on, without training.

    stab data inspect                                          # the embedded synthetic pairs
    stab data inspect data=folder data.path=my_pairs preset=seed
    stab data inspect data=folder data.path=my_pairs data.codec.weights=pretrained

Prints the source (pairs, segments, sample rates), the latent RMS of input and target before
and after centering and rescaling, and how many of the 1024 codes of each calibrated RVQ
codebook the latents use (and the entropy of their histogram). Encodes into the latent cache
on first use, like a run would.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, fmt, styled, user_errors, warn
from cli.config import UserError, compose_run
from stability.config import DataConfig

app = typer.Typer(no_args_is_help=True, help="Look at the data a run trains on.")


@app.command("inspect")
def inspect(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. data=folder data.path=DIR")
    ] = None,
) -> None:
    """Dataset size, segments, latent RMS (raw and rescaled) and RVQ code usage."""
    from cli.progress import reporter
    from stability.progress import reporting
    from stability.workloads.cascade.data import fit_split, inspect_latents

    with user_errors():
        cfg = compose_run(list(overrides or []))
        if not isinstance(cfg.data, DataConfig):
            raise UserError(
                f"data={cfg.data.name}: `stab data inspect` looks at audio data (data=synthetic or data=folder)"
            )
        with reporting(reporter(console)):  # decoding and checking every file of a folder
            data_cfg, short = fit_split(cfg.data)  # an inspect inspects: a split too big for the folder is a warning
        if short:
            warn(short)
        with reporting(reporter(console)):
            info = inspect_latents(data_cfg)
    _print(info)


def _print(info: dict[str, Any]) -> None:
    src, segs, codec, cache = info["source"], info["segments"], info["codec"], info["cache"]
    if src["kind"] == "folder":
        console.print(
            styled(
                ("folder", "bold"),
                f" {src['path']}: {src['pairs']} pairs, "
                f"{src['audio_seconds']:.1f} s of audio each side (rates {', '.join(map(str, src['source_rates']))} Hz, "
                f"{'/'.join(map(str, src['source_channels']))} channel(s), as 24 kHz mono)",
            ),
            highlight=False,
        )
        if src["skipped"]:
            console.print(
                styled(
                    (f"skipped {len(src['skipped'])} bad file(s)", "yellow"),
                    ": " + "; ".join(f"{s['file']} {s['reason']}" for s in src["skipped"]),
                ),
                highlight=False,
            )
        if src["ignored"]:
            console.print(
                f"ignored {len(src['ignored'])} non-audio file(s): {', '.join(src['ignored'][:5])}"
                f"{' ...' if len(src['ignored']) > 5 else ''}",
                highlight=False,
            )
    else:
        console.print(styled(("synthetic", "bold"), f" pairs, seed {src['seed']}"))
    console.print(
        f"segments: {segs['train']} train + {segs['val']} validation of {src['segment_seconds']:g} s "
        f"({info['frames']} latent frames each)",
        highlight=False,
    )
    console.print(
        f"codec: EnCodec 24 kHz, weights {codec['weights']}, sha256 "
        f"{(codec.get('checksum') or '?')[:16]}... (of the {codec.get('checksum_of', '?')})",
        highlight=False,
    )
    how = "hit" if cache["hit"] else f"encoded now: {info['encode_s']:.1f} s for {info['audio_seconds']:g} s of audio"
    console.print(f"cache: {cache['key']} ({how})  {cache['path']}", highlight=False)

    t = Table(title="latent RMS (training segments)")
    for col in ("", "input", "target"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("raw (EnCodec's own space)", fmt(info["rms"]["raw"]["input"]), fmt(info["rms"]["raw"]["target"]))
    how = (
        (f"centered, x{fmt(info['scale'])}" if info["centered"] else f"x{fmt(info['scale'])}")
        if info["latent_rms"] != "off"
        else ("centered" if info["centered"] else "as is")
    )
    t.add_row(f"what the model sees ({how})", fmt(info["rms"]["model"]["input"]), fmt(info["rms"]["model"]["target"]))
    console.print(t)

    t = Table(title="RVQ code usage (all segments)")
    for col in ("codebook", "input: used", "input: entropy", "target: used", "target: entropy"):
        t.add_column(col, justify="right")
    for a, b in zip(info["codes"]["input"], info["codes"]["target"]):
        t.add_row(
            str(a["codebook"]),
            f"{a['used']} / {a['size']}",
            f"{a['entropy_bits']:.2f} / {a['max_bits']:.0f} bits",
            f"{b['used']} / {b['size']}",
            f"{b['entropy_bits']:.2f} / {b['max_bits']:.0f} bits",
        )
    console.print(t)
