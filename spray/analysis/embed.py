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
"""

from __future__ import annotations

import warnings

import numpy as np

EMBEDDINGS = ("umap", "tsne", "spectral")

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


def embed_2d(
    vectors: np.ndarray,
    method: str = "umap",
    n_neighbors: int = 15,
    random_state: int = 0,
    eigenvectors: np.ndarray | None = None,
) -> np.ndarray:
    """(n, 2) float32 coordinates of the samples, for plotting.

    Args:
        vectors: (n, d) analysis vectors.
        method: ``"umap"``, ``"tsne"`` or ``"spectral"``.
        n_neighbors: UMAP neighbourhood size (capped at ``n - 1``); t-SNE uses
            ``perplexity = min(30, (n - 1) / 3)``.
        random_state: seeds UMAP and t-SNE.
        eigenvectors: (n, m) Laplacian eigenvectors, required for ``"spectral"``.
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {method!r}.")
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if method == "spectral":
        if eigenvectors is None:
            raise ValueError("the 'spectral' embedding needs the Laplacian eigenvectors.")
        return _pad_columns(np.asarray(eigenvectors)[:, 1:3]).astype(np.float32)
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
