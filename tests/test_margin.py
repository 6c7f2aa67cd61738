"""`stab margin`: bracketing + bisection on a synthetic stability function (no training), and one
small real margin search on the smoke preset through the CLI."""

from __future__ import annotations

import math

import pytest

from stability.margin import Probe, comparison, factor_ratios, find_margins, grid_size, promised_probes, replicate
from tests.conftest import SMOKE, read_json

LO, HI, TOL = 1e-3, 1e-1, 1.5


def synthetic(boundaries: dict[str, float], calls: list[list[tuple[str, float]]] | None = None):
    """A probe whose configuration c is stable exactly up to boundaries[c]."""

    def probe(batch: list[tuple[str, float]]) -> list[Probe]:
        if calls is not None:
            calls.append(batch)
        return [Probe(lr, stable=lr <= boundaries[c]) for c, lr in batch]

    return probe


@pytest.mark.parametrize("boundary", [1.05e-3, 3.3e-3, 0.0123, 0.05, 0.0999])
def test_bisection_brackets_the_boundary_within_tolerance_in_the_promised_probes(boundary):
    m = find_margins(["a"], synthetic({"a": boundary}), LO, HI, TOL, steps=10)["a"]
    assert m.status == "found"
    assert m.stable_lr <= boundary < m.unstable_lr
    assert m.unstable_lr / m.stable_lr <= TOL
    K = grid_size(LO, HI, TOL)
    assert 2 + math.floor(math.log2(K)) <= len(m.probes) <= promised_probes(LO, HI, TOL) == 2 + math.ceil(math.log2(K))
    assert len(m.probes) < grid_size(LO, HI, TOL) + 1  # fewer than an exhaustive grid of the same resolution


def test_configurations_advance_together_one_probe_each_per_round():
    calls: list[list[tuple[str, float]]] = []
    margins = find_margins(
        ["norm=pre", "norm=post"], synthetic({"norm=pre": 0.04, "norm=post": 0.004}, calls), LO, HI, TOL, steps=10
    )
    assert [len(c) for c in calls][0] == 4 and all(len(c) <= 2 for c in calls[1:])
    assert len(calls) <= promised_probes(LO, HI, TOL) - 1  # rounds: the two ends together, then one probe each
    assert all(len({c for c, _ in batch}) == len(batch) // (2 if i == 0 else 1) for i, batch in enumerate(calls))
    pre, post = margins["norm=pre"].stable_lr, margins["norm=post"].stable_lr
    assert 0.04 / TOL <= pre <= 0.04 and 0.004 / TOL <= post <= 0.004
    assert factor_ratios(margins) == [f"norm: margin at pre / at post = {pre / post:.3g}x"]
    assert comparison(margins) == (
        f"norm=pre is stable up to {pre / post:.3g}x the learning rate of norm=post ({pre:.3g} vs {post:.3g})"
        "; one seed per probe: untested (seed=0,1,2 replicates every probe; a learning rate then fails when any "
        "seed is unstable)"
    )
    # with seeds behind every probe the sentence says how many
    three = find_margins(
        ["norm=pre", "norm=post"],
        lambda batch: [replicate(p.lr, [p] * 3) for p in synthetic({"norm=pre": 0.04, "norm=post": 0.004})(batch)],
        LO,
        HI,
        TOL,
        steps=10,
    )
    assert comparison(three).endswith("; 3 seeds per probe, a learning rate failing when any seed is unstable")


def test_a_boundary_outside_the_bracket_is_found_by_widening_and_reported_as_such():
    up = find_margins(["a"], synthetic({"a": 0.7}), LO, HI, TOL, steps=10)["a"]
    assert up.status == "found" and up.stable_lr <= 0.7 < up.unstable_lr
    assert len(up.probes) <= promised_probes(LO, HI, TOL) + 1  # one widening probe (at lr 10)
    assert 10.0 in [p.lr for p in up.probes]
    never = find_margins(["a"], synthetic({"a": 100.0}), LO, HI, TOL, steps=10)["a"]
    assert never.status == "above" and never.stable_lr == 10.0 and never.text == ">= 10"
    down = find_margins(["a"], synthetic({"a": 2e-5}), LO, HI, TOL, steps=10)["a"]
    assert down.status == "found" and down.stable_lr <= 2e-5 < down.unstable_lr
    short = find_margins(["a"], synthetic({"a": 1e-9}), LO, HI, TOL, steps=3)["a"]
    assert short.status == "below" and short.stable_lr is None and len(short.probes) == 3


def test_a_budget_too_small_to_finish_says_so():
    m = find_margins(["a"], synthetic({"a": 0.0123}), LO, HI, TOL, steps=4)["a"]
    assert m.status == "budget" and len(m.probes) == 4 and m.stable_lr <= 0.0123 < m.unstable_lr


def band(stable_below: float, fail_from: float, fail_to: float):
    """Stable below `stable_below`, unstable in [fail_from, fail_to), stable again above: the issue's
    post-norm + qk-norm char LM (failing at 0.03-0.3, `stable` at 1 once divergence was mislabelled)."""

    def probe(batch):
        return [Probe(lr, stable=lr < stable_below or not fail_from <= lr < fail_to) for _, lr in batch]

    return probe


def test_non_monotone_stability_reports_the_lowest_failing_lr_and_says_so():
    # unstable at lo, stable at hi: widen downwards and bisect below the LOWEST failing lr, never between
    odd = find_margins(["a"], band(3e-4, 3e-4, 0.05), LO, HI, TOL, steps=10)["a"]
    assert odd.status == "non_monotone" and odd.stable_above == [HI]
    assert (
        odd.stable_lr is not None and odd.stable_lr < 3e-4 <= odd.unstable_lr and odd.unstable_lr / odd.stable_lr <= TOL
    )
    assert "non-monotone" in odd.text and "stable again at 0.1" in odd.text

    # failing in [0.006, 0.02), stable again in [0.02, 0.05), failing above: the bisection's probe at 0.01 fails
    # first, so the margin is the boundary below the hole, as a fixed grid of the same resolution finds it
    def islands(batch):
        return [Probe(lr, stable=lr < 0.006 or 0.02 <= lr < 0.05) for _, lr in batch]

    hole = find_margins(["a"], islands, LO, HI, TOL, steps=10)["a"]
    K = grid_size(LO, HI, TOL)
    grid = [float(f"{LO * (HI / LO) ** (k / K):.3g}") for k in range(K + 1)]
    verdicts = islands([("a", lr) for lr in grid])
    lowest_failing = min(p.lr for p in verdicts if not p.stable)
    assert hole.unstable_lr == lowest_failing and hole.stable_lr == max(p.lr for p in verdicts if p.lr < lowest_failing)


def test_a_margin_that_rests_on_a_borderline_probe_says_so():
    from stability.margin import borderline_text, markdown, probe_text, result

    def probe(batch):  # stable up to 0.0123; the first unstable probe barely diverged (final loss within the band)
        return [
            Probe(lr, stable=lr <= 0.0123, verdict="stable" if lr <= 0.0123 else "diverged", borderline=["final loss"])
            if 0.0123 < lr < 0.02
            else Probe(lr, stable=lr <= 0.0123, verdict="stable" if lr <= 0.0123 else "diverged")
            for _, lr in batch
        ]

    m = find_margins(["a"], probe, LO, HI, TOL, steps=10)
    edge = next(p for p in m["a"].probes if p.lr == m["a"].unstable_lr)
    assert edge.borderline == ["final loss"] and m["a"].unstable_lr < 0.02
    text = borderline_text(m["a"])
    assert f"borderline probe at lr {m['a'].unstable_lr:.3g} (unstable; final loss)" in text
    res = result(m, LO, HI, TOL, 1.0, 1)
    assert res["borderline"] == [text] and text in markdown(res)
    shown = [probe_text(p) for p in res["configs"][0]["probes"]]
    assert [t for t in shown if "borderline" in t] == [f"{m['a'].unstable_lr:.3g} diverged (borderline: final loss)"]
    # a borderline probe away from the margin does not put it in doubt
    far = find_margins(["a"], synthetic({"a": 0.0123}), LO, HI, TOL, steps=10)["a"]
    far.probes[0].borderline = ["collapse"]
    assert far.probes[0].lr not in (far.stable_lr, far.unstable_lr) and borderline_text(far) == ""
    # an inconclusive probe at the margin (undertrained) is not called stable
    edge = next(p for p in far.probes if p.lr == far.stable_lr)
    edge.verdict = "inconclusive"
    text = borderline_text(far)
    assert f"the largest lr not found unstable, {far.stable_lr:.3g}, is inconclusive, not judged stable" in text
    edge.verdict, edge.borderline = "stable", ["undertrained"]  # stable, output still collapsed, loss falling
    text = borderline_text(far)
    assert f"{far.stable_lr:.3g}, is undertrained, not judged stable" in text and "within detect.band" not in text


def test_bad_brackets_are_refused():
    with pytest.raises(ValueError, match=r"margin.lo"):
        find_margins(["a"], synthetic({"a": 1}), 0.1, 0.01, TOL, 10)
    with pytest.raises(ValueError, match=r"margin.tolerance"):
        find_margins(["a"], synthetic({"a": 1}), LO, HI, 1.0, 10)


@pytest.mark.slow
def test_stab_margin_on_the_smoke_preset_probes_real_runs_and_resumes_without_training_again(cli, tmp_path):
    args = [
        "margin",
        *SMOKE,
        "norm=pre,post",
        "train.epochs=3",
        "margin.lo=0.01",
        "margin.hi=1",
        "margin.tolerance=10",
        "--runs",
        tmp_path,
        "--name",
        "m",
    ]
    result = cli(*args)
    res = read_json(tmp_path / "m" / "margin.json")
    assert res["grid_steps"] == 2 and [c["config"] for c in res["configs"]] == ["norm=pre", "norm=post"]
    for c in res["configs"]:
        assert 2 <= len(c["probes"]) <= promised_probes(0.01, 1, 10) == 3
        for p in c["probes"]:  # each probe is a run folder whose own summary holds the verdict reported
            folder = tmp_path / "m" / p["folder"]
            assert read_json(folder / "summary.json")["verdict"] == p["verdict"]
            # spelt as `stab sweep` spells the same job (Hydra's sweeper: True), so a sweep finds it
            assert f"train.lr={p['lr']:g}" in p["folder"] and "train.stop_early=True" in p["folder"]
        stable = [p["lr"] for p in c["probes"] if p["stable"]]
        unstable = [p["lr"] for p in c["probes"] if not p["stable"]]
        if c["status"] == "non_monotone":  # the smoke model can fail at a low lr and pass at a higher one:
            assert min(unstable) < max(stable)  # then it is said so, not bisected
            continue
        assert c["margin"] == (max(stable) if stable else None)
        assert all(u > c["margin"] for u in unstable) if stable else True
    assert res["cost"]["probes"] == sum(len(c["probes"]) for c in res["configs"])
    assert res["sentence"] in result.output and (tmp_path / "m" / "margin.md").exists()
    finished = {p: read_json(p)["finished"] for p in (tmp_path / "m").glob("*/status.json")}
    cli(*args)  # the same search again: every probe is found completed, none trains twice
    assert {p: read_json(p)["finished"] for p in (tmp_path / "m").glob("*/status.json")} == finished
    assert read_json(tmp_path / "m" / "margin.json")["configs"] == res["configs"]


def test_margin_refuses_a_learning_rate_and_bad_margin_keys_before_any_run(cli, tmp_path):
    r = cli("margin", *SMOKE, "train.lr=0.1", "--runs", tmp_path, ok=False)
    assert r.exit_code == 2 and "train.lr is not allowed here" in r.output
    r = cli("margin", *SMOKE, "margin.hi=0.0001", "--runs", tmp_path, ok=False)
    assert r.exit_code == 2 and "margin.hi" in r.output
    assert not any(tmp_path.rglob("status.json"))


def test_a_probe_stops_early_only_once_its_verdict_cannot_become_stable():
    from stability.detectors.series import certainly_unstable, explosion

    assert certainly_unstable([1.0, 3.0, 9.5], None, 2.0, 3)  # a full 3-epoch window growing 3.1x per epoch
    assert certainly_unstable([1.0, 3.0], None, 2.0, 3) is None  # a 2-epoch window can still be diluted
    assert certainly_unstable([1.0, 1.1, 1.2, 1.1], None, 2.0, 3) is None
    assert certainly_unstable([1.0], {"step": 4}, 2.0, 3) == "first non-finite value at step 4"
    history = [1.0, 3.0, 9.5, 0.5, 0.4, 0.4, 0.3]  # grows, then collapses: still exploding at the end
    for n in range(1, len(history) + 1):
        if certainly_unstable(history[:n], None, 2.0, 3):
            assert explosion(history, 2.0, 3)[0] is not None


GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # margin.lo=1e-3, margin.hi=10, margin.tolerance=10: the same points


@pytest.mark.slow
@pytest.mark.parametrize("preset", [("model=charlm", "preset=smoke"), ("preset=smoke",)], ids=["charlm", "cascade"])
def test_margin_agrees_with_a_fixed_log_grid_of_learning_rates_on_the_smoke_presets(cli, tmp_path, preset):
    """Issue 24, item 4: margin's answer (largest stable lr below the lowest failing one) is the
    fixed grid's, or margin says the grid is non-monotone and names the lowest failing lr. The
    grid is a sweep into margin's own folder: margin's probes are the same runs (same identity,
    found completed), the points it skipped are trained by the sweep."""
    import re

    from stability.record import verdicts as vd

    bracket = ["margin.lo=0.001", "margin.hi=10", "margin.tolerance=10"]
    cli("margin", *preset, "norm=pre", *bracket, "--runs", tmp_path, "--name", "m")
    (c,) = read_json(tmp_path / "m" / "margin.json")["configs"]
    lrs = ",".join(f"{x:g}" for x in GRID)
    cli("sweep", *preset, "norm=pre", f"train.lr={lrs}", "train.stop_early=true", "--runs", tmp_path, "--name", "m")
    grid = {}
    for s in (tmp_path / "m").glob("*/summary.json"):
        lr = float(re.search(r"train\.lr=([^,]+)", s.parent.name)[1])
        assert lr not in grid, f"lr {lr:g} trained twice (margin's probe and the sweep's job): {s.parent.name}"
        grid[lr] = read_json(s)["verdict"]
    assert set(GRID) <= set(grid)
    for p in c["probes"]:  # margin's probes are the grid's runs at those points
        assert grid[p["lr"]] == p["verdict"], (p, grid)
    failing = [lr for lr in GRID if vd.is_unstable(grid[lr])]
    lowest = min(failing, default=None)
    answer = max((lr for lr in GRID if lowest is None or lr < lowest), default=None)
    assert c["margin"] == answer and c["unstable_lr"] == lowest, (c["text"], grid)
    non_monotone = lowest is not None and any(not vd.is_unstable(grid[lr]) for lr in GRID if lr > lowest)
    if c["status"] == "non_monotone":  # said only when true, with the lowest failing lr
        assert non_monotone and f"unstable at {lowest:.3g}" in c["text"]
