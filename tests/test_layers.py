"""The library is a layer of its own: importing any module of stability/ loads no front end.

stability/ must be usable from a script, a notebook or another tool's training loop without the
CLI's libraries (Typer, Rich) or the CLI itself, and without Hydra (cli/ composes configs). Each
module is imported for real, in a fresh interpreter, one after the other; after each import the
forbidden packages must still be absent from sys.modules, so a failure names the module that
pulled one in. A module that plugs into another package (transformers, Lightning) is imported
after that package and judged by what it adds; where the package is not installed it is skipped,
and said. stability/slurm.py is no plugin: the launcher class Hydra loads is in
hydra_plugins/stab_launcher, so slurm.py is imported like any other module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("typer", "rich", "cli", "hydra", "omegaconf")
# A module that is a plugin of another package, imported after it: the transformers callback and
# the Lightning callback.
OPTIONAL = {
    "stability.hf": "transformers",
    "stability.lightning": "pytorch_lightning",
}

# The optional modules go last, each after its own extra: pytorch_lightning imports Rich itself,
# so what counts is what stab's module adds beyond its extra, and nothing imported before it
# can hide behind the extra's imports.
CHILD = """
import importlib, importlib.util, json, sys
forbidden, optional, names = json.loads(sys.argv[1])
names = sorted(names, key=lambda n: n in optional)
out = {"loaded": {}, "skipped": [], "imported": []}
def loaded():
    return {m for m in sys.modules if m.split(".")[0] in forbidden}
for name in names:
    extra = optional.get(name)
    if extra and importlib.util.find_spec(extra) is None:
        out["skipped"].append(name)
        continue
    if extra:
        importlib.import_module(extra)
    before = loaded()
    importlib.import_module(name)
    out["imported"].append(name)
    bad = sorted(loaded() - before)
    if bad:
        out["loaded"][name] = bad
        break
print(json.dumps(out))
"""


def stability_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "stability").rglob("*.py")
    )


def test_importing_every_stability_module_loads_no_typer_rich_hydra_or_cli():
    names = stability_modules()
    assert "stability.sweep_engine" in names and "stability.training" in names and len(names) > 60
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([FORBIDDEN, OPTIONAL, names])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a ceiling only: the imports take seconds
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["loaded"] == {}, f"importing {next(iter(out['loaded']))} loaded {out['loaded']}"
    assert sorted(out["imported"] + out["skipped"]) == names
    assert set(out["skipped"]) <= set(OPTIONAL), out["skipped"]
