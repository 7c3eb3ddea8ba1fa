"""Settling a class's confirmed candidates: the weaker side is outranked, fragments of one
shortcut are joined into one cluster."""

from __future__ import annotations

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


def test_with_several_evidence_settings_losing_at_any_one_outranks():
    """The object side of a backdoor nearly matches the shortcut with a wide region (+0.93
    against +0.99: above 0.85 of it) but not with the narrow one (+0.07 against +0.96)."""
    shortcut = Contender("tag", 1, "heatmap", np.arange(0, 100), 0.99, 0.9, lifts=(0.96, 0.99))
    object_side = Contender("object", 1, "heatmap", np.arange(100, 150), 0.93, 0.95, lifts=(0.07, 0.93))
    assert resolve([object_side, shortcut], dominance=0.85).outranked == {"object": "tag"}
    # judged on the chosen lifts alone, it would have joined the shortcut as one finding
    alone = [Contender(c.key, c.target, c.analysis, c.members, c.lift, c.score) for c in (object_side, shortcut)]
    assert resolve(alone, dominance=0.85).joined == {"object": "tag"}
    # a texture that lifts little at the narrow setting still outranks the object side
    # that lifts less than it at the wide one (the dev texture of docs/analysis.md)
    texture = Contender("texture", 1, "heatmap", np.arange(0, 40), 0.67, 0.84, lifts=(0.09, 0.67))
    digits = Contender("digits", 1, "heatmap", np.arange(40, 800), 0.21, 0.76, lifts=(0.21, 0.30))
    assert resolve([digits, texture], dominance=0.85).outranked == {"digits": "texture"}


def test_settle_names_the_setting_where_the_outranked_side_falls_behind():
    rows = np.arange(100)
    clusters = [_cluster(0, rows[:50], 0.99, 0.9, 1.0), _cluster(1, rows[50:], 0.93, 0.95, 0.0)]
    for cluster, lifts in zip(clusters, ((0.96, 0.99), (0.07, 0.93))):
        cluster.confirmation["settings"] = [
            {"evidence": {"area": area}, "paste": {"rate": 0.05 + lift}, "control": {"rate": 0.05}}
            for area, lift in zip((0.3, 0.5), lifts)
        ]
    analysis = ClassAnalysis(1, "one", "heatmap", rows, np.zeros(2), 2, np.repeat([0, 1], 50), np.zeros((100, 2)), np.zeros((100, 2)), clusters)
    assert settle([(analysis, cluster, 1) for cluster in clusters], dominance=0.85) == {"outranked": 1, "joined": 0}
    reason = clusters[1].confirmation["reason"]
    assert "+7% over the control with evidence of at most 30% of the image" in reason and "(+96%)" in reason


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
