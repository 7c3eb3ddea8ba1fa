"""Cluster the spectral embedding into prediction strategies (Ng-Jordan-Weiss).

The first ``k`` eigenvectors of the normalised Laplacian, one row per sample, are scaled to
unit length (rows of ``D^1/2``-weighted indicator vectors then all point in one of ``k``
directions) and clustered with k-means (default) or Ward agglomerative clustering.

Cluster ids carry no meaning of their own, so they are renumbered by size: the largest
cluster is 0, ties broken by the smallest member index. The same input and
``random_state`` therefore always give the same labels.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans

CLUSTERERS = ("kmeans", "agglomerative")


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


def cluster_spectral(
    eigenvectors: np.ndarray,
    n_clusters: int,
    method: str = "kmeans",
    random_state: int = 0,
    n_init: int = 10,
) -> np.ndarray:
    """Cluster labels (n,) from the Ng-Jordan-Weiss embedding of ``eigenvectors``.

    Args:
        eigenvectors: (n, m) eigenvectors of the normalised Laplacian, ascending
            eigenvalues, ``m >= n_clusters``.
        n_clusters: number of clusters; 1 puts every sample in cluster 0.
        method: ``"kmeans"`` (k-means++, ``n_init`` restarts) or ``"agglomerative"``
            (Ward linkage; deterministic, quadratic memory, for small classes).
        random_state: seeds k-means.

    Returns:
        int64 labels in ``0..n_clusters-1``, relabelled by size (largest = 0).
    """
    if method not in CLUSTERERS:
        raise ValueError(f"clusterer must be one of {CLUSTERERS}, got {method!r}.")
    n = len(eigenvectors)
    n_clusters = int(min(n_clusters, n))
    if n_clusters <= 1:
        return np.zeros(n, dtype=np.int64)
    embedding = njw_embedding(eigenvectors, n_clusters)
    if method == "kmeans":
        model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state)
    else:
        model = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
    return relabel_by_size(model.fit_predict(embedding))
