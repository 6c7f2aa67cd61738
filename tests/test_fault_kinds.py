"""Issue 29, the other members of each kind: every file `stab report` would write or remove is
checked (not only report.md), the plot count it announces is the count it draws, every command
that reads a run refuses a folder with no valid run, every choice-like value gets a did-you-mean,
a tracker that cannot reach its server is found out before its own retry loop, and a full disk
under `stab show --plot` is exit 1. Each test fails on be2a617."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import Cli, read_json

CHARLM = ["model=charlm", "preset=smoke", "train.threads=1", "train.epochs=1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real char-LM smoke runs, one stable and one with a NaN at step 3: RUNS/run/<folder>."""
    runs = tmp_path_factory.mktemp("runs")
    Cli()("run", "--runs", runs, *CHARLM)
    Cli()("run", "--runs", runs, *CHARLM, "fault.nan_at_step=3", "fault.nan_module=layer0.mlp")
    stable, nan = sorted((runs / "run").iterdir(), key=lambda p: "nan_at_step" in p.name)
    assert read_json(stable / "summary.json")["verdict"] not in ("nan", "failed")
    assert read_json(nan / "summary.json")["verdict"] == "nan"
    return stable, nan


def _copy(where: Path, *runs: Path) -> Path:
    for run in runs:
        shutil.copytree(run, where / run.name)
    return where


# --- stab report: every file it writes or removes, not only report.md -----------------------------


@pytest.mark.parametrize("name", ["plots/grouped.png", "plots/departure.png", "configs.csv"])
def test_report_refuses_to_overwrite_any_file_it_did_not_write(cli, tmp_path, two_runs, name):
    runs = _copy(tmp_path / "runs", *two_runs)
    (runs / name).parent.mkdir(parents=True, exist_ok=True)
    (runs / name).write_bytes(b"the user's own file")
    result = cli("report", runs, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: {runs / name} was not written by stab report (or was changed since): not overwriting it; "
        "move it, or pass --out to another folder"
    )
    assert (runs / name).read_bytes() == b"the user's own file"
    assert not (runs / "report.md").exists() and not (runs / "plots" / "curves.png").exists()


def test_report_removes_only_the_stale_plots_it_drew(cli, tmp_path, two_runs):
    stable, nan = two_runs
    runs = _copy(tmp_path / "runs", stable, nan)
    mine = runs / "plots" / "steps" / "mine.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own plot")
    cli("report", runs)
    steps = sorted(p.name for p in (runs / "plots" / "steps").iterdir())
    assert len(steps) == 3 and "mine.png" in steps  # one per run, and the user's
    assert (runs / "plots" / "grouped.png").is_file() and (runs / "plots" / "departure.png").is_file()

    shutil.rmtree(runs / nan.name)  # the NaN run is gone: its plots, grouped and departure are stale
    cli("report", runs)
    # the stable run's plot (both runs may share their start second, so not by the folder's time)
    kept = [n for n in steps if n != "mine.png" and "nan_at_step" not in n]
    assert len(kept) == 1
    assert sorted(p.name for p in (runs / "plots" / "steps").iterdir()) == sorted(["mine.png", *kept])
    assert mine.read_bytes() == b"the user's own plot"
    assert not (runs / "plots" / "grouped.png").exists() and not (runs / "plots" / "departure.png").exists()
    assert not list((runs / "plots").glob("heatmap_*.png"))


def test_report_announces_the_number_of_plots_it_draws(cli, tmp_path, two_runs):
    for picked in ([two_runs[0]], list(two_runs)):
        runs = _copy(tmp_path / f"runs{len(picked)}", *picked)
        out = cli("report", runs).output
        announced = {int(n) for n in re.findall(r"drawing plots: (\d+) plots", out)}
        (said,) = (int(n) for n in re.findall(r"and (\d+) plot\(s\) to", out))
        drawn = len(list((runs / "plots").rglob("*.png")))
        assert announced == {drawn} and said == drawn, out
    assert drawn == 7  # 2 runs: curves, grad norms, 1 heatmap, 2 step plots, grouped, departure


# --- every command that reads a run: a folder with no valid run -----------------------------------


def test_show_and_export_refuse_a_folder_with_no_valid_run(cli, tmp_path):
    junk = tmp_path / "notes"
    junk.mkdir()
    (junk / "summary.json").write_text("{}")
    (junk / "report.md").write_text("my own notes\n")
    before = sorted(p.name for p in junk.iterdir())
    shown = cli("show", junk, "--plot", ok=False)
    assert shown.exit_code == 2, shown.output
    (line,) = shown.stderr.strip().splitlines()
    assert line.startswith(f"error: {junk}: not a run stab wrote (") and "summary.json with a verdict" in line
    exported = cli("export", junk, "--to", "tensorboard", ok=False)
    assert exported.exit_code == 2, exported.output
    (line,) = exported.stderr.strip().splitlines()
    assert line.startswith(f"error: {junk}: no valid run in it ({junk}: ")
    assert sorted(p.name for p in junk.iterdir()) == before


# --- choice-like values: did you mean ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, suggestion",
    [
        (["export", "{run}", "--to", "tensorbord"], "did you mean tensorboard?"),
        (["run", "--runs", "{tmp}", *CHARLM, "log=tensorbord"], "did you mean tensorboard?"),
        (["run", "--runs", "{tmp}", *CHARLM, "log=[mlflow,wandbb]"], "did you mean wandb?"),
        (
            ["run", "--runs", "{tmp}", *CHARLM, "fault.nan_at_step=2", "fault.nan_module=layer0.atn"],
            "did you mean layer0.attn?",
        ),
    ],
)
def test_choice_like_values_get_did_you_mean(cli, tmp_path, two_runs, args, suggestion):
    args = [a.replace("{run}", str(two_runs[0])).replace("{tmp}", str(tmp_path / "runs")) for a in args]
    result = cli(*args, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith(suggestion), line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.jsonl"))


# --- trackers: a W&B server that cannot be reached ---------------------------------------------------


def test_wandb_online_without_a_reachable_server_is_one_line_before_wandb_retries(cli, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls: list[dict] = []

    def init(**kwargs):  # W&B's own init would retry for its init_timeout (90 s) before failing
        calls.append(kwargs)
        raise AssertionError("wandb.init reached")

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://stab-test.invalid")  # .invalid never resolves (RFC 6761)
    result = cli("run", "--runs", tmp_path / "runs", *CHARLM, "log=wandb")
    assert calls == []
    warned = [x for x in result.stderr.splitlines() if x.strip()]
    assert warned == [
        "warning: tracker wandb could not start (OSError: the W&B server https://stab-test.invalid cannot be "
        "reached (Name or service not known); WANDB_MODE=offline keeps the run to sync later); "
        "the run goes on, its folder has every record"
    ] or (len(warned) == 1 and "the W&B server https://stab-test.invalid cannot be reached" in warned[0]), warned
    (run,) = (tmp_path / "runs" / "run").iterdir()
    assert read_json(run / "status.json")["state"] == "completed"
    assert "cannot be reached" in read_json(run / "trackers.json")["wandb"]["error"]


# --- a full disk under stab show --plot ---------------------------------------------------------------


def test_show_plot_on_a_full_disk_exits_1_naming_the_file(cli, tmp_path, two_runs, monkeypatch):
    """The run on a full tmpfs where one can be mounted (root), else ENOSPC at the OS for every
    write into the run folder; was exit 2 (bad input)."""
    import errno
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode
        == 0
    )
    try:
        run = shutil.copytree(two_runs[0], disk / "run")
        if mounted:
            with open(disk / "fill", "wb", buffering=0) as f, pytest.raises(OSError):  # the rest of the disk
                while True:
                    f.write(b"\0" * 4096)
        else:
            real_fsync = os.fsync

            def full(fd):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(run)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", full)
        result = cli("show", run, "--plot", ok=False)
        assert result.exit_code == 1, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line == f"error: cannot write {run / 'plots' / 'steps.png'}: no space left on device"
        assert not (run / "plots" / "steps.png").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# --- a second process on the same run ---------------------------------------------------------------


def test_export_of_a_run_another_process_holds_is_refused_and_sends_nothing(cli, tmp_path, two_runs):
    """Two `stab export RUN --to X` at once both found nothing sent in trackers.json and sent the
    run twice; now the export holds the run's lease, as its one writer."""
    pytest.importorskip("tensorboard")
    from stability.rundirs import RunLease

    run = shutil.copytree(two_runs[0], tmp_path / "run")
    with RunLease(run, purpose="another stab export") as other:
        result = cli("export", run, "--to", "tensorboard", ok=False)
        assert result.exit_code == 1, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"warning: {run}: not exported: {run} is being written by pid {other.info['pid']} on ")
        assert not (run / "tb").exists() and not (run / "trackers.json").exists()
    assert "tensorboard: sent" in cli("export", run, "--to", "tensorboard").output
    assert (run / "tb").is_dir() and read_json(run / "trackers.json")["export"]["tensorboard"]["epochs"] == 1


def test_export_to_a_tracker_refuses_an_out_it_would_ignore(cli, tmp_path, two_runs):
    """`--to tensorboard --out DIR` wrote RUN/tb/ and nothing into DIR, without a word."""
    pytest.importorskip("tensorboard")
    run = shutil.copytree(two_runs[0], tmp_path / "run")
    result = cli("export", run, "--to", "tensorboard", "--out", tmp_path / "elsewhere", ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --out is not used by --to tensorboard, which sends to event files in RUN/tb/")
    assert line.endswith("; --out is for lightning, olmo-core, megatron") or "--out is for lightning" in line
    assert not (run / "tb").exists() and not (tmp_path / "elsewhere").exists()


# --- stab probe init --out: bad input before the work, a full disk in one line ----------------------

PROBE = ["probe", "init", "model=charlm", "preset=smoke", "--depths", "2", "--batches", "1"]


def test_probe_out_that_is_a_file_is_refused_before_the_probe(cli, tmp_path):
    """Was a FileExistsError traceback after the whole probe had run."""
    (tmp_path / "notes.txt").write_text("mine\n")
    result = cli(*PROBE, "--out", tmp_path / "notes.txt", ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert (
        line
        == f"error: --out {str(tmp_path / 'notes.txt')!r} is a file, not a folder: pass a folder (it is created if missing)"
    )
    assert "||mean grad" not in result.output and (tmp_path / "notes.txt").read_text() == "mine\n"


def test_probe_on_a_full_disk_is_one_line_and_exit_1(cli, tmp_path, monkeypatch):
    """Was pandas' OSError traceback. A 64 KiB tmpfs filled up where one can be mounted, else
    ENOSPC at `os.fsync` for the files under --out."""
    import errno
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode
        == 0
    )
    try:
        if mounted:
            with open(disk / "fill", "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        else:
            real_fsync = os.fsync

            def full(fd):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(disk)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", full)
        result = cli(*PROBE, "--out", disk / "probe", ok=False)
        assert result.exit_code == 1, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line == f"error: cannot write {disk / 'probe' / 'probe_init.csv'}: no space left on device"
        assert not (disk / "probe" / "probe_init.csv").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
