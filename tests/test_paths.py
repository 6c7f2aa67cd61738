"""Paths are data, never Hydra grammar (issue 29, kind 1): a `--runs` folder or a path given to a
path key reaches Hydra quoted, so `${...}`, quotes, `=`, brackets, `$`, spaces and non-ASCII
land where the user said, for `stab sweep` (every launcher) and `stab margin` alike."""

from __future__ import annotations

import random
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import SMOKE, read_json

ONE_EPOCH = [*SMOKE, "train.epochs=1"]

# folder names a user can type; each is a character Hydra's override grammar would read
ODD_NAMES = {
    "interpolation": "${oc.env:HOME}",
    "apostrophe": "it's here",
    "double-quote": 'say "hi"',
    "space-equals-comma": "a b=c,d",
    "brackets": "[x]{y}",
    "dollar": "$HOME$",
    "non-ascii": "données-対",
    "backslash": "back\\slash\\",
    "tilde": "~user",
}


def test_hydra_quote_reads_back_as_the_same_text_through_hydra_the_sweeper_and_omegaconf():
    from cli.config import hydra_quote
    from hydra_plugins.stab_sweeper import grid

    parser = OverridesParser.create()
    alphabet = [*"ab/\\'\"${}:, =[]~é()", "${", "${x}", "\\${", "\\'"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        (job,) = grid([parser.parse_override("k=" + hydra_quote(text))])  # as a sweep job spells it
        (override,) = job
        assert OmegaConf.create({"v": parser.parse_override(override).value()}).v == text, (text, override)


@pytest.mark.parametrize("odd", list(ODD_NAMES.values()), ids=list(ODD_NAMES))
def test_a_sweep_writes_its_jobs_under_the_runs_folder_as_typed(cli, tmp_path, odd):
    runs = tmp_path / f"runs {odd}" / "x"
    result = cli("sweep", "--runs", runs, "--name", "s", *ONE_EPOCH)
    sweep = runs / "s"
    jobs = sorted(sweep.glob("*/status.json"))
    assert [p.parent.name for p in jobs] == ["preset=smoke,train.epochs=1"]
    assert sorted(tmp_path.rglob("status.json")) == jobs  # nothing anywhere else
    assert read_json(jobs[0])["state"] == "completed"
    index = read_json(sweep / "sweep.json")
    assert index["state"] == "completed" and len(index["jobs"]) == 1
    assert (sweep / "report.md").exists() and "no run folders" not in result.output
    hint = " ".join(result.output.split()).split("(stab report ", 1)[1].split(" for every table)")[0]
    assert shlex.split(hint) == [str(sweep.resolve())]  # the hint, pasted into a shell, names the sweep


def test_a_joblib_sweep_in_a_folder_named_like_an_interpolation_writes_there(cli, tmp_path):
    runs = tmp_path / "${oc.env:HOME}" / "it's"
    cli("sweep", "--runs", runs, "--name", "s", "--launcher", "joblib", "--jobs", "2", *ONE_EPOCH, "seed=0,1")
    jobs = sorted((runs / "s").glob("*/status.json"))
    assert len(jobs) == 2 and all(read_json(p)["state"] == "completed" for p in jobs)
    assert sorted(tmp_path.rglob("status.json")) == jobs


def test_margin_probes_in_an_odd_runs_folder_land_there(cli, tmp_path):
    runs = tmp_path / "${oc.env:HOME}" / "it's [x]"
    out = cli("margin", *SMOKE, "train.epochs=2", "margin.lo=0.01", "margin.hi=1", "margin.tolerance=100", "margin.steps=2",
        "--runs", runs, "--name", "m")  # fmt: skip
    res = read_json(runs / "m" / "margin.json")
    probes = [p["folder"] for c in res["configs"] for p in c["probes"]]
    assert probes and sorted(p.parent.name for p in tmp_path.rglob("status.json")) == sorted(probes)
    assert all((runs / "m" / p / "summary.json").exists() for p in probes)
    hint = " ".join(out.output.split()).split("(stab report ", 1)[1].split(" for every probe)")[0]
    assert shlex.split(hint) == [str((runs / "m").resolve())]  # pasted into a shell: the margin's folder


@pytest.mark.parametrize("odd", ["norm=post,residual=0.1", *ODD_NAMES.values()])
def test_doctor_try_gives_its_fixes_the_snapshot_path_as_data(odd):
    """`stab doctor --try` trains a fix from the run's snapshot: the path went into Hydra as
    `'PATH'`, so an apostrophe failed to parse and `${...}` was resolved to another file. Each
    fix's overrides, composed as its job composes them, name the snapshot as it is on disk; so
    does the run's own data.path."""
    from cli.config import compose_run, hydra_quote
    from cli.doctor_try import fix_overrides

    snap = Path("/tmp") / f"runs {odd}" / "snapshots" / "step4.pt"
    text = Path("/tmp") / f"text {odd}.txt"
    typed = hydra_quote(str(text)) if "," in odd else str(text)  # a comma in a path is typed quoted
    job = fix_overrides(["model=charlm", *SMOKE, f"data.path={typed}"], {"train.lr": "0.001"}, snap)
    cfg = compose_run(job)
    assert (cfg.train.rewind_from, cfg.data.path, cfg.train.lr) == (str(snap), str(text), 0.001)
    parser = OverridesParser.create()
    for o in job:  # as the sweeper hands each job's overrides to Hydra
        parser.parse_override(o)
