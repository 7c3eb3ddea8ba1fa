"""The correction's verdict: fixed only when the numbers reach the goal and the re-audit no
longer finds the flag; every unmet condition named; no re-audit is never "fixed"."""

from __future__ import annotations

import math

import pytest

from spray.correction.outcome import FIXED, NOT_FIXED, UNVERIFIED, judge
from spray.verdict import EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK

GONE, PERSISTS = {"flag_gone": True}, {"flag_gone": False}


def test_a_fix_needs_the_recovery_the_clean_accuracy_and_the_reaudit() -> None:
    outcome = judge(0.85, -0.004, GONE, goal_recovered=0.8, max_clean_loss=0.005)
    assert (outcome.verdict, outcome.exit_code, outcome.unmet) == (FIXED, EXIT_OK, [])
    assert "fixed (recovered 85.0% >= 80%, clean accuracy -0.4 pt" in outcome.describe()


@pytest.mark.parametrize(
    ("recovered", "clean_change", "reaudit", "reasons"),
    [
        (0.458, -0.006, PERSISTS, ["recovered 45.8% of the attacked-accuracy loss, below the goal of 80%",
                                   "clean accuracy fell by 0.6 pt, more than the 0.5 pt allowed",
                                   "the re-audit still finds the flag"]),
        (0.95, -0.150, GONE, ["clean accuracy fell by 15.0 pt, more than the 0.5 pt allowed"]),  # P-ClArC's collapse
        (0.95, 0.0, PERSISTS, ["the re-audit still finds the flag"]),
        (0.79, 0.0, None, ["recovered 79.0% of the attacked-accuracy loss, below the goal of 80%"]),
    ],
)
def test_every_unmet_condition_is_named(recovered: float, clean_change: float, reaudit: dict | None, reasons: list[str]) -> None:
    outcome = judge(recovered, clean_change, reaudit, goal_recovered=0.8, max_clean_loss=0.005)
    assert (outcome.verdict, outcome.exit_code, outcome.unmet) == (NOT_FIXED, EXIT_FLAGGED, reasons)
    assert outcome.describe() == "outcome: not fixed: " + "; ".join(reasons)


def test_exactly_the_allowed_loss_passes_despite_float_rounding() -> None:
    before, after = 0.98, 0.975  # one image of 200 lost: -0.0050000000000000044 in floats
    assert judge(0.8, after - before, GONE, goal_recovered=0.8, max_clean_loss=0.005).verdict == FIXED
    assert judge(0.8, -0.0051, GONE, goal_recovered=0.8, max_clean_loss=0.005).verdict == NOT_FIXED


def test_good_numbers_without_a_reaudit_are_unverified_never_fixed() -> None:
    outcome = judge(1.0, 0.0, None, goal_recovered=0.8, max_clean_loss=0.005)
    assert (outcome.verdict, outcome.exit_code, outcome.flag_gone) == (UNVERIFIED, EXIT_INCOMPLETE, None)
    assert "no re-audit checked" in outcome.describe()
    assert outcome.to_dict()["exit_code"] == EXIT_INCOMPLETE


def test_the_goal_is_a_setting() -> None:
    assert judge(0.6, -0.01, GONE, goal_recovered=0.5, max_clean_loss=0.02).verdict == FIXED
    assert judge(0.6, -0.01, GONE, goal_recovered=0.7, max_clean_loss=0.02).verdict == NOT_FIXED


def test_an_attack_too_weak_to_test_leaves_the_recovery_unchecked_never_not_fixed_or_fixed() -> None:
    """An attacked set that moves few images into the class does not exercise the artifact:
    its recovery is not evidence either way, so the verdict is "unverified" (exit 3)."""
    missed = judge(0.3, 0.002, GONE, goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.1, min_attack_moves=0.3)
    assert (missed.verdict, missed.exit_code, missed.unmet, missed.attack_moves) == (UNVERIFIED, EXIT_INCOMPLETE, [], 0.1)
    assert "moved only 10% of the other classes' held-out images" in missed.describe()
    assert "[correct] stamp" in missed.describe() and "recovered 30.0%" in missed.describe()
    reached = judge(0.95, 0.0, GONE, goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.1, min_attack_moves=0.3)
    assert reached.verdict == UNVERIFIED  # a weak attack's high recovery is no evidence of a fix either
    strong = judge(0.3, 0.002, GONE, goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.3, min_attack_moves=0.3)
    assert (strong.verdict, strong.unchecked) == (NOT_FIXED, [])  # at the floor, the recovery judges


def test_an_attack_that_raises_the_class_probability_enough_is_strong_enough_to_judge() -> None:
    """The benchmark's definition of reliance has two bars: moves of 30 %, or a raise of
    P(class) by 0.2. An attack that reaches either exercises the artifact."""
    bars = dict(goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.2, min_attack_moves=0.3, min_attack_raise=0.2)
    raised = judge(0.95, 0.0, GONE, attack_raise=0.25, **bars)
    assert (raised.verdict, raised.attack_moves, raised.attack_raise, raised.unchecked) == (FIXED, 0.2, 0.25, [])
    missed = judge(0.5, 0.0, GONE, attack_raise=0.25, **bars)
    assert missed.verdict == NOT_FIXED and missed.unmet == ["recovered 50.0% of the attacked-accuracy loss, below the goal of 80%"]
    flat = judge(0.95, 0.0, GONE, attack_raise=0.15, **bars)
    assert (flat.verdict, flat.attack_raise) == (UNVERIFIED, 0.15)
    assert "moved only 20%" in flat.describe() and "raised their probability of the class by only 0.15 (under 0.20)" in flat.describe()
    unmeasured = judge(0.95, 0.0, GONE, attack_raise=None, **bars)
    assert unmeasured.verdict == UNVERIFIED and "raised their probability" not in unmeasured.describe()  # the moves alone decide


def test_a_real_failure_beside_a_weak_attack_is_still_not_fixed_and_says_what_was_not_checked() -> None:
    outcome = judge(0.95, -0.02, PERSISTS, goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.05, min_attack_moves=0.3)
    assert outcome.verdict == NOT_FIXED
    assert outcome.unmet == ["clean accuracy fell by 2.0 pt, more than the 0.5 pt allowed", "the re-audit still finds the flag"]
    assert outcome.describe().endswith(")") and "(not checked: the attacked set moved only 5%" in outcome.describe()


def test_what_could_not_be_measured_is_unverified() -> None:
    nothing_to_recover = judge(math.nan, 0.0, GONE, goal_recovered=0.8, max_clean_loss=0.005)
    assert nothing_to_recover.verdict == UNVERIFIED
    assert nothing_to_recover.unchecked == ["the attack cost the original model no accuracy, so no recovery could be measured"]
    no_clean = judge(0.9, math.nan, GONE, goal_recovered=0.8, max_clean_loss=0.005)
    assert (no_clean.verdict, no_clean.unchecked) == (UNVERIFIED, ["the clean accuracy could not be measured"])
    without_reaudit = judge(0.3, 0.0, None, goal_recovered=0.8, max_clean_loss=0.005, attack_moves=0.1, min_attack_moves=0.3)
    assert without_reaudit.verdict == UNVERIFIED and "nothing else fails, but no re-audit" in without_reaudit.describe()
