"""The attacked set from a flag's own evidence (spray.correction.attack): the causal test's
masks of at most half of the members, pasted the same way on every call."""

from __future__ import annotations

import numpy as np

from spray.correction.attack import EVIDENCE_DONORS, donor_limit, evidence_attack


def _flag(n: int = 60, side: int = 16, tag: bool = True):
    """Class 1's rows 0..n/2 carry a bright 3x3 mark at a member-specific place and look at it."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.2, size=(n, 1, side, side)).astype(np.float32)
    heatmaps = np.full((n, side, side), 0.01, dtype=np.float32)
    members, rest = np.arange(0, n // 2), np.arange(n // 2, n)
    for row in members:
        top, left = (row % 4) * 3, (row // 4 % 4) * 3
        if tag:
            images[row, :, top:top + 3, left:left + 3] = 1.0
            heatmaps[row, top:top + 3, left:left + 3] = 1.0
    return images, heatmaps, members, rest


def test_donors_are_at_most_half_of_the_members_and_their_evidence_is_pasted_alike_on_every_call():
    images, heatmaps, members, rest = _flag()
    assert donor_limit(len(members)) == 15 and donor_limit(1000) == EVIDENCE_DONORS and donor_limit(1) == 1
    attack = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, limit=donor_limit(len(members)))
    assert len(attack.donors) == 15 and set(attack.donors) <= set(members) and not attack.empty
    assert attack.signature is None  # the mark moves from member to member: no pixel signature
    hosts = np.zeros((30, 1, 16, 16), dtype=np.float32)
    stamped = attack.stamp(hosts)
    assert np.array_equal(stamped, attack.stamp(hosts))
    # every host gets part of one donor's bright mark (the causal test's mask: half the excess mass), moved or not
    assert all((picture > 0.9).sum() >= 3 for picture in stamped) and (stamped > 0.9).mean() < 0.1
    again = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, limit=15)
    assert np.array_equal(again.donors, attack.donors) and np.array_equal(again.stamp(hosts), stamped)


def test_a_mark_at_one_place_gives_a_signature_that_every_other_host_gets():
    images, heatmaps, members, rest = _flag()
    images[members, :, 12:, 12:] = 1.0  # also a fixed corner tag on every member
    attack = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, limit=10)
    assert attack.signature is not None and attack.signature[12:, 12:].all()
    stamped = attack.stamp(np.zeros((4, 1, 16, 16), dtype=np.float32))
    # every other host gets the whole 4x4 tag (at its place, or moved with its mask)
    assert all((picture > 0.9).sum() >= 16 for picture in stamped[1::2])


def test_members_without_relevance_over_their_class_leave_nothing_to_paste():
    images, heatmaps, members, rest = _flag(tag=False)
    attack = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4)
    assert attack.empty and len(attack.donors) == len(members)
