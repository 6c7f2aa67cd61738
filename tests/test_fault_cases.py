"""Issue 29, the cases left open in round 4: a folder argument that does not exist or is a file
is named as such, in one line, by every command that reads one, and a folder option that names a
file is refused before anything is printed; a joblib sweep whose stdout closes leaves no folder
and no warning of joblib's behind; a second report into a folder waits for the first; sweep.json
lists every job in its folder, whichever launch made it. Each test fails on 68a92a6."""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SMOKE, Cli, read_json
from tests.test_faults import CEILING_S, ROOT, STAB, closed_pipe_run

RUN = "a run folder, e.g. runs/run/<folder> or runs/<sweep>/<job>"
RUNS_DIR = "a folder holding run folders or sweeps"
EXPORTED = "a run folder or a folder of them"

# --- a folder argument that is missing or a file ------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (["replay"], RUN),
        (["show"], RUN),
        (["doctor"], RUN),
        (["doctor", "--try"], RUN),
        (["report"], RUNS_DIR),
        (["export", "--to", "tensorboard"], EXPORTED),
    ],
    ids=["replay", "show", "doctor", "doctor-try", "report", "export"],
)
@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_folder_argument_that_is_missing_or_a_file_is_named_as_such(tmp_path, command, expected, make):
    target = tmp_path / "runs" / "x"
    if make == "file":
        target.parent.mkdir()
        target.write_text("not a folder")
    result = Cli()(*command, target, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    what = "no such folder" if make == "missing" else "is a file, not a folder"
    assert line == f"error: {target}: {what}; pass {expected}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["runs", "x"] if make == "file" else [])


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """A real char-LM smoke run with a NaN planted at step 3: RUNS/run/<folder>."""
    runs = tmp_path_factory.mktemp("runs")
    Cli()("run", "--runs", runs, "model=charlm", *SMOKE, "train.threads=1", "train.epochs=1",
          "fault.nan_at_step=3", "fault.nan_module=layer0.mlp")  # fmt: skip
    (run,) = (runs / "run").iterdir()
    assert read_json(run / "summary.json")["verdict"] == "nan"
    return run


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{run}", "--to", "lightning", "--out", "{file}"],
        ["doctor", "{run}", "--try", "--runs", "{file}"],
        ["margin", "--runs", "{file}", "model=charlm", *SMOKE],
    ],
    ids=["export-out", "doctor-try-runs", "margin-runs"],
)
def test_a_folder_option_that_is_a_file_is_one_line_before_anything_is_printed(tmp_path, nan_run, command):
    """export --to lightning --out FILE was a NotADirectoryError traceback; doctor --try printed
    its whole diagnosis and margin its plan before saying --runs is a file."""
    file = tmp_path / "file"
    file.write_text("not a folder")
    result = Cli()(*[a.format(run=nan_run, file=file) for a in command], ok=False)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    option = command[command.index("{file}") - 1]
    assert line == f"error: {option} {str(file)!r} is a file, not a folder: pass a folder (it is created if missing)"
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["ls", "clear"])
@pytest.mark.parametrize("how", ["--dir", "STAB_CACHE"])
def test_a_cache_folder_that_is_a_file_is_refused_in_one_line(tmp_path, monkeypatch, command, how):
    """`stab cache ls --dir FILE` said "no cache entries in FILE", exit 0, and `clear` "removed 0
    entries": a file is no cache folder."""
    file = tmp_path / "cache"
    file.write_text("not a folder")
    monkeypatch.setenv("STAB_CACHE", str(file if how == "STAB_CACHE" else tmp_path / "unused"))
    result = Cli()("cache", command, *(["--dir", file] if how == "--dir" else []), ok=False)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {how} {str(file)!r} is a file, not a folder: pass a folder (it is created if missing)"
    assert file.read_text() == "not a folder"


# --- a closed stdout under the joblib launcher -----------------------------------------------


@pytest.mark.slow
def test_a_joblib_sweep_whose_stdout_closes_ends_without_leaking_joblibs_folders(tmp_path):
    """stab ended itself by SIGPIPE before the exit handlers ran: joblib's memmapping folders were
    left to loky's resource tracker, which printed a raw `UserWarning: resource_tracker: There
    appear to be 2 leaked folder objects` after stab had gone."""
    shm = tmp_path / "shm"  # where joblib makes its memmapping folders (default /dev/shm)
    shm.mkdir()
    cut = closed_pipe_run(
        "sweep", "--runs", str(tmp_path), "--name", "grid", "--launcher", "joblib", "--jobs", "2",
        *SMOKE, "train.epochs=1", "residual=0.1,0.3",
        env={"JOBLIB_TEMP_FOLDER": str(shm)},
    )  # fmt: skip
    assert cut.returncode == -signal.SIGPIPE, cut.stderr  # 141 in a shell, as `seq 1 100000 | head -1`
    assert "leaked" not in cut.stderr and "Warning" not in cut.stderr, cut.stderr
    assert list(shm.iterdir()) == []  # joblib removed its own folders (stderr's EOF waits for the tracker)
    index = read_json(tmp_path / "grid" / "sweep.json")
    assert (index["launcher"], index["state"]) == ("joblib", "completed")
    assert [j["state"] for j in index["jobs"]] == ["completed", "completed"]
    for j in index["jobs"]:
        summary = read_json(tmp_path / "grid" / j["folder"] / "summary.json")
        assert summary["verdict"] == j["verdict"] and summary["epochs_run"] == 1


# --- two `stab report` into one folder at once ------------------------------------------------


def test_a_second_report_into_the_same_folder_waits_for_the_first(cli, tmp_path):
    """Two reports into one folder interleaved their files and the manifest, so that the next
    report could refuse a file as "changed since". The second now waits on the first's
    OUT/.stab-report.lock. Made deterministic without a clock: the first report's manifest is a
    FIFO, so the first blocks inside its check of the folder (holding the lock) until this test
    writes the manifest into it, and the test does that only after the second has said it waits."""
    runs = tmp_path / "runs"
    cli("run", "--runs", runs, "model=charlm", *SMOKE, "train.threads=1", "train.epochs=1")
    cli("report", runs)  # the files and their manifest, as a first report leaves them
    manifest = runs / ".stab-report.json"
    text = manifest.read_text()
    manifest.unlink()
    os.mkfifo(manifest)

    def report() -> subprocess.Popen:
        return subprocess.Popen(
            [*STAB, "report", str(runs)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    first = report()
    with open(manifest, "w") as fifo:  # opens once the first report opens it to read: it is checking
        second = report()
        said = select.select([second.stderr], [], [], CEILING_S)[0]  # a ceiling, not a timing
        line = second.stderr.readline() if said else ""
        fifo.write(text)  # the first report reads its manifest and goes on
    first_err = first.communicate(timeout=CEILING_S)[1]
    second_err = line + second.communicate(timeout=CEILING_S)[1]
    assert first.returncode == 0 and first_err == "", first_err
    assert second.returncode == 0, second_err
    assert re.fullmatch(
        rf"warning: {re.escape(str(runs))}: another stab report \(pid {first.pid} on .+, since \d\d:\d\d:\d\d\) "
        r"is writing there; waiting for it to end",
        line.strip(),
    ), second_err
    assert second_err.strip() == line.strip()  # that one line, nothing else
    written = read_json(manifest)
    assert written["writing"] is False and "report.md" in written["files"]
    for rel, digest in written["files"].items():  # the manifest is in step with every file
        assert hashlib.sha256((runs / rel).read_bytes()).hexdigest() == digest, rel
    cli("report", runs)  # and the next report finds every file its own


@pytest.mark.parametrize("command", ["replay", "show"])
def test_a_folder_that_holds_runs_names_them_instead_of_only_refusing(nan_run, command):
    # a newcomer passes the runs folder (RUNS/run) where a run folder is expected
    result = Cli()(command, nan_run.parent, ok=False)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {nan_run.parent}: not a run folder (no ")
    assert line.endswith(f"; run folders in it: {nan_run}")


# --- sweep.json lists every job in its folder -------------------------------------------------

CHARLM = ["model=charlm", *SMOKE, "train.threads=1", "train.epochs=1"]


def _index_matches_the_folder(sweep: Path) -> dict[str, dict]:
    """sweep.json's jobs, by folder, after checking they are exactly the job folders on disk and
    that each job's record says what its own folder says."""
    index = read_json(sweep / "sweep.json")
    jobs = {j["folder"]: j for j in index["jobs"]}
    assert len(jobs) == len(index["jobs"])  # each folder once
    assert sorted(jobs) == sorted(p.parent.name for p in sweep.glob("*/status.json"))
    for folder, j in jobs.items():
        assert j["state"] == read_json(sweep / folder / "status.json")["state"] == "completed"
        assert j["verdict"] == read_json(sweep / folder / "summary.json")["verdict"]
        assert read_json(sweep / folder / "overrides.json")["overrides"] == j["overrides"]
    return jobs


def test_margins_sweep_json_lists_the_probes_of_every_round(cli, tmp_path):
    """stab margin launches one round of probes at a time into one folder; sweep.json listed only
    the last round's (one job beside three probe folders)."""
    cli("margin", "--runs", tmp_path, "--name", "m", *CHARLM, "margin.steps=3")
    res = read_json(tmp_path / "m" / "margin.json")
    probes = [p for c in res["configs"] for p in c["probes"]]
    assert len({p["round"] for p in probes}) >= 2  # more than one launch
    jobs = _index_matches_the_folder(tmp_path / "m")
    assert sorted(jobs) == sorted(p["folder"] for p in probes)
    for p in probes:
        assert f"train.lr={p['lr']:g}" in jobs[p["folder"]]["overrides"]
    assert read_json(tmp_path / "m" / "sweep.json")["state"] == "completed"


def test_a_sweep_run_again_with_another_value_keeps_the_earlier_job_in_sweep_json(cli, tmp_path):
    """The same --name with another grid adds jobs to the folder (its report counts them all);
    sweep.json listed only the last command's."""
    cli("sweep", "--runs", tmp_path, "--name", "g", *CHARLM, "seed=1")
    cli("sweep", "--runs", tmp_path, "--name", "g", *CHARLM, "seed=2")
    jobs = _index_matches_the_folder(tmp_path / "g")
    assert sorted(o for j in jobs.values() for o in j["overrides"] if o.startswith("seed=")) == ["seed=1", "seed=2"]
