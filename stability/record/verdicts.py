"""The verdict vocabulary, defined once: the names a run's verdict can take, their severity order,
which of them count as "unstable", and how each is shown.

A run's verdict is the most severe of its findings (`detectors.verdict.diagnose`); the report counts the
unstable ones per factor value, `stab doctor` looks for a fix of an unstable run, `stab margin`
calls a probe stable when its verdict is not unstable, the terminal colours them.
Every one of those reads this table: a new verdict is one row here (its place in the tuple is its
severity), plus the detector that finds it.

    from stability.record import verdicts as vd
    vd.worst(["scream", "exploding"])   # 'exploding'
    vd.is_unstable("scream")            # True
    vd.ORDER                            # ('stable', 'scream', 'exploding', 'nan', 'failed'): report columns
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """One verdict. `unstable`: it counts as unstable (the report's answer, what a doctor's fix
    should remove, a margin probe above the margin); `judged`: training was judged at all (a crash
    was not); `style`: its Rich style in the terminal."""

    name: str
    unstable: bool
    judged: bool
    style: str
    meaning: str


# Most severe first; a run's verdict is the first of these among its findings. A crash (failed)
# is set by the runner before any detector; a NaN ends the measurement; an explosion explains a
# collapse or a divergence that comes with it, so it outranks both; a run that ended above its
# initial loss (diverged) failed whatever its output looks like, so it outranks the scream; a run
# too short to judge (inconclusive) is only "not found unstable": after the unstable ones, before
# stable. The report counts inconclusive runs apart (never in a test).
KINDS: tuple[Verdict, ...] = (
    Verdict(
        "failed",
        unstable=False,
        judged=False,
        style="bold white on red",
        meaning="the run crashed: status.json holds the error",
    ),
    Verdict("nan", unstable=True, judged=True, style="bold red", meaning="a loss or gradient went non-finite"),
    Verdict(
        "exploding",
        unstable=True,
        judged=True,
        style="yellow",
        meaning="the grad norm grew geometrically over epochs, or one step's was huge against the run's median",
    ),
    Verdict(
        "diverged",
        unstable=True,
        judged=True,
        style="red",
        meaning="the last validation loss ended above the validation loss at initialisation (or the "
        "no-learning baseline): the run ended worse than it started",
    ),
    Verdict(
        "scream",
        unstable=True,
        judged=True,
        style="magenta",
        meaning="the output collapsed to repeated tokens for at least detect.scream.min_epochs epochs",
    ),
    Verdict(
        "inconclusive",
        unstable=False,
        judged=True,
        style="dim",
        meaning="nothing unstable found, but the run is too short for the detectors, or its output stayed "
        "collapsed while its loss still fell (undertrained or a scream: cannot tell): not called stable",
    ),
    Verdict("stable", unstable=False, judged=True, style="green", meaning="none of the above"),
)

BY_NAME = {k.name: k for k in KINDS}
SEVERITY = tuple(k.name for k in KINDS)  # most severe first
ORDER = SEVERITY[::-1]  # least to most broken: the report's columns and lists
UNSTABLE = tuple(k.name for k in KINDS if k.unstable)  # in severity order
STABLE, FAILED, NAN, EXPLODING, SCREAM = "stable", "failed", "nan", "exploding", "scream"
DIVERGED, INCONCLUSIVE = "diverged", "inconclusive"


def severity(name: str) -> int:
    """Rank of a verdict, 0 = most severe; an unknown name ranks after every known one."""
    return SEVERITY.index(name) if name in BY_NAME else len(SEVERITY)


def worst(names: Iterable[str], default: str = STABLE) -> str:
    """The most severe of `names` (`default` when there are none)."""
    return min(names, key=severity, default=default)


def is_unstable(name: str | None) -> bool:
    """True for a verdict that counts as unstable; False for stable, failed, None or an unknown name."""
    return name in BY_NAME and BY_NAME[name].unstable


def is_judged(name: str | None) -> bool:
    """True for a verdict about the training itself (not failed, not None, not an unknown name)."""
    return name in BY_NAME and BY_NAME[name].judged


def style(name: str, default: str = "white") -> str:
    """The Rich style of a verdict in the terminal."""
    return BY_NAME[name].style if name in BY_NAME else default


# Which verdict each borderline finding's threshold decides (`detectors.verdict.diagnose`'s `borderline`
# entries, by their `what`): a value near that threshold can only move a run across that verdict.
BORDERLINE_DECIDES = {
    "grad norm growth": "exploding",
    "final loss": "diverged",
    "collapse": "scream",
    "still learning": "scream",
}


def in_doubt(name: str | None, borderline: Iterable[dict] | None, flags: Iterable[dict] | None = None) -> list[dict]:
    """The borderline findings that could change the verdict `name`: those whose threshold decides
    that verdict or a more severe one. A value near the divergence threshold leaves a `nan` or
    `exploding` run as it is (either outranks `diverged`), but makes a `diverged`, `scream` or
    `stable` run uncertain. A finding of an unknown kind is kept (counted as doubt).

    With the run's `flags` (summary.json's), an unstable run none of whose doubts can make it
    stable is not in doubt: an `exploding` run whose growth sits near its threshold but whose loss
    ended 373x above its start is `diverged` without it, unstable either way. The verdict's name may
    move; whether the run counts as unstable does not.

        in_doubt("nan", [{"what": "final loss"}])      # []: a NaN is a NaN
        in_doubt("stable", [{"what": "final loss"}])   # [{"what": "final loss"}]
        in_doubt("exploding", [{"what": "grad norm growth"}],
                 [{"flag": "exploding"}, {"flag": "diverged"}])   # []: diverged without it
    """
    if name not in BY_NAME:
        return []
    rank = SEVERITY.index(name)
    doubts = [
        b
        for b in borderline or []
        if (decides := BORDERLINE_DECIDES.get(str(b.get("what")))) is None or SEVERITY.index(decides) <= rank
    ]
    if doubts and flags is not None and is_unstable(name):
        shaky = {BORDERLINE_DECIDES.get(str(b.get("what"))) for b in doubts}
        if None not in shaky and any(is_unstable(f.get("flag")) and f.get("flag") not in shaky for f in flags):
            return []  # another unstable finding stands whatever the borderline values do
    return doubts
