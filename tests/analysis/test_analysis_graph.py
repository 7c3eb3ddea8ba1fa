"""The sparse kNN affinity graph: sparsity, symmetry, exact vs approximate neighbours,
dimension reduction, and no dense n x n allocation on large inputs.

The approximate search tested here is the inverted-file index (NumPy only, no compilation).
The ``pynndescent`` option is tested through its glue code with a stand-in index: the real
library compiles code for one to two minutes in every new process.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from spray.analysis.cluster import cluster_spectral
import tracemalloc

from spray.analysis import graph as graph_module
from spray.analysis.graph import affinity_graph, ivf_knn, knn, reduce_dimensions
from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_class
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


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


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


def test_approximate_graph_above_threshold_stays_sparse(four_blobs, approximate_graph):
    n = len(four_blobs[0])
    assert sp.isspmatrix_csr(approximate_graph)
    assert approximate_graph.shape == (n, n)
    assert approximate_graph.nnz <= 2 * n * K
    assert (approximate_graph != approximate_graph.T).nnz == 0
    assert approximate_graph.diagonal().max() == 0


def test_exact_and_approximate_neighbours_give_the_same_clusters(four_blobs, approximate_graph):
    points, truth = four_blobs
    exact = affinity_graph(points, n_neighbors=K, exact_below=10_000)
    exact_labels = _clusters(exact)
    approximate_labels = _clusters(approximate_graph)
    assert adjusted_rand_score(exact_labels, approximate_labels) >= 0.95
    assert adjusted_rand_score(truth, exact_labels) >= 0.95


def test_inverted_file_search_finds_nearly_all_true_neighbours(make_blobs):
    points, _ = make_blobs([700, 500, 300], np.random.default_rng(4), dim=24, spread=4.0)
    exact, _ = knn(points, n_neighbors=K, method="exact")
    approximate, distances = knn(points, n_neighbors=K, method="ivf", random_state=1)
    assert approximate.shape == (1500, K)
    assert not (approximate == np.arange(1500)[:, None]).any()
    assert (np.diff(distances, axis=1) >= 0).all()
    assert _recall(approximate, exact) >= 0.95
    # the neighbours-of-neighbours pass repairs misses at cell borders
    rough = ivf_knn(points.astype(np.float32), K, n_probe=2, refine=0, random_state=1)
    refined = ivf_knn(points.astype(np.float32), K, n_probe=2, refine=1, random_state=1)
    assert _recall(refined, exact) > _recall(rough, exact)


def test_pynndescent_option_drops_each_sample_from_its_own_list(monkeypatch, make_blobs):
    points, _ = make_blobs([80], np.random.default_rng(5), dim=8)
    exact, _ = knn(points, n_neighbors=5, method="exact")

    class StandIn:
        """Answers like ``pynndescent.NNDescent``: k+1 neighbours, the sample itself first."""

        def __init__(self, data, n_neighbors, **_):
            indices, distances = knn(data, n_neighbors - 1, method="exact")
            self.neighbor_graph = (
                np.hstack([np.arange(len(data))[:, None], indices]),
                np.hstack([np.zeros((len(data), 1)), distances]),
            )

    import pynndescent

    monkeypatch.setattr(pynndescent, "NNDescent", StandIn)
    indices, _ = knn(points, n_neighbors=5, method="pynndescent")
    np.testing.assert_array_equal(indices, exact)


def test_unknown_knn_method_is_rejected():
    with pytest.raises(AnalysisInputError, match="knn method"):
        knn(np.zeros((20, 3)), method="annoy")


def test_pca_keeps_the_structure_and_skips_what_would_only_rotate(make_blobs):
    points, _ = make_blobs([100, 100], np.random.default_rng(6), dim=128)
    reduced = reduce_dimensions(points, n_components=16)
    assert reduced.shape == (200, 16) and reduced.dtype == np.float32
    np.testing.assert_array_equal(reduced, reduce_dimensions(points, n_components=16))
    # the first component separates the two blobs
    assert abs(np.corrcoef(reduced[:, 0], np.r_[np.zeros(100), np.ones(100)])[0, 1]) > 0.95
    # fitted on a subset, projected in chunks: same subspace
    subset_fit = reduce_dimensions(points, n_components=16, fit_samples=150)
    assert abs(np.corrcoef(subset_fit[:, 0], reduced[:, 0])[0, 1]) > 0.99
    assert reduce_dimensions(points[:10], n_components=16).shape == (10, 128)
    assert reduce_dimensions(points, n_components=None).shape == (200, 128)


def test_large_input_never_allocates_a_dense_n_by_n_matrix(make_blobs, monkeypatch):
    """20,000 samples: a dense float32 n x n matrix would take 1.6 GB; the peak stays < 200 MB."""
    points, truth = make_blobs([8000, 6000, 4000, 2000], np.random.default_rng(7), dim=16)
    config = SprayConfig(embedding="spectral", n_eigen=12, knn_exact_below=5000)
    tracemalloc.start()
    try:
        result = analyze_class(points, np.arange(len(points)), 0, "large", config, space="concept:x")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert result.n_clusters == 4
    assert adjusted_rand_score(truth, result.labels) > 0.99
