"""Two-dimensional embedding of a class's analysis vectors, for the report's scatter plots.

The picture only helps a reader see the clusters; it plays no part in finding them.

* ``"umap"`` (default): UMAP (umap-learn), seeded. Keeps local neighbourhoods and shows
  separate groups as separate islands. Its first call in a process compiles code for
  tens of seconds.
* ``"tsne"``: scikit-learn t-SNE, seeded, perplexity capped for small classes.
* ``"spectral"``: the first two non-trivial Laplacian eigenvectors (columns 1 and 2 of the
  spectral embedding). Free once the eigenvectors exist; the right choice for quick runs.

Classes too small for a neighbour-based method (fewer than :data:`MIN_SAMPLES_NONLINEAR`
samples) get the first two principal components instead, so any class yields a picture.

Large inputs (more than ``max_samples``, default 20,000) are embedded on a random subset;
every other sample is then placed at the weighted mean of its already placed neighbours in
the kNN affinity graph, round after round (:func:`propagate_coordinates`), with a small
deterministic jitter so that samples placed on the same spot stay visible. The picture of
a million samples therefore costs about as much as that of 20,000.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from spray.analysis.config import DEFAULT_MAX_SAMPLES, EMBEDDINGS

# Below this many samples UMAP and t-SNE have too few neighbours to be meaningful.
MIN_SAMPLES_NONLINEAR = 10


def _pad_columns(coords: np.ndarray, width: int = 2) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)[:, :width]
    if coords.shape[1] < width:
        coords = np.hstack([coords, np.zeros((len(coords), width - coords.shape[1]))])
    return coords


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """First two principal-component scores (zero columns where there is no variance)."""
    centred = np.asarray(vectors, dtype=np.float64)
    centred = centred - centred.mean(axis=0) if len(centred) else centred
    if len(centred) < 2:
        return np.zeros((len(centred), 2))
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    return _pad_columns(left * singular)


def propagate_coordinates(
    graph: sp.spmatrix, coords: np.ndarray, placed: np.ndarray, random_state: int = 0
) -> np.ndarray:
    """Place the samples not yet ``placed`` from their placed graph neighbours.

    Each round, every unplaced sample with at least one placed neighbour moves to the
    weighted mean (graph weights) of those neighbours' coordinates, plus a jitter of 1 %
    of the placed coordinates' spread. Samples that never get a placed neighbour (a
    component without any placed sample) end at the centre of the placed ones.

    Args:
        graph: (n, n) symmetric sparse affinity matrix.
        coords: (n, 2) coordinates; rows where ``placed`` is False are ignored.
        placed: (n,) bool.
    """
    graph = sp.csr_matrix(graph)
    coords = np.where(placed[:, None], np.asarray(coords, dtype=np.float64), 0.0)
    placed = np.asarray(placed, dtype=bool).copy()
    rng = np.random.default_rng(random_state)
    spread = coords[placed].std(axis=0) if placed.any() else np.ones(2)
    jitter = 0.01 * np.where(spread > 0, spread, 1.0)
    while not placed.all():
        weight = graph @ placed.astype(np.float64)
        reachable = (weight > 0) & ~placed
        if not reachable.any():
            break
        summed = graph @ (coords * placed[:, None])
        rows = np.flatnonzero(reachable)
        coords[rows] = summed[rows] / weight[rows, None] + jitter * rng.standard_normal((len(rows), 2))
        placed[rows] = True
    if not placed.all():
        centre = coords[placed].mean(axis=0) if placed.any() else np.zeros(2)
        coords[~placed] = centre
    return coords


def embed_2d(
    vectors: np.ndarray,
    method: str = "umap",
    n_neighbors: int = 15,
    random_state: int = 0,
    eigenvectors: np.ndarray | None = None,
    graph: sp.spmatrix | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> np.ndarray:
    """(n, 2) float32 coordinates of the samples, for plotting.

    Args:
        vectors: (n, d) analysis vectors.
        method: ``"umap"``, ``"tsne"`` or ``"spectral"``.
        n_neighbors: UMAP neighbourhood size (capped at ``n - 1``); t-SNE uses
            ``perplexity = min(30, (n - 1) / 3)``.
        random_state: seeds UMAP and t-SNE and the subset draw.
        eigenvectors: (n, m) Laplacian eigenvectors, required for ``"spectral"``.
        graph: the kNN affinity graph of the samples; above ``max_samples`` it places the
            samples outside the embedded subset (built here if not given).
        max_samples: UMAP and t-SNE embed at most this many samples directly.
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {method!r}.")
    n = len(vectors)
    if method == "spectral":
        if eigenvectors is None:
            raise ValueError("the 'spectral' embedding needs the Laplacian eigenvectors.")
        return _pad_columns(np.asarray(eigenvectors)[:, 1:3]).astype(np.float32)
    if n <= max_samples:
        return _embed_all(np.asarray(vectors, dtype=np.float32), method, n_neighbors, random_state)
    subset = np.sort(np.random.default_rng(random_state).choice(n, max_samples, replace=False))
    coords = np.zeros((n, 2))
    coords[subset] = _embed_all(
        np.asarray(vectors[subset], dtype=np.float32), method, n_neighbors, random_state
    )
    placed = np.zeros(n, dtype=bool)
    placed[subset] = True
    if graph is None:
        from spray.analysis.graph import affinity_graph  # noqa: PLC0415 - avoids a cycle

        graph = affinity_graph(np.asarray(vectors, dtype=np.float32), random_state=random_state)
    return propagate_coordinates(graph, coords, placed, random_state).astype(np.float32)


def _embed_all(vectors: np.ndarray, method: str, n_neighbors: int, random_state: int) -> np.ndarray:
    n = len(vectors)
    if n < MIN_SAMPLES_NONLINEAR:
        return pca_2d(vectors).astype(np.float32)
    if method == "umap":
        import umap  # imported late: importing and compiling it takes seconds

        model = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(int(n_neighbors), n - 1)),
            random_state=random_state,
            n_jobs=1,
            init="spectral" if n > 2 * n_neighbors else "random",
        )
        with warnings.catch_warnings():
            # small or disconnected graphs make UMAP warn about its spectral initialisation
            warnings.simplefilter("ignore", UserWarning)
            coords = model.fit_transform(vectors)
    else:
        from sklearn.manifold import TSNE

        model = TSNE(
            n_components=2,
            perplexity=min(30.0, max(1.0, (n - 1) / 3.0)),
            init="pca",
            random_state=random_state,
        )
        coords = model.fit_transform(vectors)
    return np.asarray(coords, dtype=np.float32)
