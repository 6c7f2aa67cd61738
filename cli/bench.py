"""`stab bench [--sweep] [OVERRIDES...]`: measured cost of stab's instrumentation, and sweep throughput.

    stab bench                      # default preset, then the seed model at 2 s clips
    stab bench preset=smoke         # one configuration
    stab bench --sweep              # 4 smoke jobs: sequential vs joblib --jobs 2; first job vs cache hit
    stab bench log=tensorboard      # adds a third loop feeding the trackers: `log ratio` is their cost
    stab bench --monitor            # a plain loop against the same loop with stab's Monitor.step, and
                                    # Lightning / the transformers Trainer without and with stab's callback
    stab bench model=charlm preset=gpu   # on CUDA, also stab's step at train.sync_every=8 against 1
    stab bench --bookkeeping        # the run-folder writer alone: us/step and memory at 1k and 100k steps

Every figure is a ratio measured side by side in this process (or this command), so it holds
on a noisy machine. Copy the printed lines into the README's performance section.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import console, styled, user_errors
from cli.config import UserError, compose_run

if TYPE_CHECKING:
    from stability.bench import BenchResult
    from stability.config import RunConfig

# The seed's model (256/384/384 x 6 layers) at a clip length a CPU can step through.
SEED_SHORT = ["preset=seed", "data.seconds=2.0", "data.n_train=16", "data.n_val=4"]


def bench(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides; none: default preset and the seed model at 2 s clips.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per loop.")] = 60,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Time 4 smoke jobs sequentially and with joblib --jobs 2 instead.")
    ] = False,
    monitor: Annotated[
        bool,
        typer.Option(
            "--monitor",
            help="Time a plain loop against the same loop with stab's Monitor.step (your own loop), and "
            "Lightning and the transformers Trainer without and with stab's callback (where installed).",
        ),
    ] = False,
    bookkeeping: Annotated[
        bool,
        typer.Option(
            "--bookkeeping",
            help="Time the run folder's writer alone on 1,000 and 100,000 synthetic steps of the seed model's module groups instead.",
        ),
    ] = False,
) -> None:
    """Time stab's instrumented step against a bare PyTorch step, interleaved in one process."""
    if sweep:
        _bench_sweep()
        return
    if monitor:
        _bench_monitor(list(overrides or []), steps)
        return
    if bookkeeping:
        _bench_bookkeeping(overrides or ["preset=seed"])
        return
    configs = (
        [("given overrides", list(overrides))]
        if overrides
        else [("default preset", []), ("seed model, 2 s clips", SEED_SHORT)]
    )
    with user_errors():
        if steps < 5:
            raise UserError(f"--steps {steps} is not allowed: expected at least 5")
        cfgs = [(label, compose_run(o), o) for label, o in configs]
    from stability.bench import bench as run_bench

    for label, cfg, o in cfgs:
        _print_bench(label, o, cfg, run_bench(cfg, steps=steps))


def _print_bench(label: str, overrides: list[str], cfg: RunConfig, r: BenchResult) -> None:
    """One configuration's timings: steps/s of the bare and the instrumented loop and their ratio
    (wall and CPU time), the sync, optimizer-state, snapshot and tracker costs where measured,
    the model's FLOPs against the machine's and the per-epoch extras."""
    console.print(
        styled(
            (label, "bold"),
            f" ({' '.join(overrides) or 'no overrides'}) on {r.device}, {r.threads} thread(s), {r.steps} steps each",
        )
    )
    console.print(f"  bare loop:  {r.bare_sps:8.2f} steps/s   model FLOP/s / machine matmul FLOP/s = {r.bare_util:.3f}")
    console.print(f"  stab loop:  {r.stab_sps:8.2f} steps/s   model FLOP/s / machine matmul FLOP/s = {r.stab_util:.3f}")
    console.print(f"  ratio: {r.ratio:.2f}   by CPU time of this process: {r.cpu_ratio:.2f}")
    if r.sync_sps is not None:  # CUDA: measurements moved to the host every step vs every SYNC_K steps
        from stability.bench import SYNC_K

        console.print(
            f"  stab, train.sync_every={SYNC_K}: {r.sync_sps:8.2f} steps/s   "
            f"ratio sync_every={SYNC_K} / sync_every=1: {r.sync_ratio:.2f}"
        )
    if r.plain_sps is not None:  # detect.opt_state: the signals' own cost
        console.print(
            f"  stab without optimizer-state signals: {r.plain_sps:8.2f} steps/s   "
            f"signals ratio (with / without): {r.signals_ratio:.2f}   by CPU time: {r.signals_cpu_ratio:.2f}"
        )
    console.print(
        f"  snapshot (model, optimizer, schedule, RNG): {r.snapshot_ms:.0f} ms, {r.snapshot_bytes / 2**20:.1f} MiB; "
        "share of training time at train.snapshot_every="
        + " / ".join(f"{n}: {r.snapshot_share(n):.2%}" for n in (10, 100, 1000))
    )
    if r.log_sps is not None:  # log=...: stab's step feeding the trackers, against stab's step alone
        console.print(f"  stab + log={','.join(cfg.log)}: {r.log_sps:8.2f} steps/s   log ratio: {r.log_ratio:.2f}")
    console.print(
        f"  model: {r.flops_per_step / 1e9:.3f} GFLOP per step; machine: {r.machine_flops / 1e9:.1f} GFLOP/s (fp32 matmul)"
    )
    console.print(
        f"  per-epoch extras (validation, scream check, health): {r.epoch_extras_s * 1000:.0f} ms "
        f"= {r.epoch_extras_s / (r.epoch_extras_s + r.epoch_steps_s):.1%} of an epoch"
    )


def _bench_monitor(overrides: list[str], steps: int) -> None:
    """`stab bench --monitor`: a plain PyTorch loop against the same loop with `Monitor.step` in
    place of backward/clip/step (stability.monitor_bench.bench); the model is the configured one."""
    with user_errors():
        if steps < 5:
            raise UserError(f"--steps {steps} is not allowed: expected at least 5")
        cfg = compose_run(overrides)
    from stability.monitor_bench import bench as bench_monitor

    r = bench_monitor(cfg, steps=steps)
    console.print(
        styled(
            ("monitor in a plain loop", "bold"),
            f" ({' '.join(overrides) or 'default preset'}) on "
            f"{r['device']}, {r['threads']} thread(s), {r['steps']} steps each, {r['groups']} module groups",
        )
    )
    console.print(f"  plain loop:            {r['bare_sps']:8.2f} steps/s")
    console.print(f"  with Monitor.step:     {r['monitor_sps']:8.2f} steps/s")
    console.print(f"  monitor ratio: {r['ratio']:.2f} (steps/s with the monitor over without)")
    for name, module, needs in (
        ("Lightning", "stability.lightning", ("pytorch_lightning",)),
        ("transformers Trainer", "stability.hf", ("transformers", "accelerate")),
    ):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            console.print(styled((f"{name} callback", "bold"), f": not measured ({', '.join(missing)} not installed)"))
            continue
        r = importlib.import_module(module).bench(cfg, steps=steps)
        console.print(
            styled(
                (f"{name} callback", "bold"),
                f" on {r['device']}, {r['threads']} thread(s), {r['steps']} timed steps each ({r['fits']} fits per arm)",
            )
        )
        console.print(f"  {name + ' alone:':<30}{r['bare_sps']:8.2f} steps/s")
        console.print(f"  {'with the callback:':<30}{r['callback_sps']:8.2f} steps/s")
        console.print(f"  {name} callback ratio: {r['ratio']:.2f} (steps/s with the callback over without)")


def _bench_bookkeeping(overrides: list[str], sizes: tuple[int, ...] = (1_000, 100_000)) -> None:
    with user_errors():
        cfg = compose_run(overrides)
    from stability.bench import bookkeeping as run_bookkeeping

    results: list[Any] = []
    for n in sizes:
        r = run_bookkeeping(cfg, n)
        if not results:
            console.print(
                styled(
                    ("bookkeeping", "bold"),
                    f" ({' '.join(overrides)}): {r.groups} module groups, "
                    f"{r.epoch_steps} steps per epoch, the real writer into a temporary folder, no model",
                )
            )
        console.print(
            f"  {n:>7,} steps: {r.us_per_step:7.1f} us/step   resident memory growth {r.rss_growth_mb:6.1f} MB   "
            f"written {r.bytes_written / 2**20:.1f} MB"
        )
        results.append(r)
    console.print(f"bookkeeping ratio: {results[-1].us_per_step / results[0].us_per_step:.2f}")


def _timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"stab {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - t0


def _bench_sweep(repeats: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "STAB_CACHE": str(Path(tmp) / "cache")}
        runs = str(Path(tmp) / "runs")
        first = _timed(["run", "--runs", runs, "preset=smoke"], env)  # encodes the latents
        hit = _timed(["run", "--runs", runs, "preset=smoke"], env)  # reads them from the cache
        console.print(
            styled(
                ("sweeps of 4 smoke jobs", "bold"),
                f" on {os.cpu_count()} cores, sequential and parallel "
                f"interleaved {repeats} times; the ratio compares the fastest of each",
            )
        )
        # A smoke job trains for about half a second, far less than a process takes to import
        # torch: the parallel sweep gains only what its workers' head start wins. Longer jobs
        # show what splitting the threads between concurrent jobs does.
        for label, epochs in (("smoke (4 epochs)", 4), ("smoke, train.epochs=40", 40)):
            grid = ["preset=smoke", "seed=0,1,2,3", f"train.epochs={epochs}"]
            seq, par = [], []
            for i in range(repeats):  # a fresh sweep folder each time: nothing is skipped
                seq.append(_timed(["sweep", "--runs", runs, "--name", f"seq{epochs}-{i}", *grid], env))
                par.append(
                    _timed(
                        [
                            "sweep",
                            "--runs",
                            runs,
                            "--name",
                            f"par{epochs}-{i}",
                            "--launcher",
                            "joblib",
                            "--jobs",
                            "2",
                            *grid,
                        ],
                        env,
                    )
                )
            console.print(
                f"  {label}: sequential (basic) {_seconds(seq)}, parallel (joblib, 2 jobs) {_seconds(par)}; "
                f"ratio parallel / sequential wall time: {min(par) / min(seq):.2f}"
            )
    console.print(
        f"  first job (encodes latents): {first:.1f} s; next job (cache hit): {hit:.1f} s; ratio {hit / first:.2f}"
    )


def _seconds(times: list[float]) -> str:
    return " / ".join(f"{t:.1f}" for t in times) + " s"
