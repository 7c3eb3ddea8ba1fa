"""Clustering in the spectral embedding and deterministic relabelling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spray.analysis.cluster import (
    assign_to_nearest_centroid,
    cluster_spectral,
    njw_embedding,
    relabel_by_size,
)
from spray.analysis.graph import affinity_graph
from spray.analysis.spectral import laplacian_eigenpairs


def test_relabel_by_size_orders_largest_first_and_breaks_ties_by_first_member():
    labels = np.array([7, 3, 3, 7, 5, 3, 9, 9])
    # sizes: 3 -> 3 members, 7 -> 2 (first at 0), 9 -> 2 (first at 6), 5 -> 1
    assert relabel_by_size(labels).tolist() == [1, 0, 0, 1, 3, 0, 2, 2]


def test_njw_rows_have_unit_length():
    vectors = np.random.default_rng(0).standard_normal((20, 5))
    vectors[3] = 0.0
    embedding = njw_embedding(vectors, 3)
    norms = np.linalg.norm(embedding, axis=1)
    assert embedding.shape == (20, 3)
    np.testing.assert_allclose(np.delete(norms, 3), 1.0)
    assert norms[3] == 0


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_spectral_clustering_recovers_blobs(make_blobs, method):
    points, truth = make_blobs([90, 60, 30], np.random.default_rng(1))
    _, vectors = laplacian_eigenpairs(affinity_graph(points, n_neighbors=10), n_eigen=8)
    labels = cluster_spectral(vectors, 3, method=method)
    assert adjusted_rand_score(truth, labels) >= 0.99
    # relabelled by size: the 90-point blob is cluster 0, the 30-point blob cluster 2
    assert np.bincount(labels).tolist() == [90, 60, 30]


def test_same_input_and_seed_give_identical_labels(make_blobs):
    points, _ = make_blobs([50, 50, 50, 50], np.random.default_rng(2), spread=3.0)
    _, vectors = laplacian_eigenpairs(affinity_graph(points, n_neighbors=10), n_eigen=8)
    first = cluster_spectral(vectors, 4, random_state=3)
    second = cluster_spectral(vectors.copy(), 4, random_state=3)
    np.testing.assert_array_equal(first, second)


def test_one_cluster_and_bad_method():
    vectors = np.random.default_rng(3).standard_normal((12, 4))
    assert not cluster_spectral(vectors, 1).any()
    with pytest.raises(ValueError, match="clusterer"):
        cluster_spectral(vectors, 2, method="optics")


@pytest.fixture(scope="module")
def blob_eigenvectors(make_blobs):
    points, truth = make_blobs([300, 200, 100], np.random.default_rng(4))
    _, vectors = laplacian_eigenpairs(affinity_graph(points, n_neighbors=10), n_eigen=8)
    return vectors, truth


@pytest.mark.parametrize("method", ["dbscan", "hdbscan"])
def test_density_based_clusterers_recover_blobs(blob_eigenvectors, method):
    vectors, truth = blob_eigenvectors
    labels = cluster_spectral(vectors, 3, method=method)
    assert (labels >= 0).all()  # noise joins the nearest cluster
    assert adjusted_rand_score(truth, labels) >= 0.99


def test_large_input_paths_agree_with_the_small_ones(blob_eigenvectors):
    vectors, truth = blob_eigenvectors
    minibatch = cluster_spectral(vectors, 3, minibatch_above=100)
    subset_ward = cluster_spectral(vectors, 3, method="agglomerative", fit_samples=120)
    subset_hdbscan = cluster_spectral(vectors, 3, method="hdbscan", fit_samples=200)
    for labels in (minibatch, subset_ward, subset_hdbscan):
        assert adjusted_rand_score(truth, labels) >= 0.99
        assert np.bincount(labels).tolist() == [300, 200, 100]


def test_unlabelled_points_join_the_nearest_centroid():
    points = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1], [9, 0.5], [0.5, 0.5]])
    labels = assign_to_nearest_centroid(points, np.array([0, 0, 1, 1, -1, -1]))
    assert labels.tolist() == [0, 0, 1, 1, 1, 0]
    assert assign_to_nearest_centroid(points, np.full(6, -1)).tolist() == [0] * 6
