"""The installed `stab`, as a user runs it: from a folder outside the checkout, with nothing on
PYTHONPATH. Inside the repository the checkout itself is importable, so a package missing from
pyproject.toml's package list goes unseen by every other test (the Hydra sweeper plugin once did:
`stab --help` failed on a fresh install with "No module named 'hydra_plugins.stab_sweeper'")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the installed `stab` console script, as the shell runs it (its entry point, argv[1:] passed on)
STAB = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name='stab'); sys.argv = ['stab', *sys.argv[1:]]; ep.load()()"
)


def _outside(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def _packages() -> list[str]:
    """Every package of the checkout's own code (a folder with an __init__.py under cli/,
    stability/ or hydra_plugins/), dotted."""
    found = []
    for top in ("cli", "stability", "hydra_plugins"):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            found.append(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_the_stab_entry_point_runs_from_outside_the_checkout(tmp_path):
    out = _outside(STAB, tmp_path, "margin", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "largest stable learning rate" in out.stdout


def test_every_package_of_the_checkout_is_installed(tmp_path):
    packages = _packages()
    assert {"cli", "stability", "hydra_plugins.stab_launcher", "hydra_plugins.stab_sweeper"} <= set(packages)
    code = (
        "import importlib, sys\n"
        "missing = []\n"
        "for name in sys.argv[1:]:\n"
        "    try: importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e: missing.append(f'{name}: {e}')\n"
        "print('\\n'.join(missing)); sys.exit(1 if missing else 0)\n"
    )
    out = _outside(code, tmp_path, *packages)
    assert out.returncode == 0, f"not installed (pyproject.toml [tool.setuptools.packages.find]):\n{out.stdout}"


def test_an_installed_sweep_runs_from_outside_the_checkout(tmp_path):
    # Hydra's plugin scan cannot list an editable install's modules: the sweeper must be registered
    runs = tmp_path / "runs"
    out = _outside(
        STAB, tmp_path, "sweep", "--runs", str(runs), "--name", "s", "model=charlm", "preset=smoke", "train.epochs=1"
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (summary,) = list((runs / "s").glob("*/summary.json"))
    assert summary.is_file() and "Unknown plugin class" not in out.stderr
