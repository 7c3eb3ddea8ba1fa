"""SpRAy end to end: heatmaps of a class -> clusters with Clever Hans scores.

Per class: :func:`~spray.analysis.preprocess.preprocess` (pool, sign, normalise) ->
:func:`~spray.analysis.graph.affinity_graph` (sparse kNN) ->
:func:`~spray.analysis.spectral.laplacian_eigenpairs` and
:func:`~spray.analysis.spectral.choose_n_clusters` (eigengap) ->
:func:`~spray.analysis.cluster.cluster_spectral` (Ng-Jordan-Weiss) ->
:func:`~spray.analysis.artifacts.score_clusters` (Clever Hans score) and
:func:`~spray.analysis.embed.embed_2d` (picture). Every parameter of these steps lives in
one :class:`SprayConfig`, which is stored with the results so a report can say how they
were obtained.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from spray.analysis.artifacts import (
    DEFAULT_MAX_CLUSTER_FRACTION,
    DEFAULT_MIN_CLUSTER_SIZE,
    DEFAULT_THRESHOLD,
    score_clusters,
)
from spray.analysis.cluster import CLUSTERERS, cluster_spectral
from spray.analysis.embed import EMBEDDINGS, embed_2d
from spray.analysis.graph import AFFINITIES, DEFAULT_EXACT_BELOW, affinity_graph
from spray.analysis.preprocess import (
    DEFAULT_POOLED_SIZE,
    NORMALISATIONS,
    RELEVANCE_MODES,
    AnalysisInputError,
    preprocess,
)
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.analysis.spectral import (
    DEFAULT_MIN_RATIO,
    DEFAULT_N_EIGEN,
    choose_n_clusters,
    laplacian_eigenpairs,
)

logger = logging.getLogger(__name__)


@dataclass
class SprayConfig:
    """Parameters of a SpRAy analysis.

    Attributes:
        pooled_size: (h, w) grid heatmaps are sum-pooled to (capped at their size);
            ``None`` keeps full resolution.
        relevance: ``"signed"``, ``"positive"`` or ``"absolute"`` relevance.
        normalisation: per-sample ``"l2"``, ``"max"``, ``"sum"`` or ``"none"``.
        n_neighbors: neighbours per sample in the affinity graph.
        n_eigen: Laplacian eigenpairs computed (capped at n - 1 per class).
        max_clusters: the eigengap considers at most this many clusters.
        min_eigen_ratio: eigengap ratio needed to report more than one cluster
            (see :func:`~spray.analysis.spectral.choose_n_clusters`).
        knn_exact_below: exact kNN below this many samples, approximate above.
        affinity: ``"gaussian"`` (self-tuning kernel) or ``"connectivity"``.
        clusterer: ``"kmeans"`` or ``"agglomerative"``.
        embedding: 2-d picture: ``"umap"``, ``"tsne"`` or ``"spectral"``.
        embedding_neighbors: UMAP neighbourhood size.
        threshold: artifact score at or above which a cluster is flagged.
        max_cluster_fraction: clusters larger than this share of the class are never
            flagged (the artifact is the minority strategy).
        min_cluster_size: clusters with fewer members are never flagged.
        min_class_size: classes with fewer analysable samples are not analysed
            (at least ``n_neighbors + 1`` is needed in any case).
        random_state: seed for every random step.
    """

    pooled_size: tuple[int, int] | None = DEFAULT_POOLED_SIZE
    relevance: str = "signed"
    normalisation: str = "l2"
    n_neighbors: int = 10
    n_eigen: int = DEFAULT_N_EIGEN
    max_clusters: int = 8
    min_eigen_ratio: float = DEFAULT_MIN_RATIO
    knn_exact_below: int = DEFAULT_EXACT_BELOW
    affinity: str = "gaussian"
    clusterer: str = "kmeans"
    embedding: str = "umap"
    embedding_neighbors: int = 15
    threshold: float = DEFAULT_THRESHOLD
    max_cluster_fraction: float = DEFAULT_MAX_CLUSTER_FRACTION
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE
    min_class_size: int = 20
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.pooled_size is not None:
            size = tuple(self.pooled_size)
            if len(size) != 2 or not all(_is_int(v) and v >= 1 for v in size):
                raise ValueError(
                    f"pooled_size must be two positive integers (h, w) or None, "
                    f"got {self.pooled_size!r}."
                )
            self.pooled_size = (int(size[0]), int(size[1]))
        _check_choice("relevance", self.relevance, RELEVANCE_MODES)
        _check_choice("normalisation", self.normalisation, NORMALISATIONS)
        _check_choice("affinity", self.affinity, AFFINITIES)
        _check_choice("clusterer", self.clusterer, CLUSTERERS)
        _check_choice("embedding", self.embedding, EMBEDDINGS)
        _check_int("n_neighbors", self.n_neighbors, 1)
        _check_int("n_eigen", self.n_eigen, 2)
        _check_int("max_clusters", self.max_clusters, 1)
        _check_int("knn_exact_below", self.knn_exact_below, 0)
        _check_int("embedding_neighbors", self.embedding_neighbors, 2)
        _check_int("min_cluster_size", self.min_cluster_size, 1)
        _check_int("min_class_size", self.min_class_size, 2)
        _check_int("random_state", self.random_state, 0)
        if self.max_clusters >= self.n_eigen:
            raise ValueError(
                f"max_clusters ({self.max_clusters}) must be below n_eigen ({self.n_eigen}): "
                "the eigengap after the k-th eigenvalue needs eigenvalue k+1. "
                "Raise n_eigen or lower max_clusters."
            )
        if not (_is_number(self.min_eigen_ratio) and self.min_eigen_ratio > 1):
            raise ValueError(f"min_eigen_ratio must be a number above 1, got {self.min_eigen_ratio!r}.")
        if not _is_number(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}.")
        if not (_is_number(self.max_cluster_fraction) and 0 < self.max_cluster_fraction <= 1):
            raise ValueError(
                f"max_cluster_fraction must be in (0, 1], got {self.max_cluster_fraction!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        values = asdict(self)
        if values["pooled_size"] is not None:
            values["pooled_size"] = list(values["pooled_size"])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SprayConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SprayConfig fields {unknown}; known: {sorted(known)}.")
        values = dict(values)
        if values.get("pooled_size") is not None:
            values["pooled_size"] = tuple(values["pooled_size"])
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def not_analysable(class_index: int, class_name: str, space: str, reason: str) -> ClassAnalysis:
    """A :class:`ClassAnalysis` that records why a class was not analysed."""
    return ClassAnalysis(
        class_index=int(class_index),
        class_name=str(class_name),
        space=space,
        rows=np.zeros(0, dtype=np.int64),
        eigenvalues=np.zeros(0, dtype=np.float64),
        n_clusters=0,
        labels=np.zeros(0, dtype=np.int64),
        spectral_embedding=np.zeros((0, 0), dtype=np.float32),
        embedding_2d=np.zeros((0, 2), dtype=np.float32),
        clusters=[],
        class_mean_heatmap=None,
        analysable=False,
        reason=reason,
    )


def analyze_class(
    heatmaps: Any,
    rows: Sequence[int] | np.ndarray,
    class_index: int,
    class_name: str,
    config: SprayConfig | None = None,
    space: str = "heatmap",
) -> ClassAnalysis:
    """Run SpRAy on the heatmaps of one class.

    Args:
        heatmaps: (n, H, W) relevance maps or (n, d) relevance vectors of the class, a
            NumPy array or any array-like sliceable along axis 0 (read in chunks).
        rows: attribution-file row index of each heatmap.
        class_index: the class (-1 for a dataset-wide analysis).
        class_name: its readable name.
        config: analysis parameters; defaults to ``SprayConfig()``.
        space: name of the representation, stored with the result.

    Returns:
        The class's :class:`ClassAnalysis`, clusters sorted by artifact score (highest
        first). Samples with constant heatmaps are left out of the analysis (logged). A
        class with too few analysable samples, or only constant heatmaps, comes back with
        ``analysable=False`` and a ``reason`` instead of raising.

    Raises:
        AnalysisInputError: heatmaps with NaN/Inf values (naming the rows), or a shape
            mismatch between heatmaps and rows.
    """
    config = config or SprayConfig()
    started = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    if n == 0:
        return not_analysable(class_index, class_name, space, "no samples of this class.")
    prepared = preprocess(
        heatmaps, config.pooled_size, config.relevance, config.normalisation, rows=rows
    )
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    keep = ~prepared.constant[order]
    if not keep.any():
        return not_analysable(
            class_index, class_name, space,
            f"all {n} heatmaps are constant (no relevance structure to cluster); check the "
            "attribution of this class.",
        )
    if not keep.all():
        dropped = rows[~keep]
        logger.warning(
            "class %s (%s): %d of %d heatmaps are constant and left out, rows %s",
            class_index, class_name, len(dropped), n, dropped[:10].tolist(),
        )
    needed = max(config.min_class_size, config.n_neighbors + 1)
    n_kept = int(keep.sum())
    if n_kept < needed:
        return not_analysable(
            class_index, class_name, space,
            f"{n_kept} analysable samples, fewer than the {needed} needed "
            f"(min_class_size={config.min_class_size}, n_neighbors={config.n_neighbors}); "
            "lower these settings or analyse more samples of this class.",
        )

    rows = rows[keep]
    vectors = prepared.vectors[order][keep]
    maps = prepared.pooled[order][keep]
    display = vectors.reshape(maps.shape)

    graph = affinity_graph(
        vectors, config.n_neighbors, config.affinity, config.knn_exact_below,
        config.random_state,
    )
    eigenvalues, eigenvectors = laplacian_eigenpairs(graph, config.n_eigen, config.random_state)
    n_clusters = choose_n_clusters(eigenvalues, config.max_clusters, config.min_eigen_ratio)
    labels = cluster_spectral(eigenvectors, n_clusters, config.clusterer, config.random_state)
    embedding = embed_2d(
        vectors, config.embedding, config.embedding_neighbors, config.random_state,
        eigenvectors=eigenvectors,
    )
    scores = score_clusters(
        maps, vectors, labels, config.max_cluster_fraction, config.min_cluster_size,
        config.random_state,
    )
    clusters = [
        ClusterResult(
            cluster_id=item.cluster_id,
            member_rows=rows[labels == item.cluster_id],
            artifact_score=item.score,
            flagged=bool(item.score >= config.threshold),
            score_components=item.components,
            mean_heatmap=display[labels == item.cluster_id].mean(axis=0),
        )
        for item in scores
    ]
    clusters.sort(key=lambda c: (-c.artifact_score, c.cluster_id))
    logger.info(
        "class %s (%s, %s): %d samples, %d clusters, %d flagged, %.1f s",
        class_index, class_name, space, len(rows), n_clusters,
        sum(c.flagged for c in clusters), time.perf_counter() - started,
    )
    return ClassAnalysis(
        class_index=int(class_index),
        class_name=str(class_name),
        space=space,
        rows=rows,
        eigenvalues=eigenvalues,
        n_clusters=int(n_clusters),
        labels=labels,
        spectral_embedding=eigenvectors.astype(np.float32),
        embedding_2d=embedding,
        clusters=clusters,
        class_mean_heatmap=display.mean(axis=0),
        analysable=True,
    )


class _RowSelection:
    """Lazy view of ``source[indices]`` (ascending indices) that reads only what is sliced.

    Lets :func:`preprocess` stream one class out of an ``h5py`` dataset chunk by chunk.
    """

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source = source
        self.indices = indices
        self.shape = (len(indices), *tuple(source.shape[1:]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.source[self.indices[item]])


def analyze_dataset(
    heatmaps: Any,
    labels: Any,
    class_names: Sequence[str],
    config: SprayConfig | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    space: str = "heatmap",
) -> list[ClassAnalysis]:
    """Run SpRAy class by class.

    Args:
        heatmaps: (N, H, W) or (N, d) array-like over all attribution rows (a NumPy array
            or an ``h5py`` dataset; each class is read with ascending row indices).
        labels: (N,) class index per row (the grouping; usually the true label).
        class_names: name per class index.
        config: analysis parameters; defaults to ``SprayConfig()``.
        rows: restrict the analysis to these rows (e.g. correctly predicted ones);
            default all.
        classes: class indices to analyse, in this order; default every class that occurs
            among ``rows``. A requested class without samples is returned not analysable.
        space: name of the representation, stored with each result.

    Returns:
        One :class:`ClassAnalysis` per analysed class.
    """
    config = config or SprayConfig()
    all_labels = np.asarray(labels[...] if hasattr(labels, "shape") else labels).astype(np.int64)
    if len(all_labels) != heatmaps.shape[0]:
        raise AnalysisInputError(
            f"got {heatmaps.shape[0]} heatmaps but {len(all_labels)} labels."
        )
    selected = (
        np.arange(len(all_labels)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    )
    if len(selected) and (selected[0] < 0 or selected[-1] >= len(all_labels)):
        raise AnalysisInputError(f"rows must lie in [0, {len(all_labels)}).")
    selected_labels = all_labels[selected]
    outside = (selected_labels < 0) | (selected_labels >= len(class_names))
    if outside.any():
        raise AnalysisInputError(
            f"{int(outside.sum())} rows have labels outside 0..{len(class_names) - 1} "
            f"(e.g. row {int(selected[outside][0])} has label {int(selected_labels[outside][0])}); "
            "pass the full list of class names."
        )
    wanted = np.unique(selected_labels).tolist() if classes is None else list(classes)
    unknown = [c for c in wanted if not 0 <= int(c) < len(class_names)]
    if unknown:
        raise AnalysisInputError(
            f"classes {unknown} are not among the {len(class_names)} class names."
        )
    analyses = []
    for class_index in wanted:
        class_rows = selected[selected_labels == class_index]
        name = class_names[class_index]
        logger.info("analysing class %s (%s): %d samples", class_index, name, len(class_rows))
        analyses.append(
            analyze_class(
                _RowSelection(heatmaps, class_rows), class_rows, class_index, name, config, space
            )
        )
    return analyses
