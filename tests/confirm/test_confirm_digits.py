"""The causal test on real digits: shortcuts are flagged on their side, legitimate strategies are not.

Each case trains a small CNN on scikit-learn's 8x8 digits (``tests/confirm/digits.py``),
explains it with LRP, runs SpRAy in the heatmap and a concept space, and tests every
candidate causally (``spray.confirm``). Numbers measured when the tests were written are in
the comments.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spray.analysis.result import ClusterResult
from spray.confirm.config import ConfirmConfig
from spray.confirm.run import CandidateTester
from tests.confirm import digits


def _flags(audit: digits.Audit):
    return [(a, c) for a in audit.analyses for c in a.clusters if c.flagged]


def _shift(audit: digits.Audit, stamp) -> float:
    """Mean rise of P(target) on the other classes' images when ``stamp`` is put on them."""
    others = audit.images[audit.labels != digits.TARGET]
    predict = digits.predictor(audit.net)
    stamped = stamp(others, np.random.default_rng(1))
    return float((predict(stamped)[:, digits.TARGET] - predict(others)[:, digits.TARGET]).mean())


#: A more sensitive test than the defaults (the constants the first dev run of bench Q3 chose).
#: The minority patch below is a weak shortcut: its evidence moves 46 of 192 pasted images
#: (Wilson lower bound 0.18), under the default ``min_paste_rate`` of 0.2, which the dev split
#: chose to keep false flags down; ``test_a_weak_shortcut_is_missed_at_the_defaults`` pins that.
SENSITIVE = ConfirmConfig(min_paste_rate=0.05, min_lift=0.1, random_state=0)
#: The majority patch below is a weak shortcut too: its evidence lifts +0.34 over the control
#: at the narrow setting and +0.54 at the wide one (under their bars of 0.5, the default
#: ``majority_min_lift`` that the dev split chose against legitimate majorities lifting up to
#: +0.33 there, and 0.6). With the hosts' *mean* overlay (+0.49, bar 0.5) it confirmed
#: nowhere at the defaults; the *median* overlay, spray's default since, lifts +0.56 and
#: confirms it (``test_a_weak_majority_shortcut_is_found_by_the_median_overlay``). With the
#: majority bar at 0.3 (the low end of the dev tie) it is flagged at the narrow setting too.
MAJORITY_SENSITIVE = ConfirmConfig(majority_min_lift=0.3, random_state=0)


@pytest.fixture(scope="module")
def minority():
    images, labels, stamped = digits.plant(digits.patch, 0.3, seed=0)
    return digits.audit(images, labels, seed=0, confirm_config=SENSITIVE), stamped


@pytest.fixture(scope="module")
def majority():
    images, labels, stamped = digits.plant(digits.patch, 0.7, seed=0)
    return digits.audit(images, labels, seed=0, confirm_config=MAJORITY_SENSITIVE), stamped


@pytest.fixture(scope="module")
def merged():
    images, labels, mode = digits.merged(1, 7)
    return digits.audit(images, labels, seed=0), mode


def test_the_models_rely_on_the_patch(minority, majority):
    # measured: +0.27 and +0.45 mean probability of "3" on the other digits
    assert _shift(minority[0], digits.patch) > 0.1
    assert _shift(majority[0], digits.patch) > 0.1


def test_a_minority_patch_is_the_one_finding(minority):
    audit, stamped = minority
    flags = _flags(audit)
    assert flags and all(a.class_index == digits.TARGET for a, _ in flags)
    for _, cluster in flags:
        precision, recall = digits.precision_recall(cluster.member_rows, stamped)
        # measured: 55 of 55 stamped threes, nothing else
        assert precision >= 0.95 and recall >= 0.9
        assert cluster.confirmation["status"] == "confirmed"
    # the clean majority of the threes was a candidate too, and the test cleared it
    rejected = [c for a in audit.analyses for c in a.clusters if c.candidate and not c.flagged and a.class_index == digits.TARGET]
    assert rejected and all(digits.precision_recall(c.member_rows, stamped)[0] < 0.1 for c in rejected)


def test_a_majority_patch_is_flagged_on_the_stamped_side(majority):
    """70 % of the threes carry the patch: the flag names them, not the clean 30 %."""
    audit, stamped = majority
    flags = _flags(audit)
    assert flags
    top = max(flags, key=lambda item: item[1].artifact_score)[1]
    precision, recall = digits.precision_recall(top.member_rows, stamped)
    # measured: precision 1.00, recall 1.00 (128 of 128); the clean side moved 20/192, its control 26/192
    assert precision >= 0.9 and recall >= 0.8
    assert top.size > 0.5 * (audit.labels == digits.TARGET).sum()
    # judged with the majority bar at least (its strongest setting is now the hosts' overlay, bar 0.4)
    assert top.confirmation["majority"] and top.confirmation["evidence"]["min_lift"] >= MAJORITY_SENSITIVE.majority_min_lift


def test_a_weak_majority_shortcut_is_found_by_the_median_overlay(majority):
    """The same stamped side, tested at spray's defaults: its pasted regions lift +0.34 and
    +0.54, under the majority bar and the wide bar, and the hosts' median overlay (the patch
    at full strength on most members' background) lifts +0.56 and confirms it; the clean
    side lifts nothing. With the mean overlay (the default before) it lifted +0.49 there and
    confirmed nowhere, the cost this test pinned then."""
    audit, stamped = majority
    clean = np.setdiff1d(np.flatnonzero(audit.labels == digits.TARGET), stamped)

    def tested(rows: np.ndarray, config: ConfirmConfig) -> tuple[dict, list[float], list[float]]:
        tester = CandidateTester(audit.heatmaps, audit.labels, lambda rows: audit.images[rows], digits.predictor(audit.net), config)
        record, _ = tester.test(ClusterResult(0, np.sort(rows), 0.9, True, {}, np.zeros((1, 1)), candidate=True), digits.TARGET, seed=0)
        lifts = [entry["paste"]["rate"] - entry["control"]["rate"] for entry in record["settings"]]
        return record, lifts, [entry["evidence"]["min_lift"] for entry in record["settings"]]

    defaults = ConfirmConfig(random_state=0)
    record, lifts, bars = tested(stamped, defaults)
    assert record["status"] == "confirmed" and record["majority"] and "holds 128 of its class's 183 samples" in record["reason"]
    assert 0.3 <= lifts[0] < defaults.majority_min_lift == bars[0] and lifts[1] < bars[1] == defaults.wide_min_lift
    # the hosts' overlay bar is raised to the majority bar too, and the median overlay clears it
    assert bars[2] == max(defaults.host_overlay_min_lift, defaults.majority_min_lift) <= lifts[2]
    assert record["evidence"]["statistic"] == "median" and "median overlay" in record["reason"]
    clean_record, clean_lifts, _ = tested(clean, defaults)
    assert clean_record["status"] == "rejected" and max(clean_lifts) < 0.2
    by_mean, mean_lifts, mean_bars = tested(stamped, dataclasses.replace(defaults, overlay_statistic="mean"))
    assert by_mean["status"] == "rejected" and all(lift < bar for lift, bar in zip(mean_lifts, mean_bars))
    assert mean_lifts[2] < lifts[2]


def test_a_merged_two_mode_class_is_split_but_not_flagged(merged):
    """Ones and sevens under one label: two legitimate strategies, shown apart, not flagged."""
    audit, mode = merged
    (heatmap,) = [a for a in audit.analyses if a.class_index == 1 and a.space == "heatmap"]
    assert heatmap.n_clusters >= 2
    # measured: ARI 0.98 with the two source digits
    assert adjusted_rand_score(mode[heatmap.rows], heatmap.labels) >= 0.5
    assert not _flags(audit)


def test_the_causal_test_separates_a_shortcut_from_a_legitimate_sub_population(minority, merged):
    """The same test on hand-picked clusters: the stamped threes vs the sevens of the merged class."""
    audit, stamped = minority
    shortcut = ClusterResult(
        cluster_id=99, member_rows=stamped, artifact_score=1.0, flagged=True, score_components={},
        mean_heatmap=np.zeros((1, 1)), candidate=True,
    )
    config = SENSITIVE
    tester = CandidateTester(audit.heatmaps, audit.labels, lambda rows: audit.images[rows], digits.predictor(audit.net), config)
    record, examples = tester.test(shortcut, digits.TARGET, seed=0)
    assert record["status"] == "confirmed"
    # measured: 46/192 pasted images moved to "3", 0/192 with the same regions from clean threes
    assert record["paste"]["rate"] - record["control"]["rate"] >= 0.1
    assert set(examples) == {"member", "evidence", "removed", "host", "pasted"}

    audit_m, mode = merged
    sevens = np.flatnonzero((mode == 1) & (audit_m.labels == 1))
    legitimate = dataclasses.replace(shortcut, member_rows=sevens)
    tester_m = CandidateTester(audit_m.heatmaps, audit_m.labels, lambda rows: audit_m.images[rows], digits.predictor(audit_m.net), config)
    record_m, _ = tester_m.test(legitimate, 1, seed=0)
    assert record_m["status"] == "rejected"
    assert record_m["paste"]["rate"] - record_m["control"]["rate"] < record["paste"]["rate"] - record["control"]["rate"]


def test_a_weak_shortcut_seen_only_by_the_hosts_mean_overlay_is_missed_at_the_defaults(minority):
    """The same weak shortcut at the dev-chosen defaults, pinned with the numbers that say
    why: the pasted regions do not confirm it, and the overlay against the hosts lifts under
    its bar. The defaults before the median overlay (the hosts' *mean* overlay at a bar of
    0.4) confirmed it at +0.40; the median overlay moves more hosts (a crisper three with its
    patch) but its control too (a crisper three without), +0.38, under the bar of 0.5 that
    the dev split chose with it and just under the 0.4 it chose with more dev cases: the cost
    of a change that found two more relied-on artifacts there and flagged nothing more
    falsely (docs/analysis.md, "The median overlay")."""
    audit, stamped = minority
    shortcut = ClusterResult(
        cluster_id=99, member_rows=stamped, artifact_score=1.0, flagged=True, score_components={},
        mean_heatmap=np.zeros((1, 1)), candidate=True,
    )

    def tested(config: ConfirmConfig) -> dict:
        tester = CandidateTester(audit.heatmaps, audit.labels, lambda rows: audit.images[rows], digits.predictor(audit.net), config)
        record, _ = tester.test(shortcut, digits.TARGET, seed=0)
        return record

    defaults = ConfirmConfig(random_state=0)
    record = tested(defaults)
    assert record["status"] == "rejected"
    narrow, wide, overlay = record["settings"]
    # the default evidence: too few pasted images move (the measurement above, same draws)
    assert narrow["evidence"]["area"] == defaults.evidence_area
    assert narrow["paste"]["low"] < defaults.min_paste_rate
    assert narrow["paste"]["rate"] - narrow["control"]["rate"] >= 0.1
    # the wide evidence moves more images, and more of them from the control too:
    # measured 48 % moved (lower bound 0.41) against a control of 14 %: lift +0.34, under 0.6
    assert wide["evidence"]["area"] == defaults.wide_evidence_area
    assert wide["status"] == "rejected"
    assert wide["paste"]["rate"] - wide["control"]["rate"] < defaults.wide_min_lift
    # the members' median overlay against the hosts: measured 137/192 against 65/192, +0.375
    assert overlay["evidence"]["reference"] == "hosts" and overlay["evidence"]["statistic"] == "median"
    assert 0.3 <= overlay["paste"]["rate"] - overlay["control"]["rate"] < defaults.host_overlay_min_lift
    # the mean overlay at the bar of 0.4 confirmed it: measured 115/192 against 38/192, +0.401
    before = tested(dataclasses.replace(defaults, overlay_statistic="mean", host_overlay_min_lift=0.4))
    mean_overlay = before["settings"][2]
    assert before["status"] == "confirmed" and mean_overlay["status"] == "confirmed"
    assert 0.4 <= mean_overlay["paste"]["rate"] - mean_overlay["control"]["rate"] < 0.41


def test_a_mark_at_varying_places_is_found_in_a_concept_space():
    """90 digits of other classes carry a 2x2 mark somewhere on the image's rim and are
    relabelled "3" (a backdoor). Their heatmaps share no place (the mark moves, the digits
    differ); the channels of the second convolution that respond to the mark are shared.

    The concept-space cluster is not separated in the kNN graph (its score is 0), so only an
    audit that proposes every split (``threshold = 0``) tests it; the default threshold
    (0.6, chosen on bench Q3's dev split) does not. The causal test then confirms it with the
    sensitive constants: with numpy 2.4 / scikit-learn 1.9 / scipy 1.17 the mark's evidence
    moved 62 % of hosts against the control's 43 %, a lift of 0.19, just under the default
    ``min_lift`` of 0.2 (earlier package versions measured 70 % against 38 %). With those
    versions a heatmap-space cluster of the same class is confirmed too (lift 0.32) and
    settling would outrank the concept-space one; ``dominance = 0`` keeps every confirmed
    candidate, so this test checks what the concept space finds by itself.
    """
    images, labels, stamped = digits.backdoor(digits.random_mark, 90, seed=0)
    audit = digits.audit(
        images, labels, seed=0, factory=digits.deeper_model, layer="3", threshold=0.0,
        confirm_config=dataclasses.replace(SENSITIVE, max_candidates=200, dominance=0.0),
    )
    # measured: stamping the mark raises P("3") of the other digits by 0.54
    assert _shift(audit, digits.random_mark) > 0.2
    found = [
        (a.space, c) for a, c in _flags(audit)
        if a.class_index == digits.TARGET and a.space == "concept:3"
    ]
    assert found
    precision, recall = digits.precision_recall(found[0][1].member_rows, stamped)
    # measured: precision 0.70, recall 0.87; pasted evidence moved 70 % of hosts, control 38 %
    assert precision >= 0.6 and recall >= 0.6


@pytest.fixture(scope="module")
def texture_backdoor():
    images, labels, stamped = digits.backdoor(digits.texture, 150, seed=0)
    return digits.audit(images, labels, seed=0, confirm=False), stamped


def test_a_texture_is_judged_at_the_wide_evidence_where_it_lifts_most(texture_backdoor):
    """150 other digits with a background texture, relabelled "3": every evidence setting is
    measured on the same draws, the record keeps the wide one (it lifts most), and the real
    threes' evidence is rejected at both."""
    audit, stamped = texture_backdoor
    # measured: +0.99 mean probability of "3" on the other digits
    assert _shift(audit, digits.texture) > 0.5
    tester = CandidateTester(audit.heatmaps, audit.labels, lambda rows: audit.images[rows], digits.predictor(audit.net), ConfirmConfig(random_state=0))
    shortcut = ClusterResult(
        cluster_id=99, member_rows=stamped, artifact_score=1.0, flagged=True, score_components={},
        mean_heatmap=np.zeros((1, 1)), candidate=True,
    )
    record, _ = tester.test(shortcut, digits.TARGET, seed=0)
    narrow, wide, overlay = record["settings"]
    lift = lambda entry: entry["paste"]["rate"] - entry["control"]["rate"]  # noqa: E731
    # measured: lift +0.49 with the default evidence, +0.62 with the wide one
    assert record["status"] == "confirmed" and record["evidence"]["area"] == ConfirmConfig().wide_evidence_area
    assert lift(wide) > lift(narrow) and record["paste"] == wide["paste"]
    # the background texture replaces pixels rather than adding to them, and the class's own
    # mean overlay moves hosts too: measured 145/192 against 94/192, +0.27, under 0.3
    assert lift(overlay) < lift(wide)
    threes = np.setdiff1d(np.flatnonzero(audit.labels == digits.TARGET), stamped)
    record_rest, _ = tester.test(dataclasses.replace(shortcut, member_rows=threes), digits.TARGET, seed=0)
    # measured: +0.11 and +0.28
    assert record_rest["status"] == "rejected"
    assert all(entry["status"] == "rejected" for entry in record_rest["settings"])
