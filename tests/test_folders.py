"""Run and job folder names (issue 15, kind 1): one rule for `stab run` and `stab sweep`, one level
under the sweep folder, safe and unique for any override value."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from cli import launch
from stability.rundirs import NAME_BYTES, folder_name
from tests.conftest import SMOKE, read_json

ODD = [
    ["data=folder", "data.path=/home/me/audio/pairs", "residual=0.1"],
    ["data.path=..", "norm=pre"],
    ["data.path=../../etc", "norm=pre"],
    ["data.path='/x/Smith, J/pairs'"],
    ["data.path=/x/Smith_J/pairs"],
    ["data.path=_x_Smith_J_pairs"],
    ["data.path=/données/ünïcødé/対/pairs", "norm=post"],
    ["data.path=a\\b", "seed=1"],
    ["data.path=tab\there"],
    [f"model.k{i}=some_longish_value_{i}" for i in range(19)],
    [f"model.k{i}=some_longish_value_{i}" for i in range(18)] + ["model.k18=other"],
]


def test_folder_names_are_one_safe_bounded_component_and_distinct():
    names = [folder_name(o) for o in ODD]
    for name in names:
        assert "/" not in name and "\\" not in name and "\t" not in name and "'" not in name, name
        assert name not in (".", "..") and not name.startswith(".")
        assert len(name.encode()) <= NAME_BYTES, name
        assert Path(name).name == name  # a single path component
    assert len(set(names)) == len(names)  # different overrides, different folders
    # plain overrides stay readable and untouched; the order and operational keys do not matter
    assert folder_name(["residual=0.3", "norm=pre", "train.device=cpu"]) == "norm=pre,residual=0.3"
    assert folder_name([]) == "defaults"
    # a long name is cut and keeps a hash of the whole, so it is still recognisable
    long = folder_name(ODD[9])
    assert long.startswith("model.k0=some_longish_value_0,") and "~" in long


def record_task(cfg) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "seen.txt").write_text(str(cfg.residual))
    return {"folder": str(out), "task": list(HydraConfig.get().overrides.task)}


@pytest.mark.parametrize(
    "extra",
    [
        ["data=folder", "data.path=/home/me/audio/pairs"],
        ["data=folder", "data.path=../../outside"],
        ["data=folder", "data.path='/x/Smith, J/pairs'"],
        ["data=folder", "data.path='/données/対/pairs'"],
        [f"+k{i}=value_number_{i}_is_long" for i in range(19)],
    ],
    ids=["abs-path", "dotdot", "comma-quoted", "unicode", "19-overrides"],
)
def test_sweep_jobs_land_one_level_under_the_sweep_folder_named_like_stab_run(tmp_path, extra):
    sweep = tmp_path / "sweep"
    returns = launch.multirun(["residual=0.1,0.3", *extra, *launch.hydra_overrides(sweep, "basic", 1)], record_task)
    assert len(returns) == 2
    written = sorted(p for p in tmp_path.rglob("seen.txt"))
    assert len(written) == 2 and all(p.parent.parent == sweep for p in written)  # nothing deeper, nothing outside
    for r in returns:
        folder = Path(r.return_value["folder"])
        assert folder.parent == sweep and folder.is_dir()
        assert folder.name == folder_name(r.return_value["task"])  # the rule stab run uses


def text_corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = ["stability", "gradient", "norm", "residual", "scream", "layer", "token", "clip", "the", "a"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(rng.choice(words) for _ in range(8000)) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_sweep_over_a_path_with_a_comma_indexes_real_folders_and_matches_stab_run(cli, tmp_path):
    corpus = text_corpus(tmp_path / "data" / "Smith, J" / "corpus.txt")
    quoted = f"data.path='{corpus}'"
    runs = tmp_path / "runs"
    cli("sweep", "--runs", runs, "--name", "s", "model=charlm", *SMOKE, "train.epochs=1", quoted, "seed=0,1")
    sweep = runs / "s"
    index = read_json(sweep / "sweep.json")
    assert len(index["jobs"]) == 2
    for job in index["jobs"]:
        folder = sweep / job["folder"]
        assert folder.is_dir() and folder.parent == sweep, job["folder"]
        assert read_json(folder / "status.json")["state"] == "completed"
    assert not [p for p in runs.rglob("status.json") if p.parent.parent != sweep]
    # stab run names its folder by the same rule: <timestamp>_<the sweep job's name>
    cli("run", "--runs", runs, "model=charlm", *SMOKE, "train.epochs=1", quoted, "seed=0")
    (run,) = (runs / "run").iterdir()
    assert run.name.split("_", 1)[1] in {j["folder"] for j in index["jobs"]}
    assert json.loads((run / "overrides.json").read_text())["overrides"][-2] == quoted


def test_a_comma_in_a_stab_run_value_hints_how_to_quote_it(cli, tmp_path):
    result = cli("run", "--runs", tmp_path, "data=folder", "data.path=/x/Smith, J/pairs", ok=False)
    assert result.exit_code == 2
    assert "\"data.path='/x/Smith, J/pairs'\"" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("status.json"))


@pytest.mark.parametrize("name", [".", "..", "a/b", "../x"])
def test_a_sweep_name_that_is_not_a_plain_folder_is_refused(cli, tmp_path, name):
    result = cli("sweep", "--runs", tmp_path / "runs", "--name", name, *SMOKE, ok=False)
    assert result.exit_code == 2 and "is not allowed" in result.output
    assert not list(tmp_path.rglob("sweep.json"))
