"""Sparse k-nearest-neighbour affinity graph over the analysis vectors.

SpRAy needs a similarity graph between the heatmaps of a class. A dense N x N matrix does
not scale (ImageNet-sized classes, dataset-wide runs), so only the ``k`` nearest neighbours
of each sample get an edge and the graph is a ``scipy.sparse`` CSR matrix with at most
``2 * n * k`` stored entries. No step here allocates anything of size N x N.

**Dimension reduction.** :func:`reduce_dimensions` projects the vectors on their first
``n_components`` principal components (fitted on at most ``fit_samples`` rows, applied in
chunks) before the neighbour search. Pooled heatmaps are smooth, so 64 components keep
nearly all of their variance while making every distance 4-16x cheaper, and pixel noise
lives mostly in the dropped components.

**Neighbour search** (:func:`knn`), chosen by ``method``:

* ``"exact"``: brute force with matrix products, a block of queries at a time (memory
  ``block x n``), so it is exact for any size but costs O(n^2 d).
* ``"ivf"``: an inverted-file index built here with NumPy: the vectors are partitioned
  into about ``sqrt(n)`` cells by a few k-means iterations on a sample, and each sample is
  compared only with the members of its ``n_probe`` nearest cells. One
  neighbours-of-neighbours pass then repairs most misses at cell borders. Cost
  O(n * n_probe * cell size * d); no compilation, deterministic for a seed.
* ``"pynndescent"``: ``pynndescent.NNDescent`` (seeded). Kept as an option: it compiles
  its code on first use in every process (1-2 minutes on a small shared machine), which
  the ``"ivf"`` search does not pay.
* ``"auto"`` (default): exact below ``exact_below`` samples, ``"ivf"`` above.

Whatever the search, the distances of the chosen neighbours are recomputed in float64
from the vectors, so weights do not inherit the rounding of the matrix-product shortcut.

**Edge weights:**

* ``"gaussian"`` (default): self-tuning kernel ``w_ij = exp(-d_ij^2 / (sigma_i sigma_j))``
  with ``sigma_i`` the distance from ``i`` to its k-th neighbour (Zelnik-Manor & Perona
  style local scaling), so dense and sparse regions of the space are treated alike.
* ``"connectivity"``: every kNN edge weighs 1.

The graph is symmetrised by taking, for each pair, the larger of the two directed weights
(an edge exists when either sample is among the other's neighbours). The Gaussian weight is
symmetric in ``i`` and ``j``, so this only fills in missing directions.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from spray.analysis.config import AFFINITIES, DEFAULT_EXACT_BELOW, DEFAULT_PCA_COMPONENTS, KNN_METHODS
from spray.analysis.preprocess import AnalysisInputError

DEFAULT_PCA_FIT_SAMPLES = 20000

# Smallest edge weight kept: stops exp() underflow from silently deleting kNN edges (which
# could leave a sample with degree zero).
_MIN_WEIGHT = 1e-12

# Entries of a distance block computed at once (float32): 2**23 entries = 32 MiB.
_BLOCK_ENTRIES = 2**23

# Smallest average cell of the inverted-file index.
_MIN_CELL = 64

# Rows up to this wide are fully sorted to select their k smallest entries.
_NARROW = 64


def check_neighbors(n_samples: int, n_neighbors: int) -> None:
    """Raise a clear error unless there are more samples than neighbours per sample."""
    if n_neighbors < 1:
        raise AnalysisInputError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    if n_samples <= n_neighbors:
        raise AnalysisInputError(
            f"a {n_neighbors}-nearest-neighbour graph needs more than {n_neighbors} samples, "
            f"got {n_samples}; lower n_neighbors below {n_samples} or analyse more samples."
        )


def reduce_dimensions(
    vectors: np.ndarray,
    n_components: int | None = DEFAULT_PCA_COMPONENTS,
    fit_samples: int = DEFAULT_PCA_FIT_SAMPLES,
    random_state: int = 0,
) -> np.ndarray:
    """Scores on the first ``n_components`` principal components, float32, (n, c).

    The principal axes are the top eigenvectors of the covariance of at most
    ``fit_samples`` rows drawn at random (all rows when there are fewer); the projection
    is applied chunk by chunk. Returns the vectors unchanged (as float32) when
    ``n_components`` is None or not smaller than both the dimension and ``n - 1`` (the
    projection would then only rotate the data).
    """
    vectors = np.asarray(vectors)
    n, dim = vectors.shape
    if n_components is None or n_components >= min(dim, n - 1):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(random_state)
    fit_rows = np.sort(rng.choice(n, fit_samples, replace=False)) if n > fit_samples else None
    sample = np.asarray(vectors if fit_rows is None else vectors[fit_rows], dtype=np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    covariance = centred.T @ centred
    del sample, centred
    # only the top n_components eigenpairs: several times faster than a full eigh
    _, axes = scipy.linalg.eigh(covariance, subset_by_index=(dim - n_components, dim - 1))
    axes = axes[:, ::-1]
    # deterministic signs: largest-magnitude loading of each axis positive
    pivots = np.abs(axes).argmax(axis=0)
    axes = axes * np.sign(axes[pivots, np.arange(axes.shape[1])])
    axes32, mean32 = axes.astype(np.float32), mean.astype(np.float32)
    out = np.empty((n, n_components), dtype=np.float32)
    step = max(1, _BLOCK_ENTRIES // max(dim, 1))
    for start in range(0, n, step):
        block = np.asarray(vectors[start : start + step], dtype=np.float32)
        out[start : start + step] = (block - mean32) @ axes32
    return out


def _top_k(distances: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the ``k`` smallest entries of each row (unordered).

    Narrow rows are sorted outright; wide rows use ``torch.topk``, which is several times
    faster than ``numpy.argpartition`` on wide rows and uses every core.
    """
    width = distances.shape[1]
    if width <= k:
        return np.broadcast_to(np.arange(width), distances.shape).copy()
    if width <= _NARROW:
        return np.argsort(distances, axis=1, kind="stable")[:, :k]
    import torch  # a dependency of spray; imported here to keep this module light

    found = torch.topk(torch.from_numpy(np.ascontiguousarray(distances)), k, dim=1, largest=False)
    return found.indices.numpy()


def _squared_norms(vectors: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", vectors, vectors)


def exact_knn(vectors: np.ndarray, n_neighbors: int) -> np.ndarray:
    """(n, k) indices of each sample's k nearest other samples, by brute force in blocks."""
    n = len(vectors)
    norms = _squared_norms(vectors)
    block = max(1, _BLOCK_ENTRIES // n)
    indices = np.empty((n, n_neighbors), dtype=np.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        distances = norms[start:stop, None] - 2.0 * (vectors[start:stop] @ vectors.T)
        distances += norms[None, :]
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf
        indices[start:stop] = _top_k(distances, n_neighbors)
    return indices


def _lloyd(points: np.ndarray, n_cells: int, rng: np.random.Generator, iterations: int = 6) -> np.ndarray:
    """Centroids of a few k-means (Lloyd) iterations from a random start; empty cells re-seeded."""
    centroids = points[rng.choice(len(points), n_cells, replace=False)].copy()
    for _ in range(iterations):
        nearest = _nearest_cells(points, centroids, 1)[:, 0]
        counts = np.bincount(nearest, minlength=n_cells)
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, nearest, points)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        empty = np.flatnonzero(~filled)
        if len(empty):
            centroids[empty] = points[rng.choice(len(points), len(empty), replace=False)]
    return centroids


def _nearest_cells(points: np.ndarray, centroids: np.ndarray, n_probe: int) -> np.ndarray:
    """(n, n_probe) indices of each point's nearest centroids, nearest first."""
    n = len(points)
    centre_norms = _squared_norms(centroids)
    block = max(1, _BLOCK_ENTRIES // len(centroids))
    out = np.empty((n, n_probe), dtype=np.int64)
    for start in range(0, n, block):
        distances = centre_norms[None, :] - 2.0 * (points[start : start + block] @ centroids.T)
        top = _top_k(distances, n_probe)
        order = np.argsort(np.take_along_axis(distances, top, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(top, order, axis=1)
    return out


def _block_distances(
    vectors: np.ndarray, norms: np.ndarray, rows: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """Squared distances (float32) between ``vectors[rows]`` and ``vectors[columns]``."""
    distances = vectors[rows] @ vectors[columns].T
    distances *= -2.0
    distances += norms[rows, None]
    distances += norms[columns][None, :]
    return distances


def _merge(
    best_d: np.ndarray,
    best_i: np.ndarray,
    cand_d: np.ndarray,
    cand_i: np.ndarray,
    deduplicate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k closest of the current best and the candidates.

    With ``deduplicate``, an index listed twice in a row counts once (the candidates of a
    neighbours-of-neighbours pass repeat; those of disjoint cells do not).
    """
    k = best_d.shape[1]
    all_i = np.concatenate([best_i, cand_i], axis=1)
    all_d = np.concatenate([best_d, cand_d], axis=1)
    if deduplicate:
        order = np.argsort(all_i, axis=1, kind="stable")
        all_i = np.take_along_axis(all_i, order, axis=1)
        all_d = np.take_along_axis(all_d, order, axis=1)
        repeat = np.zeros_like(all_i, dtype=bool)
        repeat[:, 1:] = (all_i[:, 1:] == all_i[:, :-1]) & (all_i[:, 1:] >= 0)
        all_d[repeat] = np.inf
    top = _top_k(all_d, k)
    return np.take_along_axis(all_d, top, axis=1), np.take_along_axis(all_i, top, axis=1)


def ivf_knn(
    vectors: np.ndarray,
    n_neighbors: int,
    n_probe: int = 6,
    refine: int = 1,
    random_state: int = 0,
) -> np.ndarray:
    """(n, k) approximate nearest-neighbour indices from an inverted-file index.

    Args:
        vectors: (n, d) float32 vectors.
        n_neighbors: k.
        n_probe: cells searched per sample (of about ``sqrt(n)``).
        refine: neighbours-of-neighbours passes after the cell search.
        random_state: seeds the partition.

    Entries are -1 where fewer than k candidates were seen (only on degenerate inputs).
    """
    n = len(vectors)
    k = n_neighbors
    rng = np.random.default_rng(random_state)
    # cost ~ n d (n_cells + n_probe n / n_cells): smallest at n_cells = sqrt(n_probe n);
    # at least _MIN_CELL members per cell, so small inputs are searched widely
    n_cells = max(1, min(n // _MIN_CELL, int(round(math.sqrt(n_probe * n)))))
    n_probe = min(n_probe, n_cells)
    train = vectors[np.sort(rng.choice(n, min(n, 16 * n_cells), replace=False))]
    centroids = _lloyd(train, n_cells, rng)
    probes = _nearest_cells(vectors, centroids, n_probe)
    home = probes[:, 0]
    member_order = np.argsort(home, kind="stable")
    member_bounds = np.searchsorted(home[member_order], np.arange(n_cells + 1))
    flat_cells = probes.ravel()
    query_order = np.argsort(flat_cells, kind="stable")
    query_bounds = np.searchsorted(flat_cells[query_order], np.arange(n_cells + 1))
    query_owner = query_order // n_probe  # sample that issued each probe

    norms = _squared_norms(vectors)
    best_d = np.full((n, k), np.inf, dtype=np.float32)
    best_i = np.full((n, k), -1, dtype=np.int64)
    # pass 1: every sample against the members of its own cell
    for cell in range(n_cells):
        members = member_order[member_bounds[cell] : member_bounds[cell + 1]]
        if len(members) < 2:
            continue
        width = min(k, len(members) - 1)
        block = max(1, _BLOCK_ENTRIES // len(members))
        for start in range(0, len(members), block):
            batch = members[start : start + block]
            distances = _block_distances(vectors, norms, batch, members)
            distances[np.arange(len(batch)), np.arange(start, start + len(batch))] = np.inf
            top = _top_k(distances, width)
            best_d[batch, :width] = np.take_along_axis(distances, top, axis=1)
            best_i[batch, :width] = members[top]
    # pass 2: the other probed cells; only rows with an entry closer than the current
    # k-th neighbour are merged, which skips most rows of most cells
    for cell in range(n_cells):
        members = member_order[member_bounds[cell] : member_bounds[cell + 1]]
        queries = query_owner[query_bounds[cell] : query_bounds[cell + 1]]
        queries = queries[home[queries] != cell]
        if len(members) == 0 or len(queries) == 0:
            continue
        block = max(1, _BLOCK_ENTRIES // len(members))
        for start in range(0, len(queries), block):
            batch = queries[start : start + block]
            distances = _block_distances(vectors, norms, batch, members)
            worst = best_d[batch].max(axis=1)
            hit = (distances < worst[:, None]).any(axis=1)
            if not hit.any():
                continue
            batch, distances = batch[hit], distances[hit]
            top = _top_k(distances, min(k, len(members)))
            cand_d = np.take_along_axis(distances, top, axis=1)
            best_d[batch], best_i[batch] = _merge(best_d[batch], best_i[batch], cand_d, members[top])
    for _ in range(refine):
        best_d, best_i = _refine(vectors, norms, best_d, best_i)
    best_i[~np.isfinite(best_d)] = -1
    return best_i


def _refine(
    vectors: np.ndarray, norms: np.ndarray, best_d: np.ndarray, best_i: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One neighbours-of-neighbours pass: each sample also checks its neighbours' neighbours."""
    n, k = best_i.shape
    new_d, new_i = best_d.copy(), best_i.copy()
    block = max(1, _BLOCK_ENTRIES // (k * k * vectors.shape[1]))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        first = best_i[rows]
        cand = best_i[np.where(first >= 0, first, 0)].reshape(len(rows), k * k)
        cand[np.repeat(first < 0, k, axis=1)] = -1
        cand[cand == rows[:, None]] = -1
        safe = np.where(cand >= 0, cand, 0)
        distances = norms[rows, None] + norms[safe] - 2.0 * np.einsum(
            "rd,rcd->rc", vectors[rows], vectors[safe]
        )
        distances[cand < 0] = np.inf
        new_d[rows], new_i[rows] = _merge(
            best_d[rows], best_i[rows], distances.astype(np.float32), cand, deduplicate=True
        )
    return new_d, new_i


def knn(
    vectors: np.ndarray,
    n_neighbors: int = 10,
    exact_below: int = DEFAULT_EXACT_BELOW,
    random_state: int = 0,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours of every sample, itself excluded.

    Args:
        vectors: (n, d) vectors.
        n_neighbors: k, below n.
        exact_below: with ``method="auto"``, exact search below this many samples.
        random_state: seeds the approximate searches.
        method: ``"auto"``, ``"exact"``, ``"ivf"`` or ``"pynndescent"`` (module docstring).

    Returns:
        ``(indices, distances)``, each (n, k), neighbours sorted by distance, distances in
        float64 recomputed from the vectors. An approximate search may return ``-1`` for a
        neighbour it could not find (only on degenerate data), with distance ``inf``;
        :func:`affinity_graph` skips such entries.
    """
    if method not in KNN_METHODS:
        raise AnalysisInputError(f"knn method must be one of {KNN_METHODS}, got {method!r}.")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    check_neighbors(n, n_neighbors)
    if method == "auto":
        method = "exact" if n < exact_below else "ivf"
    if method == "exact":
        indices = exact_knn(vectors, n_neighbors)
    elif method == "ivf":
        indices = ivf_knn(vectors, n_neighbors, random_state=random_state)
    else:
        indices = _pynndescent_knn(vectors, n_neighbors, random_state)
    return _sorted_with_distances(vectors, indices)


def _pynndescent_knn(vectors: np.ndarray, n_neighbors: int, random_state: int) -> np.ndarray:
    from pynndescent import NNDescent  # imported late: importing it costs seconds

    index = NNDescent(
        vectors,
        metric="euclidean",
        n_neighbors=n_neighbors + 1,
        random_state=random_state,
        n_jobs=1,
    )
    indices, distances = index.neighbor_graph
    return _drop_self(np.asarray(indices), np.asarray(distances), n_neighbors)[0]


def _sorted_with_distances(vectors: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recompute neighbour distances in float64 (in chunks) and sort each row by them."""
    n, k = indices.shape
    distances = np.empty((n, k), dtype=np.float64)
    step = max(1, _BLOCK_ENTRIES // max(1, k * vectors.shape[1]))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        block = indices[rows]
        valid = block >= 0
        diff = vectors[np.where(valid, block, 0)].astype(np.float64) - vectors[rows, None, :]
        distances[rows] = np.where(valid, np.sqrt(np.einsum("rcd,rcd->rc", diff, diff)), np.inf)
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(indices, order, axis=1).astype(np.int64), np.take_along_axis(
        distances, order, axis=1
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
    method: str = "auto",
) -> sp.csr_matrix:
    """Symmetric sparse kNN affinity matrix W (n x n, CSR, float64, zero diagonal).

    Args:
        vectors: (n, d) analysis vectors (reduced with :func:`reduce_dimensions` first if
            wanted; this function searches the space it is given).
        n_neighbors: neighbours per sample; must be below n.
        kind: ``"gaussian"`` (self-tuning kernel) or ``"connectivity"`` (0/1 weights).
        exact_below: with ``method="auto"``, exact search below this many samples.
        random_state: seed for the approximate search.
        method: neighbour search, see :func:`knn`.

    Raises:
        AnalysisInputError: when ``n <= n_neighbors`` (says what to lower) or on an
            unknown ``kind`` or ``method``.
    """
    if kind not in AFFINITIES:
        raise AnalysisInputError(f"affinity must be one of {AFFINITIES}, got {kind!r}.")
    indices, distances = knn(vectors, n_neighbors, exact_below, random_state, method)
    n = len(indices)
    valid = (indices >= 0) & (indices != np.arange(n)[:, None])
    if kind == "gaussian":
        sigma = local_scales(np.where(valid, distances, np.nan))
        safe_indices = np.where(valid, indices, 0)
        weights = np.exp(-(distances**2) / (sigma[:, None] * sigma[safe_indices]))
        weights = np.maximum(weights, _MIN_WEIGHT)
    else:
        weights = np.ones_like(distances)
    sources = np.repeat(np.arange(n, dtype=np.int64), indices.shape[1]).reshape(indices.shape)
    directed = sp.csr_matrix(
        (weights[valid], (sources[valid], indices[valid])), shape=(n, n)
    )
    del weights, sources, indices, distances
    graph = directed.maximum(directed.T).tocsr()
    graph.eliminate_zeros()
    graph.sort_indices()
    return graph
