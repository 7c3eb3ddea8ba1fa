"""Do the flag's members that no step of the correction saw still get the flagged class?

The goal's attacked set is made from the finding's evidence: a member's distinguishing
region, or the members' pixel signature, pasted on other classes' images. That is what the
audit could localise, not necessarily the artifact whole: a correction can learn to ignore
the pasted pieces while the artifact as it was stamped still works. On test draw 13 of
``bench/correction_q3.py``, 3 of the 10 corrections spray called "fixed" recovered 0.29 to
0.74 of the loss on the true stamp (a random mark, two stickers), against 0.86 to 1.00 on
the evidence.

The data hold the artifact whole in one place: the flagged members themselves. Members that
no step of the correction saw (the held-out part of a user job's data,
:mod:`spray.correction.user`) are images carrying the artifact as it was made. When they are
other classes' objects under the flagged label (a backdoor: they lose the class once their
evidence is filled, the causal test's removal, and the group is not the class's own objects
by :meth:`spray.correction.counterfactual.MemberRemoval.members_stay`), a model that no
longer follows the artifact gives them their objects' classes. The check counts, among the
unseen members that the original model gives the flagged class and that lose it without
their evidence (**dependent**), those the corrected model no longer gives it (**released**).
Their share is an attacked accuracy recovered on the artifact as it is in the data, and it
is held to the same goal (``[correct] goal_recovered``): the correction is not fixed when the
upper end of its 95 % Wilson interval lies below the goal (a few unseen members cannot fail
a correction by chance alone).

Where the members are the class's own objects (a co-occurrence), a fixed model keeps giving
them their class, and nothing is measured (``applies`` false, with the reason); likewise
when no member is unseen, none depends on its evidence, or the members have no evidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from spray.confirm.test import wilson_interval
from spray.correction.counterfactual import cpu_predictor, member_evidence, member_removal
from spray.correction.errors import CorrectionError


def not_measured(reason: str, **facts: Any) -> dict[str, Any]:
    """The record of a check that could not apply, and why."""
    return {"applies": False, "reason": reason, "n": 0, "dependent": 0, "released": 0, "rate": None, "low": None, "high": None} | facts


def unseen_members_check(
    original: nn.Module,
    corrected: nn.Module,
    member_images: np.ndarray,
    member_maps: np.ndarray,
    rest_images: np.ndarray,
    rest_maps: np.ndarray,
    class_id: int,
    batch_size: int = 128,
) -> dict[str, Any]:
    """The check of the module docstring on the unseen members (``member_images``, model
    inputs, with their audit heatmaps ``member_maps``) against the rest of their class
    (``rest_images``, ``rest_maps``: a sample of it from the fitting data).

    Returns ``{"applies", "reason", "n", "dependent", "released", "rate", "low", "high"}``:
    ``n`` the unseen members the original model gives the class, ``dependent`` those of them
    that lose it without their evidence, ``released`` those the corrected model no longer
    gives it, ``rate`` = released / dependent with its 95 % Wilson interval (``low``,
    ``high``); ``applies`` false (and ``rate`` None) when nothing could be measured.
    """
    member_images = np.asarray(member_images, dtype=np.float32)
    rest_images = np.asarray(rest_images, dtype=np.float32)
    if not len(member_images):
        return not_measured("no flagged member was held out of the correction")
    if not len(rest_images):
        return not_measured("the flagged class has no other images to compare its members with")
    rows = np.arange(len(member_images))
    try:
        evidence = member_evidence(rows, np.asarray(member_maps), np.asarray(rest_maps), member_images, rest_images=rest_images)
    except CorrectionError as error:
        return not_measured(str(error))
    removal = member_removal(original, evidence, np.median(rest_images, axis=0), class_id, batch_size, rest_images)
    kept_by = np.unique(evidence.rows)  # the members with evidence, in the order of removal.lost
    original_class = cpu_predictor(original, batch_size)(member_images).argmax(axis=1) == class_id
    n = int(original_class.sum())
    if removal.members_stay():
        return not_measured(
            "the unseen members keep their class without their evidence: they are the class's own objects, "
            "which a fixed model keeps", n=n,
        )
    dependent = np.zeros(len(member_images), dtype=bool)
    dependent[kept_by] = np.asarray(removal.lost, dtype=bool)
    if not dependent.any():
        return not_measured("no unseen member loses the class without its evidence", n=n)
    after = cpu_predictor(corrected, batch_size)(member_images[dependent]).argmax(axis=1) != class_id
    released, total = int(after.sum()), int(dependent.sum())
    low, high = wilson_interval(released, total)
    return {
        "applies": True,
        "reason": (
            f"the corrected model no longer gives the class to {released} of the {total} unseen flagged members "
            f"whose prediction rests on their evidence"
        ),
        "n": n, "dependent": total, "released": released, "rate": released / total, "low": low, "high": high,
    }


def describe(check: dict[str, Any]) -> str:
    """The check in one line for people: what it found with its interval, or why it did not apply."""
    if not check["applies"]:
        return f"flagged members held out of the correction: not measured: {check['reason']}"
    return (
        f"flagged members held out of the correction: {check['reason']} (released {check['rate']:.0%}, "
        f"95 % interval {check['low']:.0%} to {check['high']:.0%})"
    )
