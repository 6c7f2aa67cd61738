"""Commands that help instead of refusing (issue 15, kind 5): an inspect inspects a folder too
short for the default split and says by how much; typos get `did you mean`; a space-separated
list gets the comma syntax, for `stab run`, `stab sweep` and `stab data inspect` alike."""

from __future__ import annotations

import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import SMOKE
from tests.test_audio import write_pair


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_inspect_of_a_folder_too_short_for_the_default_split_inspects_and_says_by_how_much(cli, tmp_path):
    for n in ("a", "b", "c"):
        write_pair(tmp_path, n, 16_000, 1, seconds=2.5)  # 1 segment of 2 s each: 3 < n_val 8 + 1
    out = " ".join(cli("data", "inspect", "data=folder", f"data.path={tmp_path}").output.split())
    assert "warning:" in out and "fewer than data.n_val=8" in out
    assert "6 segment(s) short, at least 12 s more audio" in out
    assert "Inspecting with data.n_val=2" in out
    assert "segments: 1 train + 2 validation of 2 s" in out and "RVQ code usage" in out
    run = cli("run", "data=folder", f"data.path={tmp_path}", ok=False)  # a run still refuses, saying the same
    assert "6 segment(s) short, at least 12 s more audio" in one_line(run)


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(
    "args, expected",
    [
        (["residul=0.1,0.3"], "unknown key 'residul'"),
        (["residul=0.1"], "did you mean residual?"),
        (["train.lrr=1e-3"], "did you mean train.lr?"),
        (["trian.lr=1e-3"], "did you mean train.lr?"),
        (["model=charlm", "model.nlayers=3"], "did you mean model.n_layers?"),
        (["model=charlmm"], "did you mean charlm?"),
        (["preset=smok"], "did you mean smoke?"),
        (["experiment=seed_fixx"], "did you mean seed_fix?"),
        (["norm=prre"], "did you mean pre?"),
    ],
)
def test_typos_get_did_you_mean(cli, command, args, expected):
    line = one_line(cli(command, *args, ok=False))
    assert expected in line
    if args == ["residul=0.1,0.3"]:
        assert "did you mean residual?" in line and "stab sweep residul" not in line


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("args", [["residual=0.1", "0.3"], ["residual=0.1,", "0.3"], [*SMOKE, "residual=0.1", "0.3"]])
def test_a_space_separated_list_gets_the_comma_syntax(cli, command, args):
    line = one_line(cli(command, *args, ok=False))
    assert "residual=0.1,0.3" in line and "EQUAL" not in line


def test_a_bare_key_and_a_misspelt_launcher_get_suggestions(cli):
    assert "did you mean residual=...?" in one_line(cli("run", *SMOKE, "resid", ok=False))
    assert "did you mean joblib?" in one_line(cli("sweep", "--launcher", "joblb", "residual=0.1", ok=False))


@pytest.mark.parametrize("arg", ["clip=-5", "clip=0", "clip=abc", "update_clip=-1", "update_clip=inf"])
def test_a_bad_threshold_says_none_is_allowed_too(cli, arg):
    """`clip` and `update_clip` take `none` or a positive number; every refusal names both."""
    key, value = arg.split("=")
    bad = cli("run", "preset=smoke", arg, ok=False)
    assert bad.exit_code == 2
    line = bad.output.strip()
    assert "\n" not in line and line.startswith(f"error: {key}=")
    assert "expected none or a positive number" in line, line


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(
    "args, allowed, near",
    [
        (["model=charlm", "preset=smok"], "expected one of default, gpu, smoke", "did you mean smoke?"),
        (["preset=gpuu"], "expected one of default, seed, smoke", None),  # the cascade refuses gpu
        (["preset=seedd"], "expected one of default, seed, smoke", "did you mean seed?"),
    ],
)
def test_a_misspelt_preset_gets_only_the_presets_the_chosen_model_takes(cli, command, args, allowed, near):
    """Issue 29.6: `preset=gpuu` suggested `gpu`, which the cascade then refuses; the char LM was
    offered `seed`, a cascade preset. The line lists the model's own presets, and suggests one only
    from those."""
    line = one_line(cli(command, *args, ok=False))
    model = "charlm" if "model=charlm" in args else "cascade"
    assert f"is not allowed with model={model}: {allowed}" in line, line
    assert (near in line) if near else ("did you mean" not in line), line
    listed = line.split("expected one of ", 1)[1].split(";")[0].split(" (")[0].split(", ")
    assert ("seed" if model == "charlm" else "gpu") not in listed, line


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_plus_on_a_key_that_exists_says_to_drop_the_plus(cli, command):
    """`+train.epochs=3` adds a key; train.epochs exists, so the fix is `train.epochs=3`, in one line
    (Hydra said "Could not append to config. An item is already at 'train.epochs'")."""
    line = one_line(cli(command, *SMOKE, "+train.epochs=3", ok=False))
    assert "train.epochs is already a key; set it without +: train.epochs=3" in line, line
    if command == "run":  # the value as typed (a sweep's jobs carry Hydra's normalised 0.001)
        assert "set it without +: train.lr=1e-3" in one_line(cli(command, *SMOKE, "+train.lr=1e-3", ok=False))


@pytest.mark.parametrize("name", ["it's here", "${oc.env:HOME}", "a=b [c] {d}", 'say "hi"'])
def test_a_path_key_takes_the_path_as_typed(cli, tmp_path, name):
    """Issue 29.1, the `key=value` side: a path given to data.path is data, never Hydra's grammar:
    an apostrophe used to get "quote it", `${...}` was resolved to another folder. Inspecting the
    folder reads the audio that is in it (one segment of 2 s per pair: 1 train + 2 validation)."""
    folder = tmp_path / name
    for n in ("a", "b", "c"):
        write_pair(folder, n, 16_000, 1, seconds=2.5)
    out = " ".join(cli("data", "inspect", "data=folder", f"data.path={folder}", "data.n_val=2").output.split())
    assert "segments: 1 train + 2 validation of 2 s" in out, out
    bad = cli("data", "inspect", "data=folder", f"data.path={tmp_path / 'missing' / name}", ok=False)
    assert str(tmp_path / "missing" / name) in one_line(bad)  # the path as typed, in the refusal too


@pytest.mark.parametrize(
    "command, flags, valued",
    [
        ([], ["--debug", "--help"], []),
        (["doctor"], ["--try", "--help"], ["--runs"]),
        (["show"], ["--plot", "--help"], []),
        (["bench"], ["--sweep", "--monitor", "--bookkeeping"], []),
        (["run"], ["--help"], ["--runs", "--nproc"]),
    ],
)
def test_help_shows_a_flag_as_a_flag_and_a_value_option_with_its_type(cli, command, flags, valued):
    """Issue 29.6: help printed `--debug <bool>` (and `--help <bool>`), as if the flag took a value;
    `--debug true` is an error. A flag's row has no type; an option that takes a value keeps it."""
    rows = {}
    for line in cli(*command, "--help").output.splitlines():
        words = line.strip("│ ").split()
        if words and words[0].startswith("--"):
            rows[words[0]] = words[1] if len(words) > 1 else ""
    for flag in flags:
        assert flag in rows and not rows[flag].startswith("<"), (flag, rows)
    for option in valued:
        assert rows[option].startswith("<"), (option, rows)


def copied(line: str, after: str, before: str = "") -> list[str]:
    """The words a POSIX shell makes of the command a hint prints (between `after` and `before`)."""
    text = line.split(after, 1)[1]
    return shlex.split(text.split(before, 1)[0] if before else text)


@pytest.mark.parametrize("value", ["it's", "it's a b", "don't $HOME", 'say "it\'s"'])
def test_a_quote_hint_pasted_into_a_shell_gives_hydra_the_value(cli, value):
    """Issue 29.6: `quote it: "key='it's'"` was itself unreadable by Hydra once pasted (and a `$`
    was expanded by the shell). The hint, split as a shell splits it, is one override whose value
    Hydra reads back as typed."""
    line = one_line(cli("run", *SMOKE, f"fault.nan_module={value}", ok=False))
    (override,) = copied(line, "quote it: ")
    assert OverridesParser.create().parse_override(override).value() == value, line


def test_a_command_in_a_hint_is_quoted_for_the_shell(cli):
    """`stab run experiment=story` names the sweep to run instead: pasted, it gives each override
    back as one word, a value with spaces included."""
    line = one_line(cli("run", "experiment=story", "fault.nan_module=a b", ok=False))
    assert copied(line, "run it with `", "`") == ["stab", "sweep", "experiment=story", "fault.nan_module=a b"]


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(
    "args, expected",
    [  # a misspelt data option: only the data the model reads is offered
        (["model=charlm", "data=synthetc"], "data='synthetc' is not allowed with model=charlm: expected one of text"),
        (["data=txt"], "data='txt' is not allowed with model=cascade: expected one of folder, synthetic"),
        # data the model does not read, with a preset that sets the model's own data keys: the
        # mismatch is named, not the first preset key the other data lacks (data.max_chars)
        (
            ["model=charlm", "data=synthetic", *SMOKE],
            "data.name='synthetic' is not allowed: expected text with model=charlm",
        ),
        (
            ["model=cascade", "data=text", *SMOKE],
            "data.name='text' is not allowed: expected audio data with model=cascade",
        ),
    ],
)
def test_data_the_chosen_model_does_not_read_is_never_offered_and_is_named(cli, command, args, expected):
    """Issue 29.6, the kind of `preset=gpuu`: `model=charlm data=synthetc` suggested `synthetic`,
    which the char LM refuses; `model=charlm data=synthetic preset=smoke` said `unknown key
    'data.max_chars'`, a key the user never wrote."""
    line = one_line(cli(command, *args, ok=False))
    assert expected in line and "did you mean" not in line and "unknown key" not in line, line


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_short_name_the_model_does_not_read_names_the_experiment_that_set_it(cli, command):
    """`model=charlm experiment=seed_fix` said `residual=0.3 is not allowed with model=charlm`,
    a value the user never typed: the line names where it came from. A value the user typed is
    named as typed, without a source."""
    line = one_line(cli(command, "model=charlm", "experiment=seed_fix", ok=False))
    assert "residual=0.3 (set by experiment=seed_fix) is not allowed with model=charlm" in line, line
    typed = one_line(cli(command, "model=charlm", "experiment=seed_fix", "residual=0.2", ok=False))
    assert "residual=0.2 is not allowed with model=charlm" in typed and "set by" not in typed, typed


def test_a_missing_snapshot_to_rewind_from_is_refused_before_the_run_folder_is_made(cli, tmp_path, monkeypatch):
    """`train.rewind_from=/no/such.pt` made a run folder, then crashed (exit 1) when training
    opened the file; a `~/` path (now read as data) was never expanded by training. Both are one
    line before any work, and nothing is written."""
    runs = tmp_path / "runs"
    line = one_line(cli("run", *SMOKE, f"train.rewind_from={tmp_path / 'no such.pt'}", "--runs", runs, ok=False))
    assert f"train.rewind_from='{tmp_path / 'no such.pt'}': no such file; expected a snapshot file" in line, line
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "snap.pt").write_bytes(b"")
    line = one_line(cli("run", *SMOKE, "train.rewind_from=~/snap.pt", "--runs", runs, ok=False))
    assert f"~ is not expanded here; write the full path: {tmp_path / 'snap.pt'}" in line, line
    assert list(runs.rglob("*")) == []  # no run folder, no file (--runs itself is checked writable)


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_cache_dir_that_is_a_file_is_refused_before_the_run_folder_is_made(cli, tmp_path, below):
    """`data.cache_dir=FILE` (or a folder under a file) made a run folder, then failed when the
    first latent was written (`cannot write FILE/latents: not a directory`). It is one line
    before any work, naming the file."""
    (tmp_path / "afile").write_text("mine\n")
    value = tmp_path / "afile" / below if below else tmp_path / "afile"
    runs = tmp_path / "runs"
    line = one_line(cli("run", *SMOKE, f"data.cache_dir={value}", "--runs", runs, ok=False))
    assert f"data.cache_dir='{value}': not a folder" in line, line
    assert (f"({tmp_path / 'afile'} is a file)" in line) == bool(below), line
    assert list(runs.rglob("*")) == [] and (tmp_path / "afile").read_text() == "mine\n"
