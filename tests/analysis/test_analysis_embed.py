"""Two-dimensional embeddings for the report.

UMAP compiles code on its first call in a process (tens of seconds), so its test is marked
``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from spray.analysis.embed import MIN_SAMPLES_NONLINEAR, embed_2d, propagate_coordinates
from spray.analysis.graph import affinity_graph


def test_spectral_embedding_uses_first_non_trivial_eigenvectors():
    eigenvectors = np.random.default_rng(0).standard_normal((30, 6))
    coords = embed_2d(np.zeros((30, 4)), method="spectral", eigenvectors=eigenvectors)
    assert coords.shape == (30, 2) and coords.dtype == np.float32
    np.testing.assert_allclose(coords, eigenvectors[:, 1:3], rtol=1e-6)
    # only two eigenvectors: the missing column is zero
    narrow = embed_2d(np.zeros((30, 4)), method="spectral", eigenvectors=eigenvectors[:, :2])
    assert narrow.shape == (30, 2) and not narrow[:, 1].any()


def test_spectral_embedding_needs_eigenvectors():
    with pytest.raises(ValueError, match="eigenvectors"):
        embed_2d(np.zeros((30, 4)), method="spectral")


@pytest.mark.parametrize("n", [0, 1, 2, MIN_SAMPLES_NONLINEAR - 1])
@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_tiny_classes_get_a_finite_picture(n, method):
    vectors = np.random.default_rng(1).standard_normal((n, 16))
    coords = embed_2d(vectors, method=method)
    assert coords.shape == (n, 2)
    assert np.isfinite(coords).all()


def test_tsne_separates_groups_and_is_deterministic(make_blobs):
    points, truth = make_blobs([25, 25], np.random.default_rng(2), dim=16)
    coords = embed_2d(points, method="tsne", random_state=0)
    again = embed_2d(points, method="tsne", random_state=0)
    np.testing.assert_array_equal(coords, again)
    centre_gap = np.linalg.norm(coords[truth == 0].mean(0) - coords[truth == 1].mean(0))
    spread = max(coords[truth == c].std(0).max() for c in (0, 1))
    assert centre_gap > 2 * spread


@pytest.mark.slow
def test_umap_separates_groups_and_is_deterministic(make_blobs):
    points, truth = make_blobs([40, 40], np.random.default_rng(3), dim=16)
    coords = embed_2d(points, method="umap", n_neighbors=10, random_state=0)
    again = embed_2d(points, method="umap", n_neighbors=10, random_state=0)
    assert coords.shape == (80, 2) and np.isfinite(coords).all()
    np.testing.assert_array_equal(coords, again)
    centre_gap = np.linalg.norm(coords[truth == 0].mean(0) - coords[truth == 1].mean(0))
    spread = max(coords[truth == c].std(0).max() for c in (0, 1))
    assert centre_gap > 2 * spread


def test_propagation_places_samples_next_to_their_graph_neighbours(make_blobs):
    points, truth = make_blobs([150, 150], np.random.default_rng(4), dim=8)
    graph = affinity_graph(points, n_neighbors=10)
    coords = np.where(truth[:, None] == 0, -5.0, 5.0) * np.ones((300, 2))
    placed = np.zeros(300, dtype=bool)
    placed[::15] = True  # 20 placed samples, 10 per blob
    result = propagate_coordinates(graph, coords, placed)
    assert np.isfinite(result).all()
    np.testing.assert_array_equal(result[placed], coords[placed])
    assert (result[truth == 0, 0] < -4).all() and (result[truth == 1, 0] > 4).all()


def test_large_inputs_are_embedded_on_a_subset_and_placed_through_the_graph(make_blobs):
    points, truth = make_blobs([120, 120], np.random.default_rng(5), dim=16)
    coords = embed_2d(points, method="tsne", max_samples=60, random_state=0)
    assert coords.shape == (240, 2) and np.isfinite(coords).all()
    centre_gap = np.linalg.norm(coords[truth == 0].mean(0) - coords[truth == 1].mean(0))
    spread = max(coords[truth == c].std(0).max() for c in (0, 1))
    assert centre_gap > 2 * spread
