"""The Hydra adapter on its own: a real multirun with a trivial task function."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from cli import launch
from cli.config import UserError


def record_task(cfg) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "seen.txt").write_text(f"{cfg.residual} {cfg.norm} {cfg.model.residual[2]}")
    return {"folder": str(out)}


def test_expand_is_the_cartesian_product_in_hydra_order():
    combos = launch.expand(["preset=smoke", "residual=0.1,0.3", "norm=pre,post"])
    assert combos == [
        ["preset=smoke", "residual=0.1", "norm=pre"],
        ["preset=smoke", "residual=0.1", "norm=post"],
        ["preset=smoke", "residual=0.3", "norm=pre"],
        ["preset=smoke", "residual=0.3", "norm=post"],
    ]


def test_malformed_sweep_list_is_a_user_error():
    with pytest.raises(UserError, match="bad sweep override"):
        launch.expand(["residual=0.1,,0.3]"])


def test_multirun_runs_every_job_through_hydra_into_readable_folders(tmp_path):
    overrides = ["residual=0.1,0.3", "norm=pre,post", "train.device=cpu", *launch.hydra_overrides(tmp_path, "basic", 1)]
    returns = launch.multirun(overrides, record_task)
    assert len(returns) == 4
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    # operational keys (train.device) stay out of folder names
    assert folders == [
        "norm=post,residual=0.1",
        "norm=post,residual=0.3",
        "norm=pre,residual=0.1",
        "norm=pre,residual=0.3",
    ]
    assert (tmp_path / "norm=pre,residual=0.3" / "seen.txt").read_text() == "0.3 pre 0.3"
    assert all(Path(r.return_value["folder"]).parent == tmp_path for r in returns)


def pid_task(cfg) -> dict:
    return {"folder": HydraConfig.get().runtime.output_dir, "pid": os.getpid()}


def barrier(folder: Path, n: int) -> int:
    """Holds its worker until n workers have arrived, so each of n warm-up calls gets its own."""
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 600  # an event, not a time limit: a loaded machine starts workers slowly
    while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def test_joblib_jobs_run_in_the_workers_warmed_before_the_launch(tmp_path):
    (tmp_path / "arrived").mkdir()
    pids = launch.WarmWorkers(2, functools.partial(barrier, tmp_path / "arrived", 2)).wait()
    assert len(pids) == 2 and os.getpid() not in pids
    returns = launch.multirun(
        ["residual=0.1,0.3", "norm=pre,post", *launch.hydra_overrides(tmp_path / "sweep", "joblib", 2)], pid_task
    )
    used = {r.return_value["pid"] for r in returns}
    assert len(returns) == 4 and used <= pids  # Hydra's launcher reused them: no second start-up
    for pid in used:  # and they were stopped once every job had returned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_unknown_or_missing_launcher_plugin_is_refused():
    with pytest.raises(UserError, match="expected one of basic, joblib"):
        launch.check_launcher("dask")


def test_each_short_name_reads_the_value_it_sets_where_the_model_reads_it():
    """The one table of short names (stability.config.SHORT_NAMES) is the config's top-level
    axes, and each entry's path is where `conf/model/*.yaml` interpolates it."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from cli.config import CONF_DIR, compose_run
    from stability.config import SHORT_NAMES

    root = OmegaConf.load(CONF_DIR / "config.yaml")
    axes = {k for k, v in root.items() if not isinstance(v, (DictConfig, ListConfig)) and k != "seed"}
    assert axes == set(SHORT_NAMES)
    set_to = {
        "residual": ("0.3", 0.3),
        "norm": ("pre", "pre"),
        "clip": ("5", 5.0),
        "spectral_norm": ("true", True),
        "qk_norm": ("true", True),
        "sigma_reparam": ("true", True),
        "v_scale": ("true", True),
        "z_loss": ("1e-4", 1e-4),
        "warmup": ("3", 3),
        "on_spike": ("skip", "skip"),
        "update_clip": ("1.0", 1.0),
    }
    assert set(set_to) == set(SHORT_NAMES)
    for name, (text, value) in set_to.items():
        model = "model=charlm" if name == "z_loss" else "model=cascade"
        cfg = compose_run([model, f"{name}={text}"])
        assert SHORT_NAMES[name].read(cfg) == value, name
        assert SHORT_NAMES[name].read(compose_run([model])) != value, name
    assert SHORT_NAMES["clip"].read(compose_run(["clip=none"])) == "none"
    assert SHORT_NAMES["residual"].read(compose_run(["model=charlm"])) is None  # the char LM has none
