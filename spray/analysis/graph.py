"""Sparse k-nearest-neighbour affinity graph over the analysis vectors.

SpRAy needs a similarity graph between the heatmaps of a class. A dense N x N matrix does
not scale (ImageNet-sized classes, dataset-wide runs), so only the ``k`` nearest neighbours
of each sample get an edge and the graph is a ``scipy.sparse`` CSR matrix with at most
``2 * n * k`` stored entries.

Neighbours are found exactly (scikit-learn ``NearestNeighbors``) below ``exact_below``
samples and approximately (``pynndescent.NNDescent``, seeded) above. The approximate path
pays a one-off compilation cost of tens of seconds per process, which only large inputs
repay; exact search on a few thousand 256-d vectors takes well under a second.

Edge weights:

* ``"gaussian"`` (default): self-tuning kernel ``w_ij = exp(-d_ij^2 / (sigma_i sigma_j))``
  with ``sigma_i`` the distance from ``i`` to its k-th neighbour (Zelnik-Manor & Perona
  style local scaling), so dense and sparse regions of the space are treated alike.
* ``"connectivity"``: every kNN edge weighs 1.

The graph is symmetrised by taking, for each pair, the larger of the two directed weights
(an edge exists when either sample is among the other's neighbours). The Gaussian weight is
symmetric in ``i`` and ``j``, so this only fills in missing directions.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from spray.analysis.preprocess import AnalysisInputError

AFFINITIES = ("gaussian", "connectivity")
DEFAULT_EXACT_BELOW = 5000

# Smallest edge weight kept: stops exp() underflow from silently deleting kNN edges (which
# could leave a sample with degree zero).
_MIN_WEIGHT = 1e-12


def check_neighbors(n_samples: int, n_neighbors: int) -> None:
    """Raise a clear error unless there are more samples than neighbours per sample."""
    if n_neighbors < 1:
        raise AnalysisInputError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    if n_samples <= n_neighbors:
        raise AnalysisInputError(
            f"a {n_neighbors}-nearest-neighbour graph needs more than {n_neighbors} samples, "
            f"got {n_samples}; lower n_neighbors below {n_samples} or analyse more samples."
        )


def _drop_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each sample from its own (k+1)-neighbour list, keeping k entries.

    The sample itself is usually first but duplicates may displace it; when it is missing
    altogether the farthest neighbour is dropped instead.
    """
    n = len(indices)
    is_self = indices == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # exactly one True per row: keep the other k entries in their original order
    first_self = is_self.argmax(axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(n), first_self] = False
    return indices[keep].reshape(n, k), distances[keep].reshape(n, k)


def knn(
    vectors: np.ndarray,
    n_neighbors: int = 10,
    exact_below: int = DEFAULT_EXACT_BELOW,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours of every sample, itself excluded.

    Returns:
        ``(indices, distances)``, each (n, k), neighbours sorted by distance. The
        approximate path may return ``-1`` for a neighbour it could not find (only on
        degenerate data); :func:`affinity_graph` skips such entries.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    check_neighbors(n, n_neighbors)
    if n < exact_below:
        search = NearestNeighbors(n_neighbors=n_neighbors).fit(vectors)
        distances, indices = search.kneighbors()  # no query: each sample excluded
        return indices.astype(np.int64), distances.astype(np.float64)

    from pynndescent import NNDescent  # imported late: importing it costs seconds

    index = NNDescent(
        vectors,
        metric="euclidean",
        n_neighbors=n_neighbors + 1,
        random_state=random_state,
        n_jobs=1,
    )
    indices, distances = index.neighbor_graph
    indices, distances = _drop_self(np.asarray(indices), np.asarray(distances), n_neighbors)
    return indices.astype(np.int64), distances.astype(np.float64)


def local_scales(distances: np.ndarray) -> np.ndarray:
    """Per-sample kernel width: distance to the k-th (farthest listed) neighbour.

    Zero widths (a sample with k exact duplicates) are raised to a small fraction of the
    median positive width, or to 1 when every width is zero, to avoid dividing by zero.
    """
    finite = np.where(np.isfinite(distances), distances, -np.inf)
    sigma = finite.max(axis=1)
    sigma = np.where(np.isfinite(sigma), sigma, 0.0)
    positive = sigma[sigma > 0]
    floor = 1e-3 * float(np.median(positive)) if len(positive) else 1.0
    return np.maximum(sigma, floor)


def affinity_graph(
    vectors: np.ndarray,
    n_neighbors: int = 10,
    kind: str = "gaussian",
    exact_below: int = DEFAULT_EXACT_BELOW,
    random_state: int = 0,
) -> sp.csr_matrix:
    """Symmetric sparse kNN affinity matrix W (n x n, CSR, float64, zero diagonal).

    Args:
        vectors: (n, d) analysis vectors.
        n_neighbors: neighbours per sample; must be below n.
        kind: ``"gaussian"`` (self-tuning kernel) or ``"connectivity"`` (0/1 weights).
        exact_below: use exact search below this many samples, approximate above.
        random_state: seed for the approximate search.

    Raises:
        AnalysisInputError: when ``n <= n_neighbors`` (says what to lower) or on an
            unknown ``kind``.
    """
    if kind not in AFFINITIES:
        raise AnalysisInputError(f"affinity must be one of {AFFINITIES}, got {kind!r}.")
    indices, distances = knn(vectors, n_neighbors, exact_below, random_state)
    n = len(indices)
    valid = (indices >= 0) & (indices != np.arange(n)[:, None])
    if kind == "gaussian":
        sigma = local_scales(np.where(valid, distances, np.nan))
        safe_indices = np.where(valid, indices, 0)
        weights = np.exp(-(distances**2) / (sigma[:, None] * sigma[safe_indices]))
        weights = np.maximum(weights, _MIN_WEIGHT)
    else:
        weights = np.ones_like(distances)
    sources = np.repeat(np.arange(n), indices.shape[1])
    directed = sp.csr_matrix(
        (weights[valid], (sources[valid.ravel()], indices[valid])), shape=(n, n)
    )
    graph = directed.maximum(directed.T).tocsr()
    graph.eliminate_zeros()
    graph.sort_indices()
    return graph
