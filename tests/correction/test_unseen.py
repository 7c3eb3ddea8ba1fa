"""The check of the flagged members no step of the correction saw (:mod:`spray.correction.unseen`)
and its place in the verdict (:func:`spray.correction.outcome.judge`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from spray.correction.outcome import FIXED, NOT_FIXED, judge
from spray.correction.unseen import describe, unseen_members_check


class _CornerOrInk(nn.Module):
    """Class 1 when a bright corner plus the ink in the centre outweigh class 0."""

    def __init__(self, corner_weight: float = 4.0) -> None:
        super().__init__()
        self.corner_weight = nn.Parameter(torch.tensor(corner_weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner, ink = x[:, 0, :2, :2].mean(dim=(1, 2)), x[:, 0, 2:6, 2:6].mean(dim=(1, 2))
        one = self.corner_weight * corner + 4.0 * (ink - 0.25)
        return torch.stack([torch.zeros_like(one), one], dim=1)


def _objects(n: int, ink: float, rng: np.random.Generator) -> np.ndarray:
    """Objects drawn as random ink in the centre: class 1 has much (``ink`` 0.8), class 0 little (0.2)."""
    images = np.zeros((n, 1, 8, 8), np.float32)
    images[:, 0, 2:6, 2:6] = rng.uniform(size=(n, 4, 4)) * (rng.uniform(size=(n, 4, 4)) < ink)
    return images


def _case(members_are_class_objects: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """12 unseen members with a bright corner, class-0 objects (a backdoor) or class-1 objects
    (co-occurrence); 60 images of the rest of class 1; heatmaps: the members' relevance in
    the corner, the rest's in the centre."""
    rng = np.random.default_rng(3)
    members = _objects(12, 0.8 if members_are_class_objects else 0.2, rng)
    members[:, 0, :2, :2] = 1.0
    rest = _objects(60, 0.8, rng)
    member_maps = rng.uniform(0, 0.05, size=(12, 8, 8))
    member_maps[:, :2, :2] += 1.0
    rest_maps = rng.uniform(0, 0.05, size=(60, 8, 8))
    rest_maps[:, 2:6, 2:6] += 0.3
    return members, member_maps, rest, rest_maps


def test_a_backdoor_s_unseen_members_are_released_by_a_fix_and_held_by_no_fix() -> None:
    members, member_maps, rest, rest_maps = _case(members_are_class_objects=False)
    original = _CornerOrInk()
    fixed = _CornerOrInk(corner_weight=0.0)  # the corner means nothing any more
    released = unseen_members_check(original, fixed, members, member_maps, rest, rest_maps, class_id=1)
    assert released["applies"] and released["n"] == 12 and released["dependent"] == 12
    assert released["released"] == 12 and released["rate"] == 1.0 and released["low"] > 0.7
    assert describe(released).endswith(f"(released 100%, 95 % interval {released['low']:.0%} to 100%)")
    held = unseen_members_check(original, copy.deepcopy(original), members, member_maps, rest, rest_maps, class_id=1)
    assert held["applies"] and held["released"] == 0 and held["high"] < 0.3


def test_co_occurring_members_are_the_class_s_own_objects_and_judge_nothing() -> None:
    members, member_maps, rest, rest_maps = _case(members_are_class_objects=True)
    original = _CornerOrInk()
    check = unseen_members_check(original, copy.deepcopy(original), members, member_maps, rest, rest_maps, class_id=1)
    assert not check["applies"] and check["rate"] is None and check["n"] == 12
    assert "class's own objects" in check["reason"]


def test_without_unseen_members_nothing_is_measured() -> None:
    _, _, rest, rest_maps = _case(members_are_class_objects=False)
    model = _CornerOrInk()
    check = unseen_members_check(model, model, np.zeros((0, 1, 8, 8), np.float32), np.zeros((0, 8, 8)), rest, rest_maps, class_id=1)
    assert not check["applies"] and "no flagged member was held out" in check["reason"]


@pytest.mark.parametrize("released, verdict", [(12, FIXED), (9, FIXED), (5, NOT_FIXED), (0, NOT_FIXED)])
def test_the_verdict_fails_a_correction_only_when_the_unseen_members_are_released_below_the_goal_beyond_chance(
    released: int, verdict: str
) -> None:
    """12 dependent unseen members: 9 released (0.75, interval up to 0.91) is not below the goal
    of 0.8 beyond chance; 5 (0.42, up to 0.68) is, and the verdict names it."""
    from spray.confirm.test import wilson_interval

    low, high = wilson_interval(released, 12)
    check = {"applies": True, "reason": "", "n": 12, "dependent": 12, "released": released, "rate": released / 12, "low": low, "high": high}
    outcome = judge(0.95, 0.0, {"flag_gone": True}, 0.8, 0.005, check)
    assert outcome.verdict == verdict
    if verdict == NOT_FIXED:
        assert len(outcome.unmet) == 1 and f"{12 - released} of the 12 flagged members held out" in outcome.unmet[0]
    not_measured = judge(0.95, 0.0, {"flag_gone": True}, 0.8, 0.005, check | {"applies": False})
    assert not_measured.verdict == FIXED and not_measured.unmet == []
