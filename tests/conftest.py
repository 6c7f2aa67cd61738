"""Shared fixtures: one latent cache for the whole session, a pinned Rich width, the CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("STAB_WIDTH", "260")  # before cli.common creates its consoles

from typer.testing import CliRunner

from cli.main import app
from stability.storage import decode

SMOKE = ["preset=smoke"]


@pytest.fixture(scope="session", autouse=True)
def latent_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Encode the synthetic latents once per test session, not once per test."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["STAB_CACHE"] = str(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli() -> Cli:
    return Cli()


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True):
        result = self.runner.invoke(app, [str(a) for a in args])
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        return result


def only_run(runs: Path) -> Path:
    """The one run folder under `runs` (any depth)."""
    found = [p.parent for p in runs.rglob("summary.json")]
    assert len(found) == 1, found
    return found[0]


def read_json(path: Path):
    """A file stab wrote, parsed strictly (no bare NaN/Infinity), non-finite strings as floats."""
    return decode(json.loads(Path(path).read_text(), parse_constant=_no_constant))


def read_jsonl(path: Path) -> list[dict]:
    return [
        decode(json.loads(line, parse_constant=_no_constant))
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]


def _no_constant(name: str):
    raise AssertionError(f"bare {name} in a file stab wrote: not strict JSON")
