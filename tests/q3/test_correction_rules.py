"""The dev-only analysis of selection rules (``bench/correction_rules.py``) reads the search's
candidates the way spray's own search does."""

from __future__ import annotations

import dataclasses
import math

from bench.correction_rules import enough_rule, margin_rule, reaches, spray_rule, standard_error
from spray.correction.search import Candidate


def _candidate(recovered: float, clean_change: float, wrong: int, right: int, **test: float) -> dict:
    item = dataclasses.asdict(Candidate("features", "pattern", None, learning_rate=1e-3, paste_share=0.5))
    item |= {"recovered": recovered, "clean_change": clean_change, "cav_auc": 1.0}
    item |= {"n_validation": 1000, "val_turned_wrong": wrong, "val_turned_right": right}
    return item | {"test_recovered": 0.9, "test_true_recovered": 0.9, "test_clean_change": 0.0} | test


def test_the_paired_standard_error_counts_only_the_images_that_changed():
    assert standard_error(_candidate(0.9, -0.004, 4, 0)) == math.sqrt(4 - 16 / 1000) / 1000
    assert standard_error(_candidate(0.9, 0.0, 0, 0)) == 0.0


def test_the_rules_choose_as_documented():
    strong = _candidate(0.97, -0.004, 20, 16)   # within 0.5 pt, but 36 images changed: SE 0.6 pt
    gentle = _candidate(0.93, -0.001, 2, 1)     # within 0.5 pt, SE 0.17 pt
    too_far = _candidate(0.99, -0.008, 8, 0)    # over 0.5 pt
    candidates = [gentle, strong, too_far]
    assert spray_rule(candidates) is strong     # spray's own rule: most recovered within the bound
    assert margin_rule(0.0)(candidates) is strong
    assert margin_rule(1.0)(candidates) is gentle
    assert enough_rule(0.05)(candidates) is gentle
    assert enough_rule(0.01)(candidates) is strong
    assert margin_rule(0.0)([too_far]) is too_far  # nothing keeps the bound: the least loss


def test_the_goal_needs_both_the_recovery_and_the_clean_bound_on_the_test_images():
    assert reaches(_candidate(0.9, 0.0, 0, 0), "test_recovered")
    assert not reaches(_candidate(0.9, 0.0, 0, 0, test_recovered=0.7), "test_recovered")
    assert not reaches(_candidate(0.9, 0.0, 0, 0, test_clean_change=-0.006), "test_true_recovered")
    assert not reaches(_candidate(0.9, 0.0, 0, 0, test_true_recovered=float("nan")), "test_true_recovered")
