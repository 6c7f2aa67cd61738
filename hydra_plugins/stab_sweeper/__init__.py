"""stab's Hydra sweeper: the Cartesian product of the comma lists, as Hydra's basic sweeper
makes it, or an explicit list of jobs (`stab margin`'s probes: each configuration at its own
learning rate, which no product of lists spells). conf/hydra/sweeper/stab.yaml names this class;
`cli.launch.multirun` selects it and reads back the launcher's returns.

Written against Hydra's public plugin interface (`hydra.plugins.sweeper.Sweeper`, the override
parser, `Plugins.instantiate_launcher`) so that stab needs nothing from `hydra._internal`.

    stab sweep residual=0.1,0.3 norm=pre,post      # 4 jobs, in Hydra's order
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf


def grid(overrides: Sequence[Override]) -> list[list[str]]:
    """Every job's overrides: the product of the comma lists (and `choice`/`range` sweeps), in
    the order Hydra's basic sweeper runs them; a key given twice keeps its first place and its
    last value.

    Raises HydraException for a sweep that has no list of values (`interval(0,1)`)."""
    axes: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            kind = o.value_type.name if o.value_type is not None else "sweep"
            raise HydraException(f"{key}: a {kind} sweep has no list of values to run (use a comma list)")
    return [list(job) for job in itertools.product(*axes.values())]


class StabSweeper(Sweeper):
    """Runs `jobs` as given, or else the grid of the sweep's overrides (with `params` first, as
    an experiment file declares them under `hydra.sweeper.params`), in batches of
    `max_batch_size` jobs (null: one batch)."""

    # The last sweep's JobReturns, one per job in order. Hydra's entry point (`hydra.main`) drops
    # what the sweeper returns; the process that called it reads them here.
    returns: ClassVar[list[JobReturn]] = []

    def __init__(
        self,
        jobs: Sequence[Sequence[str]] | None = None,
        params: dict[str, str] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        listed = OmegaConf.to_container(jobs) if isinstance(jobs, ListConfig) else jobs
        self.jobs = None if listed is None else [[str(o) for o in job] for job in listed]  # type: ignore[union-attr]
        self.params = dict(params or {})
        self.max_batch_size = max_batch_size
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        StabSweeper.returns = []
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if self.jobs is not None:
            jobs = self.jobs
        else:
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            jobs = grid(parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)))
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as the basic sweeper does
        size = self.max_batch_size or len(jobs) or 1
        batches: list[Sequence[JobReturn]] = []
        for start in range(0, len(jobs), size):
            results = self.launcher.launch(jobs[start : start + size], initial_job_idx=start)
            for r in results:
                _ = r.return_value  # raises as the basic sweeper does if the task function raised
            batches.append(results)
            StabSweeper.returns.extend(results)
        return batches
