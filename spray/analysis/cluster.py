"""Cluster the spectral embedding into prediction strategies (Ng-Jordan-Weiss).

The first ``k`` eigenvectors of the normalised Laplacian, one row per sample, are scaled to
unit length (rows of ``D^1/2``-weighted indicator vectors then all point in one of ``k``
directions) and clustered with:

* ``"kmeans"`` (default): k-means++ with ``n_init`` restarts; above ``minibatch_above``
  samples scikit-learn's ``MiniBatchKMeans`` (batches of 4,096, 3 restarts), whose cost
  does not grow with the number of restarts times n.
* ``"agglomerative"``: Ward linkage. Its memory grows with n^2, so above
  ``fit_samples`` samples it is fitted on a random subset and every sample then joins the
  cluster with the nearest centroid.
* ``"dbscan"``: density-based; ``eps`` is set from the data (the 90th percentile of each
  sample's distance to its ``min_samples``-th neighbour), and it decides the number of
  clusters itself (the eigengap's ``k`` only fixes the embedding's width).
* ``"hdbscan"``: scikit-learn's HDBSCAN, minimum cluster size 1 % of the samples (at
  least 5); subset-fitted like ``"agglomerative"`` on large inputs. Also decides the
  number of clusters itself.

Density-based methods leave some samples as noise; these join the cluster with the nearest
centroid, so every sample has a cluster.

Cluster ids carry no meaning of their own, so they are renumbered by size: the largest
cluster is 0, ties broken by the smallest member index. The same input and
``random_state`` therefore always give the same labels.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import DBSCAN, HDBSCAN, AgglomerativeClustering, KMeans, MiniBatchKMeans
from sklearn.neighbors import NearestNeighbors

from spray.analysis.config import CLUSTERERS, DEFAULT_MINIBATCH_ABOVE
DEFAULT_FIT_SAMPLES = 10_000


def njw_embedding(eigenvectors: np.ndarray, n_clusters: int) -> np.ndarray:
    """First ``n_clusters`` eigenvector columns with each row scaled to unit L2 norm.

    Rows that are all zero (isolated samples) stay zero.
    """
    embedding = np.asarray(eigenvectors, dtype=np.float64)[:, :n_clusters]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.where(norms > 0, norms, 1.0)


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..k-1 by decreasing cluster size, ties by first member index."""
    labels = np.asarray(labels)
    found, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # primary: larger first; secondary: earlier first
    new_id = np.empty(len(found), dtype=np.int64)
    new_id[order] = np.arange(len(found))
    return new_id[np.searchsorted(found, labels)]


def assign_to_nearest_centroid(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels for every point: the given label where it is >= 0, else the nearest centroid's.

    Centroids are the means of the labelled points; if no point is labelled, all get 0.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    known = labels >= 0
    if not known.any():
        return np.zeros(len(labels), dtype=np.int64)
    if known.all():
        return labels
    ids = np.unique(labels[known])
    centroids = np.stack([points[labels == i].mean(axis=0) for i in ids])
    missing = np.flatnonzero(~known)
    step = 65536
    for start in range(0, len(missing), step):
        rows = missing[start : start + step]
        distances = ((points[rows, None, :] - centroids[None]) ** 2).sum(axis=-1)
        labels[rows] = ids[distances.argmin(axis=1)]
    return labels


def _subset(n: int, size: int, random_state: int) -> np.ndarray:
    return np.sort(np.random.default_rng(random_state).choice(n, size, replace=False))


def _fit_on_subset(model, embedding: np.ndarray, fit_samples: int, random_state: int) -> np.ndarray:
    """``model.fit_predict`` on at most ``fit_samples`` rows; the rest (and noise) join the nearest centroid."""
    n = len(embedding)
    labels = np.full(n, -1, dtype=np.int64)
    rows = _subset(n, fit_samples, random_state) if n > fit_samples else np.arange(n)
    labels[rows] = model.fit_predict(embedding[rows])
    return assign_to_nearest_centroid(embedding, labels)


def _dbscan_eps(embedding: np.ndarray, min_samples: int, random_state: int) -> float:
    """90th percentile of the distance to the ``min_samples``-th neighbour (on <= 10k rows)."""
    n = len(embedding)
    rows = _subset(n, DEFAULT_FIT_SAMPLES, random_state) if n > DEFAULT_FIT_SAMPLES else np.arange(n)
    sample = embedding[rows]
    k = min(min_samples, len(sample) - 1)
    distances, _ = NearestNeighbors(n_neighbors=k).fit(sample).kneighbors()
    eps = float(np.quantile(distances[:, -1], 0.9))
    return eps if eps > 0 else 1e-6


def cluster_spectral(
    eigenvectors: np.ndarray,
    n_clusters: int,
    method: str = "kmeans",
    random_state: int = 0,
    n_init: int = 10,
    minibatch_above: int = DEFAULT_MINIBATCH_ABOVE,
    fit_samples: int = DEFAULT_FIT_SAMPLES,
) -> np.ndarray:
    """Cluster labels (n,) from the Ng-Jordan-Weiss embedding of ``eigenvectors``.

    Args:
        eigenvectors: (n, m) eigenvectors of the normalised Laplacian, ascending
            eigenvalues, ``m >= n_clusters``.
        n_clusters: number of clusters (the eigengap's); 1 puts every sample in cluster
            0. Density-based methods may return another number.
        method: ``"kmeans"``, ``"agglomerative"``, ``"dbscan"`` or ``"hdbscan"``.
        random_state: seeds k-means and every subset draw.
        n_init: k-means restarts (below ``minibatch_above`` samples).
        minibatch_above: k-means switches to mini-batches above this many samples.
        fit_samples: agglomerative/HDBSCAN are fitted on at most this many samples.

    Returns:
        int64 labels ``0..c-1``, relabelled by size (largest = 0).
    """
    if method not in CLUSTERERS:
        raise ValueError(f"clusterer must be one of {CLUSTERERS}, got {method!r}.")
    n = len(eigenvectors)
    n_clusters = int(min(n_clusters, n))
    if n_clusters <= 1:
        return np.zeros(n, dtype=np.int64)
    embedding = njw_embedding(eigenvectors, n_clusters)
    if method == "kmeans":
        if n > minibatch_above:
            model = MiniBatchKMeans(
                n_clusters=n_clusters, batch_size=4096, n_init=3, random_state=random_state
            )
        else:
            model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state)
        labels = model.fit_predict(embedding)
    elif method == "agglomerative":
        model = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
        labels = _fit_on_subset(model, embedding, fit_samples, random_state)
    elif method == "dbscan":
        min_samples = 10
        eps = _dbscan_eps(embedding, min_samples, random_state)
        labels = assign_to_nearest_centroid(
            embedding, DBSCAN(eps=eps, min_samples=min_samples).fit_predict(embedding)
        )
    else:
        size = min(fit_samples, n)
        model = HDBSCAN(min_cluster_size=max(5, size // 100), copy=True)
        labels = _fit_on_subset(model, embedding, fit_samples, random_state)
    return relabel_by_size(labels)
