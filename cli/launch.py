"""The one adapter between a Typer command and Hydra's multirun machinery.

Typer and `@hydra.main` do not compose, and the Compose API has no multirun, so this drives
Hydra's own runner: `initialize_config_dir` sets up the global Hydra object, whose `multirun`
runs the configured sweeper (Cartesian product of comma lists) and launcher plugin (basic,
joblib, submitit, ray) exactly as `python app.py --multirun ...` would. It touches Hydra
internals (`GlobalHydra.instance().hydra`), so it stays small and has a test of its own.

    returns = multirun(["residual=0.1,0.3", *hydra_overrides(sweep_dir, "joblib", 2)], task)
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from cli.config import CONF_DIR, UserError, _one_line, check_override_syntax, search_path_overrides
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
    if name not in LAUNCHERS:
        raise UserError(
            f"--launcher {name!r} is not allowed: expected one of {', '.join(LAUNCHERS)}"
            + did_you_mean(name, LAUNCHERS)
        )
    _, module, package = LAUNCHERS[name]
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"--launcher {name} needs the Hydra plugin {package}: pip install {package}")


def with_declared_grid(overrides: list[str]) -> list[str]:
    """The overrides plus the grid an experiment file declares under `hydra.sweeper.params`
    (Hydra's own place for a sweep defined in config, e.g. conf/experiment/story.yaml), as
    explicit `key=a,b` overrides, so the job count, the config checks and the job folder names
    see them. A key also given on the command line keeps the command line's value."""
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "experiment" and "," not in o]
    if not chosen:
        return list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            from hydra import compose

            cfg = compose(config_name="config", overrides=chosen + search_path_overrides(), return_hydra_config=True)
    except HydraException as e:
        raise UserError(_one_line(e)) from None
    params = dict(cfg.hydra.sweeper.get("params") or {})
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    return list(overrides) + [f"{k}={v}" for k, v in params.items() if k not in given]


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper will produce them (Cartesian product)."""
    check_override_syntax(list(overrides))
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as e:
        raise UserError(f"bad sweep override: {_one_line(e)}") from None


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
        f"hydra.sweep.dir='{sweep_dir}'",
        "hydra.sweep.subdir='${stab_job_folder:${hydra.overrides.task}}'",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(OPERATIONAL)}]",
        "hydra.job.chdir=false",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
        f"hydra/launcher={LAUNCHERS[launcher][0]}",
    ]
    if launcher == "joblib":
        out.append(f"hydra.launcher.n_jobs={jobs}")
    if launcher.startswith("submitit"):
        out.append(f"hydra.launcher.submitit_folder='{sweep_dir}/.submitit/%j'")
    if launcher == "submitit_local":
        out.append("hydra.launcher.tasks_per_node=1")
    if launcher == "ray":
        out.append(f"+hydra.launcher.ray.init.num_cpus={jobs}")
    return out


def multirun(
    overrides: list[str], task_function: Callable[[DictConfig], Any], jobs: list[list[str]] | None = None
) -> list[Any]:
    """Run Hydra's sweeper + launcher over `overrides`; returns the flat list of JobReturns.

    With `jobs` (one override list per job, e.g. a margin search's probes, each configuration at
    its own learning rate: not a Cartesian product), the launcher runs exactly those jobs, as
    Hydra's basic sweeper hands it a batch; `overrides` then holds only the hydra.* ones."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None  # initialize_config_dir made it
        overrides = list(overrides) + search_path_overrides()
        if jobs is None:
            batches = hydra.multirun(config_name="config", task_function=task_function, overrides=overrides)
        else:
            batches = [_launch(hydra, overrides, jobs, task_function)]
    release_idle_workers()
    return [r for batch in batches for r in batch]


def _launch(hydra: Any, overrides: list[str], jobs: list[list[str]], task_function: Callable[[DictConfig], Any]) -> Any:
    """`Hydra.multirun` (hydra-core 1.3) with the sweeper's product replaced by `jobs`: the same
    master config, callbacks and launcher plugin, then `launcher.launch(jobs)` as the basic
    sweeper calls it."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    cfg = hydra.compose_config(
        config_name="config", overrides=overrides, with_log_configuration=True, run_mode=RunMode.MULTIRUN
    )
    callbacks = Callbacks(cfg)
    callbacks.on_multirun_start(config=cfg, config_name="config")
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
        task_function=task_function,
        config=cfg,
    )
    Path(cfg.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
    returns = launcher.launch([list(j) for j in jobs], initial_job_idx=0)
    callbacks.on_multirun_end(config=cfg, config_name="config")
    return returns


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
    here, with every result back and every file written, so they are killed instead. loky has no
    public handle on its shared executor; without one (a future joblib), they exit as before.
    """
    reusable_executor = sys.modules.get("joblib.externals.loky.reusable_executor")  # None: no joblib sweep ran
    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)
