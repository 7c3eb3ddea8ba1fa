"""The re-audit's causal re-test (shown beside the verdict): a corrected model that still
follows the flag's evidence is caught whatever the clustering makes of its members; one that
no longer does is not; one whose members could not be re-tested says so."""

from __future__ import annotations

import numpy as np

from spray.confirm.config import ConfirmConfig
from spray.confirm.test import difference_interval, rate_entry
from spray.correction.retest import follows_evidence, retest_members

SIDE = 12


def _entry(moved: int, n: int = 192) -> dict:
    return rate_entry(moved, n, 0.0, "moved", "gain")


def _record(*pairs: tuple[int, int], overlay_last: bool = False) -> dict:
    """A causal-test record with one setting per (pasted moved, control moved) of 192 hosts."""
    settings = [
        {"evidence": {"area": 0.3 if i == 0 else 0.5, "mass": 0.5, "min_lift": 0.2,
                      **({"overlay": True, "reference": "hosts"} if overlay_last and i == len(pairs) - 1 else {})},
         "status": "rejected", "paste": _entry(p), "control": _entry(c)}
        for i, (p, c) in enumerate(pairs)
    ]
    return {**settings[0], "settings": settings}


def test_the_difference_interval_is_newcombe_s_from_the_wilson_intervals() -> None:
    low, high = difference_interval(_entry(57), _entry(41))  # 0.297 - 0.214: +0.083
    assert -0.01 < low < 0.0 < 0.083 < high < 0.18
    low, high = difference_interval(_entry(96), _entry(41))  # +0.29: clearly above 0
    assert low > 0.19 and high < 0.38
    assert difference_interval(_entry(41), _entry(41))[0] < 0 < difference_interval(_entry(41), _entry(41))[1]


def test_a_response_beyond_chance_at_the_narrow_or_an_overlay_setting_is_still_followed() -> None:
    narrow = follows_evidence(_record((60, 20), (100, 100), (10, 10), overlay_last=True))
    assert narrow["follows"] is True and narrow["strongest"]["kind"] == "narrow" and "still moves 60/192" in narrow["reason"]
    overlay = follows_evidence(_record((20, 20), (100, 100), (90, 40), overlay_last=True))
    assert overlay["follows"] is True and overlay["strongest"]["kind"] == "overlay"
    # the wide setting is shown, not judged: half the image carries part of the object
    wide = follows_evidence(_record((20, 20), (128, 108), (10, 10), overlay_last=True))
    assert wide["follows"] is False and [s["kind"] for s in wide["settings"]] == ["narrow", "wide", "overlay"]
    assert wide["settings"][1]["low"] > 0 and "no more than the control" in wide["reason"]
    # nothing pasted: not measured, and the flag's absence is not confirmed
    empty = follows_evidence({"status": "rejected", "reason": "the evidence could not be pasted", "paste": _entry(0, 0),
                              "control": _entry(0, 0)})
    assert empty["follows"] is None and empty["strongest"] is None and "could not be pasted" in empty["reason"]


def _corner_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """40 images of class 0, 40 of class 1 (a blob in the middle); 16 of class 1 carry a bright
    top-left corner, and their heatmaps look there."""
    images = np.zeros((80, 1, SIDE, SIDE), np.float32)
    images[:, 0, 4:8, 4:8] = 0.6
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    members = np.arange(40, 56)
    images[members, 0, :2, :2] = 1.0
    heatmaps = np.zeros((80, SIDE, SIDE), np.float32)
    heatmaps[:, 4:8, 4:8] = 1.0
    heatmaps[members, :2, :2] = 4.0
    return images, labels, members, heatmaps


def _probabilities(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], axis=1)


def test_a_model_that_still_follows_the_corner_is_caught_and_one_that_ignores_it_is_not() -> None:
    images, labels, members, heatmaps = _corner_data()
    config = ConfirmConfig(members=16, hosts=8)

    def cornered(x: np.ndarray) -> np.ndarray:  # still a shortcut, if a weaker one
        return _probabilities(0.2 + 0.6 * (x[:, 0, :2, :2].mean(axis=(1, 2)) > 0.5))

    def fixed(x: np.ndarray) -> np.ndarray:  # the class from the blob's brightness, the corner ignored
        return _probabilities((x[:, 0, 4:8, 4:8].mean(axis=(1, 2)) > 0.65).astype(float) * 0.8 + 0.1)

    still = retest_members(heatmaps, labels, lambda rows: images[rows], cornered, config, members, 1)
    assert still["follows"] is True and still["strongest"]["kind"] == "narrow" and still["strongest"]["low"] > 0.5
    clean = retest_members(heatmaps, labels, lambda rows: images[rows], fixed, config, members, 1)
    assert clean["follows"] is False and all(s["paste"]["moved"] == 0 for s in clean["settings"] if s["kind"] == "narrow")
