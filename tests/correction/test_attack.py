"""The attacked set from a flag's own evidence (spray.correction.attack): the causal test's
masks of at most half of the members, pasted the same way on every call."""

from __future__ import annotations

import numpy as np

from spray.correction.attack import EVIDENCE_DONORS, donor_limit, donor_overlay, evidence_attack


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


def _watermarked(side: int = 16):
    """:func:`_flag` on varied images (objects differ more than a watermark adds: no pixel
    signature), a faint diagonal watermark over every member, and 30 rows of another class after them."""
    tagged, heatmaps, members, rest = _flag(side=side)
    rng = np.random.default_rng(1)
    images = np.where(tagged > 0.9, 1.0, rng.uniform(0.0, 0.7, size=tagged.shape)).astype(np.float32)
    diagonal = np.eye(side, dtype=bool)
    images[members] = np.minimum(images[members] + 0.25 * diagonal[None], 1.0)
    others = rng.uniform(0.0, 0.7, size=(30, 1, side, side)).astype(np.float32)
    images = np.concatenate([images, others])
    heatmaps = np.concatenate([heatmaps, np.full((30, side, side), 0.01, dtype=np.float32)])
    return images, heatmaps, members, rest, np.arange(len(images) - 30, len(images)), diagonal


def test_given_other_classes_rows_the_donors_mean_overlay_goes_on_every_other_host():
    images, heatmaps, members, rest, hosts, diagonal = _watermarked()
    attack = evidence_attack(
        members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, limit=15, hosts=hosts
    )
    assert attack.signature is None and attack.overlay is not None
    # the overlay is the watermark: about 0.25 on the diagonal, little elsewhere (the marks and objects average out)
    assert attack.overlay[0][diagonal].mean() > 0.15 and attack.overlay[0][~diagonal].mean() < 0.1
    plain = np.full((6, 1, 16, 16), 0.1, dtype=np.float32)
    stamped = attack.stamp(plain)
    assert np.array_equal(stamped, attack.stamp(plain))
    lifted = stamped[:, 0][:, diagonal] > 0.2  # diagonal pixels the attack brightened
    assert lifted[1::2].mean(axis=1).min() > 0.6  # overlaid: most of the watermark on every such host
    assert lifted[0::2].mean(axis=1).max() < 0.4  # a donor's region: a small part of it at most
    assert stamped.max() <= images.max() + 1e-6  # clipped to the images' range
    without = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, limit=15)
    assert without.overlay is None and np.array_equal(without.stamp(plain)[0::2], stamped[0::2])


def test_the_overlay_stays_out_where_the_members_share_a_signature():
    images, heatmaps, members, rest, hosts, _ = _watermarked()
    images[members, :, 12:, 12:] = 1.0  # a fixed corner tag: a signature
    tagged = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, hosts=hosts)
    assert tagged.signature is not None and tagged.overlay is None


def test_the_donors_overlay_is_the_watermark_in_a_co_occurrence_and_in_a_backdoor():
    """Class A's objects are a band near the top, the other classes' a band near the bottom; the members carry a
    diagonal watermark over A's objects (co-occurrence) or over the other classes' (backdoor, relabelled A).
    Against the hosts alone the co-occurrence's overlay holds A's object, against the rest alone the backdoor's
    holds the others': the overlay the attack adds holds the watermark alone in both (where no object is
    brighter than it)."""
    rng = np.random.default_rng(2)
    side = 12
    diagonal = np.eye(side, dtype=bool)
    background = diagonal.copy()
    background[1:4] = background[8:11] = False  # the diagonal outside both bands

    def objects(top: bool, n: int) -> np.ndarray:
        images = rng.uniform(0.0, 0.1, size=(n, 1, side, side)).astype(np.float32)
        images[:, 0, slice(1, 4) if top else slice(8, 11)] += 0.6
        return images

    class_a, others = objects(True, 40), objects(False, 40)
    for members in (objects(True, 20), objects(False, 20)):  # co-occurrence, backdoor
        members = members + 0.3 * diagonal[None, None]
        assert donor_overlay(members, others, None)[0] is not None and donor_overlay(members, class_a, None)[0] is not None
        overlay, bounds = donor_overlay(members, others, class_a)
        assert overlay[0][background].min() > 0.2 and overlay[0][~diagonal].max() < 0.1
        assert bounds.shape == (2, 1) and bounds[1, 0] >= members.max() - 1e-6
    co_occurring = objects(True, 20) + 0.3 * diagonal[None, None]
    assert donor_overlay(co_occurring, others, None)[0][0, 1:4][~diagonal[1:4]].mean() > 0.4  # A's object too
    assert donor_overlay(class_a, others, class_a)[0] is None  # members like the rest of their class add nothing


def test_the_median_overlay_keeps_a_clipped_watermark_whole():
    """Members and other classes' images alike: 40 % carry a bright object over the middle
    rows. The members' watermark (+0.25 on the diagonal) is clipped away on their objects, so
    their mean overlay over the hosts holds 0.6 of it in the middle rows; the median overlay
    holds all of it there (most members are background), and nothing off the diagonal."""
    rng = np.random.default_rng(3)
    side = 16
    diagonal = np.eye(side, dtype=bool)

    def group(n: int) -> np.ndarray:
        images = rng.uniform(0.0, 0.05, size=(n, 1, side, side)).astype(np.float32)
        images[rng.random(n) < 0.4, :, 4:12] = 1.0
        return images

    members, hosts, rest = group(60), group(60), group(60)
    members = np.minimum(members + 0.25 * diagonal[None, None], 1.0)
    middle = diagonal.copy()
    middle[:4] = middle[12:] = False
    by_mean, _ = donor_overlay(members, hosts, rest)
    by_median, _ = donor_overlay(members, hosts, rest, "median")
    assert by_mean[0][middle].mean() < 0.2 and by_median[0][middle].mean() > 0.22
    assert by_median[0][~diagonal].max() < 0.05


def test_the_overlay_can_take_the_signature_s_place():
    """By default a pixel signature keeps the overlay out; with ``overlay_over_signature`` the
    overlay goes on every other host in place of the signature's pastes."""
    images, heatmaps, members, rest, hosts, diagonal = _watermarked()
    images[members, :, 12:, 12:] = 1.0  # a fixed corner tag: a signature
    kept_out = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, hosts=hosts,
                               overlay_statistic="median")
    assert kept_out.signature is not None and kept_out.overlay is None
    over = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, hosts=hosts,
                           overlay_statistic="median", overlay_over_signature=True)
    assert over.signature is not None and over.overlay is not None
    plain = np.full((6, 1, 16, 16), 0.1, dtype=np.float32)
    lifted = over.stamp(plain)[:, 0][:, diagonal] > 0.2
    assert lifted[1::2].mean(axis=1).min() > 0.6  # every other host: the watermark, not the tag alone
    # overlay_only: the overlay on every host, no donor's region pasted
    only = evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4, hosts=hosts,
                           overlay_statistic="median", overlay_over_signature=True, overlay_only=True)
    stamped = only.stamp(plain)
    assert np.array_equal(stamped[1::2], over.stamp(plain)[1::2])
    assert (stamped[:, 0][:, diagonal] > 0.2).mean(axis=1).min() > 0.6
    assert all(np.array_equal(image, stamped[0]) for image in stamped)  # alike hosts, alike attacked images: no region
    # without an overlay to add there is nothing to put on every image: the regions stay
    assert not evidence_attack(members, rest, lambda rows: heatmaps[rows], lambda rows: images[rows], seed=4,
                               overlay_only=True).overlay_only
