"""The sparse kNN affinity graph: sparsity, symmetry, exact vs approximate neighbours.

The approximate path (pynndescent) compiles code on its first call in a process, which
takes tens of seconds; the tests that need it share one module-scoped graph and are marked
``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from spray.analysis.cluster import cluster_spectral
from spray.analysis.graph import affinity_graph, knn
from spray.analysis.preprocess import AnalysisInputError
from spray.analysis.spectral import choose_n_clusters, laplacian_eigenpairs

K = 10


def _clusters(graph: sp.csr_matrix) -> np.ndarray:
    values, vectors = laplacian_eigenpairs(graph, n_eigen=16)
    return cluster_spectral(vectors, choose_n_clusters(values, max_clusters=8))


@pytest.fixture(scope="module")
def four_blobs(make_blobs):
    return make_blobs([150, 150, 100, 100], np.random.default_rng(0), dim=32)


@pytest.fixture(scope="module")
def approximate_graph(four_blobs):
    points, _ = four_blobs
    return affinity_graph(points, n_neighbors=K, exact_below=100, random_state=0)


@pytest.mark.parametrize("kind", ["gaussian", "connectivity"])
def test_graph_is_sparse_symmetric_and_self_free(make_blobs, kind):
    points, _ = make_blobs([120, 80], np.random.default_rng(1))
    graph = affinity_graph(points, n_neighbors=K, kind=kind)
    n = len(points)
    assert sp.isspmatrix_csr(graph)
    assert graph.nnz <= 2 * n * K
    assert (graph != graph.T).nnz == 0
    assert graph.diagonal().max() == 0
    assert graph.data.min() > 0 and graph.data.max() <= 1
    # every sample keeps at least its own k neighbours
    assert (np.diff(graph.indptr) >= K).all()


def test_exact_neighbours_exclude_self_and_are_nearest(make_blobs):
    points, _ = make_blobs([50], np.random.default_rng(2), dim=8)
    indices, distances = knn(points, n_neighbors=5)
    assert not (indices == np.arange(len(points))[:, None]).any()
    full = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :5], rtol=1e-4)


def test_duplicate_samples_give_finite_weights():
    points = np.repeat(np.random.default_rng(3).standard_normal((10, 4)), 12, axis=0)
    graph = affinity_graph(points, n_neighbors=K)
    assert np.isfinite(graph.data).all() and graph.data.min() > 0


def test_too_few_samples_name_the_counts():
    with pytest.raises(AnalysisInputError) as error:
        affinity_graph(np.zeros((8, 3)), n_neighbors=10)
    message = str(error.value)
    assert "8" in message and "n_neighbors" in message


def test_unknown_affinity_is_rejected():
    with pytest.raises(AnalysisInputError, match="affinity"):
        affinity_graph(np.zeros((20, 3)), kind="cosine")


@pytest.mark.slow
def test_approximate_graph_above_threshold_stays_sparse(four_blobs, approximate_graph):
    n = len(four_blobs[0])
    assert sp.isspmatrix_csr(approximate_graph)
    assert approximate_graph.shape == (n, n)
    assert approximate_graph.nnz <= 2 * n * K
    assert (approximate_graph != approximate_graph.T).nnz == 0
    assert approximate_graph.diagonal().max() == 0


@pytest.mark.slow
def test_exact_and_approximate_neighbours_give_the_same_clusters(four_blobs, approximate_graph):
    points, truth = four_blobs
    exact = affinity_graph(points, n_neighbors=K, exact_below=10_000)
    exact_labels = _clusters(exact)
    approximate_labels = _clusters(approximate_graph)
    assert adjusted_rand_score(exact_labels, approximate_labels) >= 0.95
    assert adjusted_rand_score(truth, exact_labels) >= 0.95
