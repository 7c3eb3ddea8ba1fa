"""Settling a class's confirmed candidates: the weaker side is outranked, fragments of one
shortcut are joined into one cluster."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.confirm.config import ConfirmConfig
from spray.config import ConfigError
from spray.confirm.resolve import Contender, JOINED_PREFIX, resolve, settle


def _contender(key: str, members: range, lift: float, target: int = 1, analysis: str = "heatmap", score: float = 0.9) -> Contender:
    return Contender(key, target, analysis, np.arange(members.start, members.stop), lift, score)


def test_the_weaker_side_of_a_split_is_outranked_by_the_stronger():
    shortcut, object_side = _contender("tag", range(0, 20), 0.9), _contender("object", range(20, 100), 0.3)
    resolution = resolve([object_side, shortcut], dominance=0.85)
    assert resolution.outranked == {"object": "tag"} and resolution.joined == {}
    # whatever the order and the score: the lift decides
    resolution = resolve([_contender("object", range(20, 100), 0.3, score=1.0), shortcut], dominance=0.85)
    assert resolution.outranked == {"object": "tag"}


def test_with_several_evidence_settings_the_wide_ones_have_a_looser_bar():
    """Lifts of dev cases (docs/analysis.md): the object side of a tag backdoor nearly matches
    the shortcut with a wide region (+0.93 against +0.99) but not with the narrow one (+0.07
    against +0.96); a texture lifts no more than the object at the narrow setting (+0.28,
    +0.27) and far more at the wide one (+0.40, +0.12); the parts of a sticker split by its
    position keep up at the narrow setting (+0.86 against +0.95) and less so at the wide
    one (+0.53 against +0.96), where each pastes with more or less of the object."""
    shortcut = Contender("tag", 1, "heatmap", np.arange(0, 100), 0.99, 0.9, lifts=(0.96, 0.99))
    object_side = Contender("object", 1, "heatmap", np.arange(100, 150), 0.93, 0.95, lifts=(0.07, 0.93))
    assert resolve([object_side, shortcut], dominance=0.85, wide_dominance=0.4).outranked == {"object": "tag"}
    assert object_side.falls_behind(shortcut, 0.85, 0.4) == 0
    # judged on the chosen lifts alone, it would have joined the shortcut as one finding
    alone = [Contender(c.key, c.target, c.analysis, c.members, c.lift, c.score) for c in (object_side, shortcut)]
    assert resolve(alone, dominance=0.85).joined == {"object": "tag"}
    texture = Contender("texture", 1, "heatmap", np.arange(0, 120), 0.28, 0.85, lifts=(0.28, 0.40))
    digits = Contender("digits", 1, "heatmap", np.arange(120, 800), 0.27, 0.78, lifts=(0.27, 0.12))
    assert resolve([digits, texture], dominance=0.85, wide_dominance=0.4).outranked == {"digits": "texture"}
    assert digits.falls_behind(texture, 0.85, 0.4) == 1
    anchor = Contender("sticker-a", 1, "heatmap", np.arange(0, 114), 0.96, 0.93, lifts=(0.95, 0.96))
    part = Contender("sticker-b", 1, "heatmap", np.arange(114, 249), 0.86, 0.87, lifts=(0.86, 0.53))
    assert resolve([part, anchor], dominance=0.85, wide_dominance=0.4).joined == {"sticker-b": "sticker-a"}
    # with the narrow setting's bar at every setting the part is outranked
    assert resolve([part, anchor], dominance=0.85).outranked == {"sticker-b": "sticker-a"}


def test_an_anchor_is_a_yardstick_only_where_it_confirms():
    """The parts of a sticker have no common overlay: the anchor's overlay lifts +0.12 (not
    confirmed at a bar of 0.3) and the part's -0.05. Compared there, the part would be
    outranked by noise; where the anchor does not confirm, it is no yardstick."""
    anchor = Contender("sticker-a", 1, "heatmap", np.arange(0, 114), 0.96, 0.93, lifts=(0.95, 0.96, 0.12), confirms=(True, True, False))
    part = Contender("sticker-b", 1, "heatmap", np.arange(114, 249), 0.86, 0.87, lifts=(0.86, 0.53, -0.05), confirms=(True, False, False))
    assert part.falls_behind(anchor, 0.85, 0.4) is None
    assert resolve([part, anchor], dominance=0.85, wide_dominance=0.4).joined == {"sticker-b": "sticker-a"}
    # an anchor whose settings' outcomes are not known is compared at every setting
    unknown = dataclasses.replace(anchor, confirms=())
    assert part.falls_behind(unknown, 0.85, 0.4) == 2
    assert resolve([part, unknown], dominance=0.85, wide_dominance=0.4).outranked == {"sticker-b": "sticker-a"}


def test_an_anchor_s_overlay_is_a_yardstick_only_where_it_confirms_at_no_region():
    """The dev digits VGG sticker on 90 %: the anchor corner confirms at both regions and with
    its overlay against the hosts (+0.81); another corner keeps up at the regions and lifts
    +0.27 with its own overlay, which shows another place. The overlays are left out and the
    corners join. An anchor seen only as an overlay (a faint watermark) is measured there."""
    anchor = Contender("corner-a", 1, "heatmap", np.arange(0, 38), 0.94, 0.89, lifts=(0.94, 0.92, 0.81),
                       confirms=(True, True, True), overlays=(False, False, True))
    part = Contender("corner-b", 1, "heatmap", np.arange(38, 64), 0.85, 0.85, lifts=(0.85, 0.79, 0.27),
                     confirms=(True, True, False), overlays=(False, False, True))
    assert anchor.yardstick() == (True, True, False)
    assert part.falls_behind(anchor, 0.85, 0.4) is None
    assert resolve([part, anchor], dominance=0.85, wide_dominance=0.4).joined == {"corner-b": "corner-a"}
    # without knowing which setting is an overlay, every confirmed setting measures
    assert part.falls_behind(dataclasses.replace(anchor, overlays=()), 0.85, 0.4) == 2
    watermark = dataclasses.replace(anchor, lifts=(0.0, 0.0, 0.6), lift=0.6, confirms=(False, False, True))
    assert watermark.yardstick() == (False, False, True)
    object_side = dataclasses.replace(part, lifts=(0.25, 0.55, 0.05), lift=0.25, confirms=(True, False, False))
    assert object_side.falls_behind(watermark, 0.85, 0.4) == 2


def test_settle_reads_which_settings_are_overlays_from_the_records():
    rows = np.arange(100)
    clusters = [_cluster(0, rows[:30], 0.9, 0.9, 1.0), _cluster(1, rows[30:60], 0.8, 0.85, 1.0), _cluster(2, rows[60:], None, 0.2, 0.0)]
    settings = ({"area": 0.3, "mass": 0.5}, {"area": 0.5, "mass": 0.9}, {"area": 1.0, "mass": 1.0, "overlay": True, "reference": "hosts"})
    for cluster, lifts in zip(clusters, ((0.94, 0.92, 0.81), (0.85, 0.79, 0.27))):
        cluster.confirmation["settings"] = [
            {"evidence": evidence, "paste": {"rate": 0.05 + lift}, "control": {"rate": 0.05},
             "status": "confirmed" if lift >= 0.4 else "rejected"}
            for evidence, lift in zip(settings, lifts)
        ]
    analysis = ClassAnalysis(1, "one", "heatmap", rows, np.zeros(3), 3, np.repeat([0, 1, 2], [30, 30, 40]),
                             np.zeros((100, 2)), np.zeros((100, 2)), clusters)
    assert settle([(analysis, cluster, 1) for cluster in clusters[:2]], dominance=0.85, wide_dominance=0.4) == {"outranked": 0, "joined": 1}
    assert len(clusters[0].member_rows) == 60 and clusters[0].flagged


def test_settle_names_the_setting_where_the_outranked_side_falls_behind():
    rows = np.arange(100)
    for lifts, area, words in (
        (((0.96, 0.99), (0.07, 0.93)), 0.3, ("+7% over the control with evidence of at most 30% of the image", "(+96%)")),
        (((0.28, 0.40), (0.27, 0.12)), 0.5, ("+12% over the control with evidence of at most 50% of the image", "(+40%)")),
    ):
        clusters = [_cluster(0, rows[:50], lifts[0][1], 0.9, 1.0), _cluster(1, rows[50:], lifts[1][1], 0.95, 0.0)]
        for cluster, own in zip(clusters, lifts):
            cluster.confirmation["settings"] = [
                {"evidence": {"area": setting}, "paste": {"rate": 0.05 + lift}, "control": {"rate": 0.05}, "status": "confirmed"}
                for setting, lift in zip((0.3, 0.5), own)
            ]
        analysis = ClassAnalysis(1, "one", "heatmap", rows, np.zeros(2), 2, np.repeat([0, 1], 50), np.zeros((100, 2)), np.zeros((100, 2)), clusters)
        assert settle([(analysis, cluster, 1) for cluster in clusters], dominance=0.85, wide_dominance=0.4) == {"outranked": 1, "joined": 0}
        reason = clusters[1].confirmation["reason"]
        assert all(word in reason for word in words), reason


def test_fragments_of_one_shortcut_in_one_analysis_are_joined():
    parts = [_contender("a", range(0, 10), 0.95), _contender("b", range(10, 25), 0.9), _contender("c", range(25, 30), 0.5)]
    resolution = resolve(parts, dominance=0.85)
    assert resolution.joined == {"b": "a"} and resolution.outranked == {"c": "a"}
    # a looser dominance joins the third as well; at 1.0 only the strongest survives
    assert resolve(parts, dominance=0.5).joined == {"b": "a", "c": "a"}
    assert resolve(parts, dominance=1.0).outranked == {"b": "a", "c": "a"}


def test_the_same_finding_in_another_space_and_other_classes_are_left_alone():
    anchor = _contender("heatmap", range(0, 20), 0.9)
    concept_view = _contender("concept", range(0, 18), 0.2, analysis="concept:layer")  # Jaccard 0.9 with the anchor
    other_class = _contender("other", range(100, 150), 0.1, target=2)
    second_shortcut = _contender("frame", range(40, 60), 0.88, analysis="concept:layer")
    resolution = resolve([anchor, concept_view, other_class, second_shortcut], dominance=0.85)
    assert resolution.outranked == {} and resolution.joined == {}


def test_a_join_grows_the_head_so_a_view_of_the_whole_shortcut_stays_one_finding():
    parts = [_contender("a", range(0, 10), 0.95), _contender("b", range(10, 20), 0.9)]
    # Jaccard 20/22 with a and b together, 10/22 with a alone: weak, but the same finding
    whole = _contender("concept", range(0, 22), 0.1, analysis="concept:layer")
    resolution = resolve([*parts, whole], dominance=0.85)
    assert resolution.outranked == {} and resolution.joined == {"b": "a"}


def _cluster(cluster_id: int, members: np.ndarray, lift: float | None, score: float, heat: float) -> ClusterResult:
    confirmation = None
    if lift is not None:
        confirmation = {
            "status": "confirmed", "reason": "pasting moves hosts.",
            "paste": {"rate": 0.05 + lift, "n": 100}, "control": {"rate": 0.05, "n": 100},
        }
    return ClusterResult(cluster_id, members, score, lift is not None, {"score": score},
                         np.full((2, 2), heat, np.float32), candidate=lift is not None, confirmation=confirmation)


def test_settle_merges_joined_clusters_and_rejects_outranked_ones_in_the_analysis():
    rows = np.arange(100)
    labels = np.repeat([0, 1, 2, 3], 25)
    clusters = [
        _cluster(0, rows[:25], 0.9, 0.8, 1.0),    # anchor
        _cluster(1, rows[25:50], 0.88, 0.95, 3.0),  # same shortcut, other objects: joins 0
        _cluster(2, rows[50:75], 0.2, 0.7, 0.0),   # the object side: outranked
        _cluster(3, rows[75:], None, 0.1, 0.0),    # not a candidate
    ]
    analysis = ClassAnalysis(1, "one", "heatmap", rows, np.zeros(4), 4, labels, np.zeros((100, 2)), np.zeros((100, 2)), clusters)
    settled = settle([(analysis, cluster, 1) for cluster in clusters[:3]], dominance=0.85)
    assert settled == {"outranked": 1, "joined": 1}
    assert [cluster.cluster_id for cluster in analysis.clusters] == [0, 2, 3]
    head = analysis.clusters[0]
    assert head.member_rows.tolist() == list(range(50)) and set(analysis.labels[:50]) == {0}
    assert np.allclose(head.mean_heatmap, 2.0)  # equal sizes: the mean of 1 and 3
    assert head.artifact_score == 0.95 and head.score_components == {"score": 0.95}
    assert head.flagged and head.confirmation["status"] == "confirmed"
    assert [part["cluster_id"] for part in head.confirmation["joined"]] == [1]
    assert JOINED_PREFIX in head.confirmation["reason"] and head.confirmation["reason"].startswith("pasting moves hosts.")
    outranked = analysis.clusters[1]
    assert not outranked.flagged and outranked.confirmation["status"] == "rejected"
    assert outranked.confirmation["outranked_by"] == {"class_index": 1, "space": "heatmap", "cluster_id": 0, "lift": pytest.approx(0.9)}
    assert "less than cluster 0" in outranked.confirmation["reason"]


def test_dominance_is_a_validated_setting():
    assert ConfirmConfig().dominance == 0.85
    with pytest.raises(ConfigError):
        ConfirmConfig(dominance=1.5)


def test_a_join_that_would_make_the_shortcut_its_whole_class_outranks_instead():
    """A texture on 5 % of a class (dev, in numbers): at the narrow setting it lifts less than
    the object side (+0.09 against +0.21), at the wide one more (+0.67 against +0.30, above
    0.4 of it). The two sides are the whole class: a shortcut is what sets part of a class
    apart, so the object side is outranked rather than joined."""
    texture = Contender("texture", 1, "heatmap", np.arange(0, 40), 0.67, 0.84, lifts=(0.09, 0.67), analysis_size=800)
    digits = Contender("digits", 1, "heatmap", np.arange(40, 800), 0.21, 0.76, lifts=(0.21, 0.30), analysis_size=800)
    resolution = resolve([digits, texture], dominance=0.85, wide_dominance=0.4)
    assert resolution.outranked == {"digits": "texture"} and resolution.whole_class == {"digits"}
    # the size of the analysis unknown: joined, and the finding would be the whole class
    unknown = [dataclasses.replace(c, analysis_size=None) for c in (digits, texture)]
    assert resolve(unknown, dominance=0.85, wide_dominance=0.4).joined == {"digits": "texture"}
    # parts of a shortcut that leave some of the class outside still join
    parts = [dataclasses.replace(texture, key="a"), dataclasses.replace(digits, key="b", members=np.arange(40, 700))]
    assert resolve(parts, dominance=0.85, wide_dominance=0.4).joined == {"b": "a"}


def test_parts_of_a_shortcut_join_a_cluster_that_is_another_analysis_s_view_of_it():
    """A sticker on 90 % of a digits class (dev, in numbers): a concept-space cluster of 37
    lifts most; the heatmap's part of 39 is the same finding seen there, and the heatmap's
    other part (27) joins it rather than standing as a second shortcut."""
    concept = Contender("concept", 8, "concept:conv3", np.arange(0, 37), 0.98, 0.0, lifts=(0.98, 0.97), analysis_size=116)
    view = Contender("heatmap-a", 8, "heatmap", np.arange(0, 39), 0.96, 0.84, lifts=(0.96, 0.94), analysis_size=116)
    part = Contender("heatmap-b", 8, "heatmap", np.arange(39, 66), 0.88, 0.76, lifts=(0.88, 0.81), analysis_size=116)
    resolution = resolve([part, view, concept], dominance=0.85, wide_dominance=0.4)
    assert resolution.joined == {"heatmap-b": "heatmap-a"} and resolution.outranked == {}


def test_settle_says_when_the_two_sides_together_are_the_whole_class():
    rows = np.arange(100)
    clusters = [_cluster(0, rows[:10], 0.67, 0.84, 1.0), _cluster(1, rows[10:], 0.30, 0.76, 0.0)]
    for cluster, lifts in zip(clusters, ((0.09, 0.67), (0.21, 0.30))):
        cluster.confirmation["settings"] = [
            {"evidence": {"area": area}, "paste": {"rate": 0.05 + lift}, "control": {"rate": 0.05}}
            for area, lift in zip((0.3, 0.5), lifts)
        ]
    analysis = ClassAnalysis(1, "one", "heatmap", rows, np.zeros(2), 2, np.repeat([0, 1], [10, 90]), np.zeros((100, 2)), np.zeros((100, 2)), clusters)
    assert settle([(analysis, cluster, 1) for cluster in clusters], dominance=0.85, wide_dominance=0.4) == {"outranked": 1, "joined": 0}
    side = clusters[1]
    assert not side.flagged and side.confirmation["status"] == "rejected"
    assert "the two together are the whole class" in side.confirmation["reason"] and "(+67%)" in side.confirmation["reason"]
