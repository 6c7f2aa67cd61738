"""The one adapter between a Typer command and Hydra's multirun machinery.

The Compose API has no multirun, so a sweep goes through Hydra's public entry point,
`hydra.main`, as `python app.py --multirun ...` would: it composes conf/, runs stab's sweeper
(hydra_plugins/stab_sweeper: the Cartesian product of the comma lists, or an explicit job list)
and the launcher plugin (basic, joblib, submitit, ray). Paths (the sweep folder, --config-dir)
reach Hydra quoted, as data, never as override grammar.

    returns = multirun(["residual=0.1,0.3", *hydra_overrides(sweep_dir, "joblib", 2)], task)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from cli.config import (
    CONF_DIR,
    UserError,
    _one_line,
    check_override_syntax,
    hydra_quote,
    parse_overrides,
    paths_as_data,
    search_path_overrides,
)
from hydra_plugins.stab_sweeper import StabSweeper, grid
from stability.config import did_you_mean
from stability.rundirs import OPERATIONAL, folder_name

# --launcher NAME -> (hydra/launcher config, plugin module that must be importable, pip package)
LAUNCHERS: dict[str, tuple[str, str | None, str | None]] = {
    "basic": ("basic", None, None),
    "joblib": ("joblib", "hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("submitit_local", "hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("stab_slurm", "hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("ray", "hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}

# A job's folder name, resolved in the process that runs the job (this module is imported there
# through cli.job): the same rule as `stab run`'s, one level under the sweep folder whatever the
# override values hold. Hydra's own override_dirname keeps slashes, so `data.path=/a/b` would
# nest folders and a long list of overrides would pass the file-name limit.
OmegaConf.register_new_resolver(
    "stab_job_folder",
    lambda task: folder_name(list(task) if isinstance(task, ListConfig) else [str(task)]),
    replace=True,
)


def check_launcher(name: str) -> None:
    """UserError (one line, with a did-you-mean) for a launcher stab does not know, or one whose Hydra plugin is not installed (naming its pip package)."""
    if name not in LAUNCHERS:
        raise UserError(
            f"--launcher {name!r} is not allowed: expected one of {', '.join(LAUNCHERS)}"
            + did_you_mean(name, LAUNCHERS)
        )
    _, module, package = LAUNCHERS[name]
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"--launcher {name} needs the Hydra plugin {package}: pip install {package}")


def with_declared_grid(overrides: list[str], dirs: Sequence[Path] = ()) -> list[str]:
    """The overrides plus the grid an experiment file declares under `hydra.sweeper.params`
    (Hydra's own place for a sweep defined in config, e.g. conf/experiment/story.yaml), as
    explicit `key=a,b` overrides, so the job count, the config checks and the job folder names
    see them. A key also given on the command line keeps the command line's value. `dirs`: the
    `--config-dir` folders."""
    overrides = paths_as_data(overrides)  # as the sweeper will read them: paths quoted as data
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "experiment" and "," not in o]
    if not chosen:
        return overrides
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            from hydra import compose

            cfg = compose(
                config_name="config", overrides=chosen + search_path_overrides(dirs), return_hydra_config=True
            )
    except HydraException as e:
        raise UserError(_one_line(e, chosen, dirs)) from None
    params = dict(cfg.hydra.sweeper.get("params") or {})
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    return list(overrides) + [f"{k}={v}" for k, v in params.items() if k not in given]


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as stab's sweeper will run them (the Cartesian product, in Hydra's
    order), with each path key's value quoted as data (`cli.config.paths_as_data`)."""
    overrides = paths_as_data(overrides)
    check_override_syntax(list(overrides))
    try:
        return grid(parse_overrides(overrides))
    except (HydraException, UserError) as e:
        raise UserError(f"bad sweep override: {e}") from None


def as_hydra_reads(overrides: list[str]) -> list[str]:
    """The overrides of one job spelt as Hydra's sweeper spells a sweep job's (`train.lr=1e-3` ->
    `train.lr=0.001`, a float longer than a double holds -> its shortest repr), so `stab run` names
    its folder by the same rule and text as `stab sweep` names the same job's; as given if they do
    not parse as one job."""
    try:
        jobs = expand(list(overrides))
    except UserError:
        return list(overrides)
    return jobs[0] if len(jobs) == 1 else list(overrides)


def hydra_overrides(sweep_dir: Path, launcher: str, jobs: int) -> list[str]:
    """The hydra.* overrides that put job folders at sweep_dir/<overrides> and pick the launcher."""
    out = [
        f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}",
        "hydra.sweep.subdir='${stab_job_folder:${hydra.overrides.task}}'",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(OPERATIONAL)}]",
        "hydra.job.chdir=false",
        "hydra.output_subdir=null",  # no .hydra/ (as `stab run`): config.yaml and overrides.json say it all
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
        "hydra/sweeper=stab",
        f"hydra/launcher={LAUNCHERS[launcher][0]}",
    ]
    if launcher == "joblib":
        out.append(f"hydra.launcher.n_jobs={jobs}")
    if launcher.startswith("submitit"):
        out.append(f"hydra.launcher.submitit_folder={hydra_quote(f'{sweep_dir}/.submitit/%j')}")
    if launcher == "submitit_local":
        out.append("hydra.launcher.tasks_per_node=1")
    if launcher == "ray":
        out.append(f"+hydra.launcher.ray.init.num_cpus={jobs}")
    return out


def multirun(
    overrides: list[str],
    task_function: Callable[[DictConfig], Any],
    jobs: list[list[str]] | None = None,
    dirs: Sequence[Path] = (),
) -> list[Any]:
    """Run stab's sweeper and the launcher over `overrides` through `hydra.main`; returns the
    JobReturns, one per job in order.

    With `jobs` (one override list per job, e.g. a margin search's probes, each configuration at
    its own learning rate: not a Cartesian product), the launcher runs exactly those jobs;
    `overrides` then holds only the hydra.* ones. `dirs`: the `--config-dir` folders. An exception of the sweeper or the launcher
    (e.g. `stability.slurm.SbatchRefused`) reaches the caller as it was raised."""
    args = [*overrides, *search_path_overrides(dirs)]
    if jobs is not None:
        listed = ",".join("[" + ",".join(hydra_quote(o) for o in job) + "]" for job in jobs)
        args.append(f"hydra.sweeper.jobs=[{listed}]")
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(task_function)
    GlobalHydra.instance().clear()
    register_plugins()
    try:
        # HYDRA_FULL_ERROR: hydra.main re-raises instead of printing a traceback and exiting
        with _argv(["stab", "--multirun", *args]), _environ("HYDRA_FULL_ERROR", "1"):
            main()
        returns = list(_sweeper().returns)
    finally:
        _sweeper().returns = []
    release_idle_workers()  # not on an exception: stopped jobs still have to write `interrupted`
    return returns


def register_plugins() -> None:
    """Register stab's Hydra plugins (the sweeper, the SLURM launcher) with Hydra by hand.

    Hydra finds plugins by scanning the `hydra_plugins` namespace package with pkgutil, which
    cannot list the modules of an editable install (setuptools maps them through an import hook):
    an installed `stab sweep` run outside the checkout failed with "Unknown plugin class :
    'hydra_plugins.stab_sweeper.StabSweeper'". `Plugins.register` is Hydra's public way in."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # scans first; registering after keeps the module's current class
    plugins.register(_sweeper())
    plugins.register(importlib.import_module("hydra_plugins.stab_launcher").StabSlurmLauncher)


def _sweeper() -> type[StabSweeper]:
    """The sweeper class Hydra ran: its plugin scan executes the module again, so the class is
    read from the module, not from this module's import of it."""
    return cast(type[StabSweeper], importlib.import_module("hydra_plugins.stab_sweeper").StabSweeper)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """`sys.argv` as `hydra.main` reads it (its only input), restored after."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


class WarmWorkers:
    """The joblib launcher's worker processes, started before the sweep checks its configs.

    A loky worker spends seconds importing torch before it can train; started first, it does so
    while this process composes and checks every job's config. Hydra's joblib launcher then finds
    joblib's reusable executor running with the arguments it would have used (its own defaults,
    hence no warm-up when the sweep sets hydra.launcher.*) and hands its jobs to these workers.

        workers = WarmWorkers(2, job.warm)   # returns at once
        ...                                  # check every config
        workers.wait()                       # the workers' pids, once warm
    """

    @classmethod
    def start(cls, launcher: str, jobs: int, hydra_args: list[str], warm: Callable[[], int]) -> WarmWorkers | None:
        """Workers for this sweep, or None where the launcher would not reuse them."""
        if launcher != "joblib" or jobs < 2 or any(a.lstrip("+").startswith("hydra.launcher") for a in hydra_args):
            return None
        return cls(jobs, warm)

    def __init__(self, jobs: int, warm: Callable[[], int]) -> None:
        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
        from joblib import Parallel, delayed

        conf = JobLibLauncherConf()
        self._results = Parallel(
            n_jobs=jobs,
            backend="loky",
            max_nbytes=conf.max_nbytes,
            mmap_mode=conf.mmap_mode,
            verbose=conf.verbose,
            return_as="generator_unordered",
        )(delayed(warm)() for _ in range(jobs))

    def wait(self) -> set[int]:
        """The indices of the workers whose warm-up (importing torch and stab) was started."""
        return set(self._results)

    def cancel(self) -> None:
        """Nothing will run (a config was refused): stop the workers mid-import, quietly."""
        with warnings.catch_warnings():  # joblib warns that the warm-up calls were cancelled
            warnings.simplefilter("ignore")
            self._results.close()
        release_idle_workers()


def release_idle_workers() -> None:
    """Stop the joblib launcher's worker processes now that every job has returned.

    joblib keeps its loky workers alive for reuse, and at exit the sweep waits while each of them
    tears down its own torch (about 1.5 s on 2 cores, longer than a smoke job). They are idle
    here, with every result back and every file written, so they are killed instead, through
    loky's public `get_reusable_executor` (the executor joblib's loky backend shares; where none
    runs it makes one with no process yet, which shuts down at once).
    """
    if "joblib.externals.loky" not in sys.modules:  # no joblib sweep ran in this process
        return
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(reuse=True).shutdown(wait=True, kill_workers=True)
