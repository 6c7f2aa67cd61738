"""`stab run [--runs DIR] [--nproc N] [OVERRIDES...]`: train one configuration and print its verdict.

    stab run                                   # default preset, about a minute on 2 CPU cores
    stab run preset=smoke norm=pre residual=0.3 clip=5
    stab run --nproc 2 preset=smoke            # one data-parallel run in 2 processes (torch.distributed.run)
    torchrun --nproc-per-node 2 -m cli.main run preset=smoke   # the same, started by torchrun

Started by torchrun or srun (RANK/WORLD_SIZE or SLURM's task variables in the environment), each
process joins the run's process group itself (`stability.distributed`); rank 0 makes the run
folder, tells the others its path and prints; the others stay silent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import (
    DEBUG,
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_USER,
    check_writable,
    console,
    doubt_lines,
    err_console,
    fmt,
    graceful_signals,
    styled,
    user_errors,
    verdict_text,
    write_errors,
)
from cli.config import UserError, compose_run, config_dirs, shell_command
from stability.errors import DataError, StorageError, storage_error
from stability.preflight import preflight
from stability.record.folder import RunFolder
from stability.rundirs import create_unique, folder_name

if TYPE_CHECKING:
    from stability.config import RunConfig
    from stability.distributed import World


def run(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. norm=pre residual=0.3 clip=5")
    ] = None,
    runs: Annotated[Path, typer.Option("--runs", help="Folder the run folder is created in.")] = Path("runs"),
    config_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--config-dir",
            help="A folder of your own config groups (e.g. model/my_transformer.yaml), searched after stab's conf/; repeatable.",
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="Processes of one data-parallel run on this machine "
            "(torch.distributed.run; gloo on CPU, NCCL with one GPU each); "
            "train.batch_size is the global batch.",
        ),
    ] = None,
) -> None:
    """Train one configuration and write its run folder."""
    overrides = list(overrides or [])
    with user_errors():
        cfg, world = _check(overrides, runs, config_dir, nproc)
    if nproc is not None and nproc > 1:  # this process only launches; its children run the code below
        _launch(nproc, runs, overrides, config_dir or [])
        return
    if world.distributed:
        _distributed(cfg, runs, overrides, world)
        return
    with write_errors():
        try:  # a folder of its own, even for the same overrides in the same second
            run_dir = create_unique(runs / "run", f"{time.strftime('%Y%m%d-%H%M%S')}_{_folder(overrides)}")
        except OSError as e:
            raise StorageError(e.filename or runs / "run", e) from e
    _train_and_print(cfg, run_dir, overrides)


def _check(
    overrides: list[str], runs: Path, config_dir: list[Path] | None, nproc: int | None
) -> tuple[RunConfig, World]:
    """The composed config and this process's place in a distributed run, everything checked
    before any work (a one-line UserError): the world from the environment, --nproc, the batch
    split over the processes, an experiment that declares a grid (a sweep's), --runs writable and
    the preflight (data, trackers, device)."""
    from cli.launch import with_declared_grid
    from stability import distributed

    dirs = config_dirs(config_dir)
    try:
        world = distributed.World.from_env()
    except ValueError as e:
        raise UserError(str(e)) from None
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc} is not allowed: expected an integer >= 1")
    if nproc is not None and nproc > 1 and world.distributed:
        raise UserError(
            f"--nproc {nproc} is not allowed here: this process is already rank {world.rank} of "
            f"{world.size} (started by torchrun or srun); drop --nproc"
        )
    cfg = compose_run(overrides, dirs)
    try:
        distributed.check_batch(cfg.train.batch_size, nproc or world.size)
    except ValueError as e:
        raise UserError(str(e)) from None
    grid = with_declared_grid(overrides, dirs)[len(overrides) :]
    if grid:  # e.g. experiment=story: its grid is under hydra.sweeper.params, which only a sweep reads
        raise UserError(
            f"{' '.join(o for o in overrides if o.startswith(('experiment=', '+experiment=')))} declares "
            f"a sweep grid ({' '.join(grid)}): run it with `{shell_command('stab', 'sweep', *overrides)}`"
        )
    check_writable(runs)
    preflight(cfg)
    return cfg, world


def _folder(overrides: list[str]) -> str:
    """A run's folder name: `folder_name` of its overrides as Hydra reads them, as a sweep job's."""
    from cli.launch import as_hydra_reads

    return folder_name(as_hydra_reads(overrides))


def _launch(nproc: int, runs: Path, overrides: list[str], config_dirs: list[Path]) -> None:
    """`nproc` processes of `stab run` through torch.distributed.run; exits with the run's status."""
    from stability import distributed

    dirs = [arg for d in config_dirs for arg in ("--config-dir", str(Path(d).resolve()))]
    args = (["--debug"] if DEBUG["on"] else []) + ["run", "--runs", str(runs), *dirs, *overrides]
    try:
        code = distributed.launch(nproc, args)
    except KeyboardInterrupt:  # rank 0 has said where the run's records are
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if code:
        err_console.print(
            styled(
                ("stopped:", "bold red"),
                f" a process of the {nproc}-process run exited with status "
                f"{code}; the others were stopped (torch.distributed.run)",
            ),
            highlight=False,
        )
        raise typer.Exit(code)


def _distributed(cfg: RunConfig, runs: Path, overrides: list[str], world: World) -> None:
    """One rank of a data-parallel run: join the group, agree on rank 0's run folder, train."""
    from stability import distributed
    from stability.devices import resolve_device

    if not world.main:  # rank 0 prints for the run
        console.quiet = err_console.quiet = True
    device = resolve_device(cfg.train.device, world)
    distributed.init(world, device)
    try:
        run_dir = None
        if world.main:
            with write_errors():
                try:
                    run_dir = create_unique(runs / "run", f"{time.strftime('%Y%m%d-%H%M%S')}_{_folder(overrides)}")
                except OSError as e:
                    raise StorageError(e.filename or runs / "run", e) from e
        run_dir = Path(distributed.broadcast(str(run_dir) if run_dir else None, world))
        _train_and_print(cfg, run_dir, overrides, world, f" ({world.size} processes, {distributed.backend(device)})")
    finally:
        distributed.close()


def _train_and_print(
    cfg: RunConfig, run_dir: Path, overrides: list[str], world: World | None = None, how: str = ""
) -> None:
    console.print(styled(("stab run", "bold"), f" {' '.join(overrides) or '(defaults)'} -> {run_dir}{how}"))
    from cli.progress import RichProgress, reporter
    from stability import training
    from stability.progress import reporting

    try:
        with graceful_signals(), reporting(reporter(console)):
            summary = training.run(
                cfg, run_dir, overrides, [RichProgress(console)] if world is None or world.main else [], world=world
            )
    except KeyboardInterrupt:
        err_console.print(f"interrupted; status and metrics so far are in {run_dir}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except DataError as e:  # found once the data were decoded or encoded (constant latents): bad input
        if DEBUG["on"]:
            raise
        err_console.print(styled(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER) from None
    except Exception as e:
        if (
            full := storage_error(e)
        ) is not None:  # a full disk: one line; status.json says failed where it could be written
            with write_errors():
                raise full from None
        if DEBUG["on"]:
            raise
        err_console.print(
            styled(
                ("crashed:", "bold red"),
                f" {type(e).__name__}: {e}\ntraceback in {run_dir / 'status.json'} (or run with stab --debug)",
            )
        )
        raise typer.Exit(EXIT_CRASH) from None
    s = summary
    nan = s["first_nan"]
    console.print(styled("verdict: ", verdict_text(s["verdict"]), f"  {s['evidence']}"))
    for f in s.get("flags", [])[1:]:  # the first is the verdict's own evidence
        console.print(f"  also {f['flag']}: {f['evidence']}")
    for line in doubt_lines(s):
        console.print(line, style="yellow", highlight=False)
    for w in s.get("warnings", []):
        console.print(f"  warning: {w['message']}", style="yellow")
    console.print(
        f"grad norm by epoch: {', '.join(fmt(v) for v in s['grad_norm_by_epoch'])}   "
        f"final loss {fmt(s['final_loss'])}   val {fmt(s['final_val_loss'])}"
    )
    if nan:
        console.print(f"first NaN: epoch {nan['epoch']} batch {nan['batch']} (step {nan['step']}) in {nan['module']}")
    notes = RunFolder(run_dir).data()
    for check in ("scream", "health"):  # a custom model's checks stab could not set up, and why
        if str(notes.get(check, "")).startswith("not available"):
            console.print(f"{check} check: {notes[check]}", highlight=False)
    data = f"codec: {s['codec']['weights']}  latent scale x{fmt(s['latent_scale'])}  " if s.get("codec") else ""
    console.print(f"{data}wall {s['wall_s']:.1f} s   run folder: {run_dir}")
