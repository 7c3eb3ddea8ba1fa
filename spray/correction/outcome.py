"""Whether a correction fixed the flag: one verdict for the page, ``report.json`` and the CLI.

A correction is **fixed** only when all of these hold:

* it recovers at least ``[correct] goal_recovered`` (default 0.8) of the attacked-accuracy
  loss (the attacked set: the artifact stamped on held-out images of the other classes);
* it costs at most ``[correct] max_clean_loss`` (default 0.005, half a point) of clean
  accuracy on the held-out images;
* the re-audit of the corrected model no longer finds the flag. The re-audit is the final
  word: a correction that moves the numbers but leaves the strategy in place is not a fix;
* the flagged members that no step of the correction saw, where they are other classes'
  objects whose prediction rests on their evidence, are released from the class as often as
  the goal asks (:mod:`spray.correction.unseen`): not beyond chance below
  ``goal_recovered``. They carry the artifact as it was made, where the attacked set holds
  what the audit's evidence holds of it. Where the check does not apply (a co-occurrence, no
  unseen member), it judges nothing and says why.

Otherwise it is **not fixed**, and every unmet condition is named. When the numbers reach the
goal but the re-audit was switched off (``[correct] reaudit = false``), nothing confirmed that
the strategy is gone, and the verdict is **unverified**, never "fixed": a verdict is a promise.

**An attack too weak to test anything.** The recovered share judges a correction only if the
attacked set exercises the artifact in the original model. When it moves fewer than
``[correct] min_attack_moves`` (default 0.3) of the other classes' held-out images into the
flagged class (stamped less unstamped, before the correction) *and* raises their mean
probability of the class by less than ``[correct] min_attack_raise`` (default 0.2), its
accuracy loss is mostly what any pasted region costs (fragments of other objects), which no
correction undoes, and its recovery says nothing either way: the recovery is **not
checked**. The correction is then **unverified** unless another condition fails (those are
real failures: it is **not fixed**). The two bars are the held-out detection benchmark's own
definition of a model that relies on its artifact (stamping it moves at least 30 % of other
classes' images, or raises P(target) by at least 0.2), not tuned constants. The same holds
when the attack cost the original model no accuracy (nothing to recover) or the clean
accuracy could not be measured. On the dev split of ``bench/correction_q3.py`` the evidence
attack of 15 of the 40 relied-on cases moved fewer (5-29 %; 14 watermarks and a texture)
with nothing else failing; 10 of their corrections reach the goal on the true stamp, where
the weak attack had called them "not fixed" (``docs/correction.md``, "An attack too weak to
test"). An evidence attack's raise tracks its moves (within 0.08 on dev), so the second bar
decides little: two dev verdicts, one each way, and none on test draw 21.

``spray correct`` exits with 0 (fixed), 1 (not fixed) or 3 (unverified), the codes of
``spray check`` for clean, flagged and incomplete.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from spray.verdict import EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK

FIXED = "fixed"
NOT_FIXED = "not fixed"
UNVERIFIED = "unverified"

EXIT_CODES = {FIXED: EXIT_OK, NOT_FIXED: EXIT_FLAGGED, UNVERIFIED: EXIT_INCOMPLETE}
#: Accuracies are shares of counts: a loss of exactly the allowed points (one image in 200
#: for half a point) must not fail by float rounding (0.975 - 0.98 = -0.0050000000000000044).
ROUNDING = 1e-9


@dataclass(frozen=True)
class Outcome:
    """The verdict on one correction, the conditions it was judged by and what failed."""

    verdict: str
    goal_recovered: float
    max_clean_loss: float
    recovered: float | None
    clean_change: float | None
    flag_gone: bool | None
    unmet: list[str] = field(default_factory=list)
    #: What could not be checked (an attack too weak to test, an unmeasured share): never a pass
    unchecked: list[str] = field(default_factory=list)
    #: The share of the other classes' images the attacked set moved into the class before the
    #: correction (stamped less unstamped); None: not measured
    attack_moves: float | None = None
    #: The mean rise of their probability of the class that the attacked set gave them before the
    #: correction; None: not measured
    attack_raise: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"exit_code": self.exit_code}

    def describe(self) -> str:
        """One line for people: the verdict and why."""
        if self.verdict == FIXED:
            return (
                f"outcome: fixed (recovered {self.recovered:.1%} >= {self.goal_recovered:.0%}, clean accuracy "
                f"{_points(self.clean_change)}, the re-audit no longer finds the flag)"
            )
        if self.verdict == NOT_FIXED and self.unchecked:
            return "outcome: not fixed: " + "; ".join(self.unmet) + " (not checked: " + "; ".join(self.unchecked) + ")"
        return f"outcome: {self.verdict}: " + "; ".join([*self.unmet, *self.unchecked])


def _points(change: float | None) -> str:
    return "n/a" if change is None else f"{100 * change:+.1f} pt"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def unseen_miss(check: dict[str, Any] | None, goal_recovered: float) -> str | None:
    """Why the unseen members' ``check`` (:func:`spray.correction.unseen.unseen_members_check`)
    fails the goal: the upper end of its released share's 95 % interval is below
    ``goal_recovered``; None when it passes or did not apply."""
    if not check or not check.get("applies") or check.get("high") is None or check["high"] >= goal_recovered - ROUNDING:
        return None
    held = check["dependent"] - check["released"]
    return (
        f"the corrected model still gives the class to {held} of the {check['dependent']} flagged members held out of the "
        f"correction whose prediction rests on their evidence (released {check['rate']:.0%}, 95 % interval up to "
        f"{check['high']:.0%}, below the goal of {goal_recovered:.0%})"
    )


def weak_attack(
    attack_moves: float | None, min_attack_moves: float, recovered: float | None,
    attack_raise: float | None = None, min_attack_raise: float | None = None,
) -> str | None:
    """Why the attacked set cannot judge the recovery: before the correction it moved fewer
    than ``min_attack_moves`` of the other classes' images into the class, and raised their
    mean probability of the class by less than ``min_attack_raise`` (where both are given);
    None when it reached either bar, or the moves were not measured."""
    attack_moves, attack_raise = _finite(attack_moves), _finite(attack_raise)
    if attack_moves is None or attack_moves >= min_attack_moves - ROUNDING:
        return None
    raise_bar = attack_raise is not None and min_attack_raise is not None
    if raise_bar and attack_raise >= min_attack_raise - ROUNDING:
        return None
    measured = "" if recovered is None else f" (it recovered {recovered:.1%} of that attack's loss)"
    raised = f" and raised their probability of the class by only {attack_raise:.2f} (under {min_attack_raise:.2f})" if raise_bar else ""
    bars = "the bars" if raise_bar else "the bar"
    return (
        f"the attacked set moved only {attack_moves:.0%} of the other classes' held-out images into the class before the "
        f"correction (under {min_attack_moves:.0%}){raised}, {bars} that show a model relying on an artifact: it does not "
        f"exercise the artifact, so it cannot tell whether the correction fixed it{measured}; give [correct] stamp a function "
        "that puts the artifact on images, or lower [correct] min_attack_moves"
    )


def judge(
    recovered: float | None, clean_change: float | None, reaudit: dict[str, Any] | None, goal_recovered: float, max_clean_loss: float,
    unseen: dict[str, Any] | None = None, attack_moves: float | None = None, min_attack_moves: float = 0.0,
    attack_raise: float | None = None, min_attack_raise: float | None = None,
) -> Outcome:
    """The :class:`Outcome` of a correction (see the module docstring for the rule).

    ``recovered``: share of the attacked-accuracy loss recovered (None or NaN when the
    attack cost nothing, so there was nothing to recover); ``clean_change``: clean accuracy
    after minus before; ``reaudit``: the re-audit's outcome (``flag_gone``), None when it did
    not run; ``unseen``: the unseen members' check, None when it did not run;
    ``attack_moves``: the share of the other classes' images the attacked set moved into the
    class before the correction (None: not measured), which must reach ``min_attack_moves``,
    or ``attack_raise`` (the mean rise of their probability of the class) ``min_attack_raise``,
    for the recovery to be checked (:func:`weak_attack`).
    """
    recovered, clean_change = _finite(recovered), _finite(clean_change)
    unmet, unchecked = [], []
    weak = weak_attack(attack_moves, min_attack_moves, recovered, attack_raise, min_attack_raise)
    if weak:
        unchecked.append(weak)
    elif recovered is None:
        unchecked.append("the attack cost the original model no accuracy, so no recovery could be measured")
    elif recovered < goal_recovered - ROUNDING:
        unmet.append(f"recovered {recovered:.1%} of the attacked-accuracy loss, below the goal of {goal_recovered:.0%}")
    if clean_change is None:
        unchecked.append("the clean accuracy could not be measured")
    elif clean_change < -max_clean_loss - ROUNDING:
        unmet.append(f"clean accuracy fell by {-100 * clean_change:.1f} pt, more than the {100 * max_clean_loss:.1f} pt allowed")
    flag_gone = None if reaudit is None else bool(reaudit.get("flag_gone"))
    if flag_gone is False:
        unmet.append("the re-audit still finds the flag")
    held = unseen_miss(unseen, goal_recovered)
    if held:
        unmet.append(held)
    facts = (goal_recovered, max_clean_loss, recovered, clean_change, flag_gone)
    strength = (_finite(attack_moves), _finite(attack_raise))
    if unmet:
        return Outcome(NOT_FIXED, *facts, unmet, unchecked, *strength)
    if flag_gone is None:
        numbers = "the numbers reach the goal" if not unchecked else "nothing else fails"
        unmet = [f"{numbers}, but no re-audit checked that the strategy is gone ([correct] reaudit = false)"]
        return Outcome(UNVERIFIED, *facts, unmet, unchecked, *strength)
    if unchecked:
        return Outcome(UNVERIFIED, *facts, [], unchecked, *strength)
    return Outcome(FIXED, *facts, [], [], *strength)
