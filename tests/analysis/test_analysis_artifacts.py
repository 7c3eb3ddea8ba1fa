"""The Clever Hans score: its components on hand-made maps, and detection end to end."""

from __future__ import annotations

import numpy as np
import pytest

from spray.analysis.artifacts import (
    COMPONENTS,
    combine,
    group_distribution,
    score_clusters,
    displacement,
    top_share,
)
from spray.analysis.config import DEFAULT_THRESHOLD
from spray.analysis.cluster import cluster_spectral
from spray.analysis.graph import affinity_graph
from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_class
from spray.analysis.preprocess import preprocess
from spray.analysis.spectral import laplacian_eigenpairs

CONFIG = SprayConfig(embedding="spectral")


def _two_groups(n_main: int, n_other: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Main group looks at the centre, the other group at the top-left corner."""
    maps = 0.01 * rng.standard_normal((n_main + n_other, 16, 16))
    maps[:n_main, 6:10, 6:10] += 1.0
    maps[n_main:, :2, :2] += 1.0
    labels = np.r_[np.zeros(n_main, int), np.ones(n_other, int)]
    return maps, labels


def test_distribution_helpers():
    first, second = np.zeros(16), np.zeros(16)
    first[0], second[1] = 1.0, 1.0
    assert displacement(first, second) == pytest.approx(1.0)
    assert displacement(first, first) == 0.0
    # looking at the rest's peak pixel only is not displaced, half of it on a pixel
    # the rest weighs half as much is
    rest = np.array([0.5, 0.25, 0.25, 0.0])
    assert displacement(np.array([1.0, 0, 0, 0]), rest) == pytest.approx(0.0)
    assert displacement(np.array([0.5, 0.5, 0, 0]), rest) == pytest.approx(0.25)
    assert top_share(np.full(100, 0.01)) == pytest.approx(0.05)
    assert top_share(first) == pytest.approx(1.0)
    # zero-mean noise cancels before clipping: the group mean sits where the signal is
    rng = np.random.default_rng(0)
    scaled = rng.standard_normal((400, 16)) * 0.1
    scaled[:, 3] += 0.2
    assert group_distribution(scaled)[3] > 0.5


def test_components_of_a_disjoint_consistent_minority(make_blobs):
    maps, labels = _two_groups(80, 20, np.random.default_rng(1))
    vectors = preprocess(maps).vectors
    scores = {s.cluster_id: s for s in score_clusters(maps, vectors, labels)}
    minority = scores[1].components
    assert set(minority) == set(COMPONENTS)
    assert minority["displacement"] > 0.95
    assert minority["consistency"] > 0.9
    assert minority["separation"] > 0.8
    assert minority["concentration"] > 0.5  # 4 pixels vs 16 pixels
    assert minority["size_fraction"] == pytest.approx(0.2)
    assert scores[1].score == pytest.approx(combine(minority))
    # no size gate: the majority looks elsewhere too, so it is a candidate as well, and the
    # causal test (spray.confirm) decides which side carries a shortcut
    majority = scores[0].components
    assert majority["size_fraction"] == pytest.approx(0.8)
    assert scores[0].score == pytest.approx(combine(majority)) and scores[0].score > 0.9


def test_min_cluster_size_gate():
    maps, labels = _two_groups(60, 40, np.random.default_rng(2))
    vectors = preprocess(maps).vectors
    open_gate = {s.cluster_id: s.score for s in score_clusters(maps, vectors, labels)}
    assert open_gate[1] > 0.5
    too_small = score_clusters(maps, vectors, labels, min_cluster_size=41)
    assert {s.cluster_id: s.score for s in too_small}[1] == 0.0


def test_a_cluster_whose_rest_is_a_few_outliers_scores_zero():
    """97 samples looking at the centre and 2 at a corner: the 97 are the class up to two
    outliers, not a strategy inside it, so they score 0 as a one-cluster class does; the
    same split with a rest of ``min_cluster_size`` is scored."""
    maps, labels = _two_groups(97, 2, np.random.default_rng(4))
    vectors = preprocess(maps).vectors
    gated = {s.cluster_id: s.score for s in score_clusters(maps, vectors, labels, min_cluster_size=3)}
    assert gated == {0: 0.0, 1: 0.0}
    opened = {s.cluster_id: s.score for s in score_clusters(maps, vectors, labels, min_cluster_size=2)}
    assert opened[0] > 0.5 and opened[1] > 0.5


def test_single_cluster_scores_zero():
    maps, _ = _two_groups(50, 0, np.random.default_rng(3))
    (only,) = score_clusters(maps, preprocess(maps).vectors, np.zeros(50, int))
    assert only.score == 0.0
    assert only.components["displacement"] == 0.0
    assert only.components["size_fraction"] == 1.0


def test_same_place_different_group_is_not_displaced():
    """Two well-separated groups that look at the same place (e.g. two object sizes)."""
    rng = np.random.default_rng(4)
    maps = 0.01 * rng.standard_normal((100, 16, 16))
    maps[:70, 6:10, 6:10] += 1.0
    maps[70:, 7:9, 7:9] += 4.0  # same centre, more concentrated
    labels = np.r_[np.zeros(70, int), np.ones(30, int)]
    (_, minority) = score_clusters(maps, preprocess(maps).vectors, labels)
    disjoint_maps, disjoint_labels = _two_groups(70, 30, rng)
    (_, disjoint) = score_clusters(
        disjoint_maps, preprocess(disjoint_maps).vectors, disjoint_labels
    )
    assert minority.components["displacement"] < 0.1
    assert minority.score < disjoint.score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corner_artifact_is_found_ranked_first_and_flagged(make_artifact, seed):
    maps, truth = make_artifact(200, 0.2, np.random.default_rng(seed))
    rows = np.arange(1000, 1200)
    result = analyze_class(maps, rows, 3, "horse", CONFIG)
    assert result.analysable and result.n_clusters >= 2
    top = result.clusters[0]
    members = np.isin(rows, top.member_rows)
    precision = (members & truth).sum() / members.sum()
    recall = (members & truth).sum() / truth.sum()
    assert precision >= 0.9 and recall >= 0.9
    assert top.artifact_score == max(c.artifact_score for c in result.clusters)
    assert top.candidate and top.artifact_score >= DEFAULT_THRESHOLD
    # every other cluster is a part of the clean rest; only the causal test can clear them
    assert all(np.isin(c.member_rows, rows[~truth]).all() for c in result.clusters[1:])


def test_small_artifact_group_in_a_large_class_is_flagged(make_artifact):
    maps, truth = make_artifact(1000, 0.05, np.random.default_rng(5))
    result = analyze_class(maps, np.arange(1000), 0, "c", CONFIG)
    top = result.clusters[0]
    assert top.candidate
    assert set(top.member_rows.tolist()) == set(np.flatnonzero(truth).tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_class_raises_no_flag(make_clean, seed):
    maps = make_clean(200, np.random.default_rng(seed))
    result = analyze_class(maps, np.arange(200), 0, "clean", CONFIG)
    assert result.analysable
    assert not any(c.flagged for c in result.clusters)


@pytest.mark.parametrize("n_clusters", [2, 3, 4])
def test_forced_split_of_a_clean_class_scores_below_threshold(make_clean, n_clusters):
    """Slices of a continuum are not a strategy, even when k-means is made to cut them."""
    maps = make_clean(300, np.random.default_rng(6), noise=0.15)
    prepared = preprocess(maps)
    _, vectors = laplacian_eigenpairs(affinity_graph(prepared.vectors), n_eigen=16)
    labels = cluster_spectral(vectors, n_clusters)
    scores = score_clusters(prepared.pooled, prepared.vectors, labels)
    assert max(s.score for s in scores) < DEFAULT_THRESHOLD
