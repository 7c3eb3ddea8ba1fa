"""SpRAy end to end: heatmaps of a class -> clusters with Clever Hans scores.

Per class: :func:`~spray.analysis.preprocess.preprocess` (pool, sign, normalise) ->
:func:`~spray.analysis.graph.reduce_dimensions` (PCA for the neighbour search) ->
:func:`~spray.analysis.graph.affinity_graph` (sparse kNN) ->
:func:`~spray.analysis.spectral.laplacian_eigenpairs` and
:func:`~spray.analysis.spectral.choose_n_clusters` (eigengap) ->
:func:`~spray.analysis.cluster.cluster_spectral` (Ng-Jordan-Weiss) ->
:func:`~spray.analysis.artifacts.score_clusters` (Clever Hans score) and
:func:`~spray.analysis.embed.embed_2d` (picture). Every parameter of these steps lives in
one :class:`SprayConfig`, which is stored with the results so a report can say how they
were obtained.

Entry points:

* :func:`analyze_class`: one group of samples (a class, or the whole dataset).
* :func:`analyze_dataset`: every class of one representation.
* :func:`analyze_spaces`: several representations in one call (the heatmaps and the
  concept relevances of named layers), per class and optionally dataset-wide
  (``class_index == -1``). The ``space`` string of each result names its representation:
  ``"heatmap"`` or ``"concept:<layer>"``.

Bad data never stops a whole analysis: a class whose heatmaps hold NaN/Inf values, that
has too few samples for the neighbour graph, or only constant maps comes back with
``analysable=False`` and a ``reason`` saying what to do, and the other classes are
analysed as usual.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence
from threadpoolctl import threadpool_limits

from spray.analysis.artifacts import score_clusters
from spray.analysis.cluster import cluster_spectral
from spray.analysis.config import CONCEPT_PREFIX, HEATMAP_SPACE, SprayConfig, concept_space, expand_spaces
from spray.analysis.embed import embed_2d
from spray.analysis.graph import affinity_graph, reduce_dimensions
from spray.analysis.preprocess import AnalysisInputError, linear_maps, preprocess
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.analysis.spectral import choose_n_clusters, laplacian_eigenpairs

logger = logging.getLogger(__name__)

DATASET_WIDE = -1
DATASET_WIDE_NAME = "all classes"


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


@contextlib.contextmanager
def thread_limit(n_threads: int | None) -> Iterator[None]:
    """Limit BLAS/OpenMP (and torch, if imported) to ``n_threads`` inside the block."""
    if n_threads is None:
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(n_threads)
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def analyze_class(
    heatmaps: Any,
    rows: Sequence[int] | np.ndarray,
    class_index: int,
    class_name: str,
    config: SprayConfig | None = None,
    space: str = HEATMAP_SPACE,
    timings: dict[str, float] | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
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
        timings: if given, receives the seconds spent per step (``"preprocess"``,
            ``"pca"``, ``"graph"``, ``"eigen"``, ``"cluster"``, ``"score"``, ``"embed"``).
        groups: class of each row when the rows span several classes (dataset-wide):
            the artifact score's minority rule is then applied per class (see
            :func:`~spray.analysis.artifacts.score_clusters`).

    Returns:
        The class's :class:`ClassAnalysis`, clusters sorted by artifact score (highest
        first). Samples with constant heatmaps are left out of the analysis (logged). A
        class with too few analysable samples, or only constant heatmaps comes back with
        ``analysable=False`` and a ``reason`` instead of raising.

    Raises:
        AnalysisInputError: heatmaps with NaN/Inf values (naming the rows), or a shape
            mismatch between heatmaps and rows. :func:`analyze_dataset` turns these into
            a not-analysable result for the class.
    """
    config = config or SprayConfig()
    with thread_limit(config.n_threads):
        return _analyze_class(heatmaps, rows, class_index, class_name, config, space, timings, groups)


def _analyze_class(
    heatmaps: Any,
    rows: Sequence[int] | np.ndarray,
    class_index: int,
    class_name: str,
    config: SprayConfig,
    space: str,
    timings: dict[str, float] | None,
    groups: Sequence[int] | np.ndarray | None = None,
) -> ClassAnalysis:
    clock = _Clock(timings)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    if n == 0:
        return not_analysable(class_index, class_name, space, "no samples of this class.")
    if heatmaps.shape[0] != n:
        raise AnalysisInputError(f"got {heatmaps.shape[0]} heatmaps but {n} row indices.")
    if groups is not None and len(groups) != n:
        raise AnalysisInputError(f"got {len(groups)} group labels but {n} row indices.")
    prepared = preprocess(
        heatmaps, config.pooled_size, config.relevance, config.normalisation, rows=rows,
        keep_pooled=False, scaling=config.scaling,
    )
    map_shape = prepared.map_shape
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
    selection = order[keep]
    kept_groups = None if groups is None else np.asarray(groups)[selection]
    if np.array_equal(selection, np.arange(n)):
        vectors = prepared.vectors  # no copy: the common case of ascending, clean rows
    else:
        vectors = prepared.vectors[selection]
    del prepared
    clock.lap("preprocess")

    search = reduce_dimensions(
        vectors, config.pca_components, random_state=config.random_state
    )
    clock.lap("pca")
    graph = affinity_graph(
        search, config.n_neighbors, config.affinity, config.knn_exact_below,
        config.random_state, config.knn_method,
    )
    clock.lap("graph")
    try:
        eigenvalues, eigenvectors = laplacian_eigenpairs(
            graph, config.n_eigen, config.random_state
        )
    except (ArpackNoConvergence, ArpackError) as error:
        return not_analysable(
            class_index, class_name, space,
            f"the eigensolver did not converge on the {len(rows)}-sample graph ({error}); "
            "try another n_neighbors or n_eigen.",
        )
    n_clusters = choose_n_clusters(eigenvalues, config.max_clusters, config.min_eigen_ratio)
    clock.lap("eigen")
    labels = cluster_spectral(
        eigenvectors, n_clusters, config.clusterer, config.random_state,
        minibatch_above=config.minibatch_above,
    )
    n_clusters = int(labels.max()) + 1
    clock.lap("cluster")
    maps = linear_maps(vectors, config.scaling)
    scores = score_clusters(
        maps, vectors, labels, config.min_cluster_size,
        config.random_state, graph=graph, groups=kept_groups,
    )
    sums, counts = _cluster_sums(maps, labels)
    clock.lap("score")
    embedding = embed_2d(
        search, config.embedding, config.embedding_neighbors, config.random_state,
        eigenvectors=eigenvectors, graph=graph, max_samples=config.embedding_max_samples,
    )
    clock.lap("embed")
    # until the causal test (spray.confirm) rules, a candidate counts as flagged: never as clean
    candidates = {item.cluster_id: is_candidate(item.score, int(counts[item.cluster_id]), n_clusters, config) for item in scores}
    clusters = [
        ClusterResult(
            cluster_id=item.cluster_id,
            member_rows=rows[labels == item.cluster_id],
            artifact_score=item.score,
            flagged=candidates[item.cluster_id],
            candidate=candidates[item.cluster_id],
            score_components=item.components,
            mean_heatmap=(sums[item.cluster_id] / counts[item.cluster_id]).reshape(map_shape).astype(np.float32),
        )
        for item in scores
    ]
    clusters.sort(key=lambda c: (-c.artifact_score, c.cluster_id))
    logger.info(
        "class %s (%s, %s): %d samples, %d clusters, %d flagged, %.1f s",
        class_index, class_name, space, len(rows), n_clusters,
        sum(c.flagged for c in clusters), clock.total(),
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
        class_mean_heatmap=(sums.sum(axis=0) / len(rows)).reshape(map_shape).astype(np.float32),
        analysable=True,
    )


def is_candidate(score: float, size: int, n_clusters: int, config: SprayConfig) -> bool:
    """Whether a cluster is proposed for the causal test: one of several clusters of its
    class, of at least ``min_cluster_size`` members, scoring at least ``threshold``."""
    return n_clusters > 1 and size >= config.min_cluster_size and score >= config.threshold


class _Clock:
    """Seconds per named step, written into ``timings`` when one is given."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.started = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def _cluster_sums(vectors: Any, labels: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (float64) and sizes of (n, d) rows, read in chunks."""
    n_clusters = int(labels.max()) + 1
    ids = np.arange(n_clusters)
    sums = np.zeros((n_clusters, vectors.shape[1]))
    for start in range(0, len(labels), chunk):
        one_hot = (labels[start : start + chunk, None] == ids[None, :]).astype(np.float64)
        sums += one_hot.T @ np.asarray(vectors[start : start + chunk], dtype=np.float64)
    return sums, np.bincount(labels, minlength=n_clusters)


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


def _select_rows(
    n_rows: int, labels: Any, class_names: Sequence[str], rows: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(selected rows ascending, their labels)``."""
    all_labels = np.asarray(labels[...] if hasattr(labels, "shape") else labels).astype(np.int64)
    if len(all_labels) != n_rows:
        raise AnalysisInputError(f"got {n_rows} heatmaps but {len(all_labels)} labels.")
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
    return selected, selected_labels


@dataclass(frozen=True)
class AnalysisTask:
    """One analysis: the ``rows`` (ascending) of one class (or of the whole dataset, with
    their ``groups``) in one ``space``. Tasks are independent of each other, so they can run
    anywhere and in any order."""

    space: str
    class_index: int
    class_name: str
    rows: np.ndarray
    groups: np.ndarray | None = None

    def describe(self) -> str:
        return f"class {self.class_index} ({self.class_name}, {self.space}): {len(self.rows)} samples"


#: Runs analysis tasks on their spaces' sources (``space -> (N, ...) array or h5py dataset``)
#: and returns their results in the tasks' order.
TaskRunner = Callable[[Sequence[AnalysisTask], Mapping[str, Any], SprayConfig], list[ClassAnalysis]]


def run_task(source: Any, task: AnalysisTask, config: SprayConfig, loaded: bool = False) -> ClassAnalysis:
    """One task's analysis. ``source``: the space's (N, ...) rows, or with ``loaded`` exactly
    the task's rows in order (what a Dask worker receives). Bad input gives a
    not-analysable result (:func:`analyze_dataset`)."""
    logger.info("analysing %s", task.describe())
    vectors = source if loaded else _RowSelection(source, task.rows)
    try:
        return analyze_class(vectors, task.rows, task.class_index, task.class_name, config, task.space, groups=task.groups)
    except AnalysisInputError as error:
        logger.warning("%s not analysed: %s", task.describe(), error)
        return not_analysable(task.class_index, task.class_name, task.space, str(error))


def run_here(tasks: Sequence[AnalysisTask], sources: Mapping[str, Any], config: SprayConfig) -> list[ClassAnalysis]:
    """The default :data:`TaskRunner`: every task in this process, one after another."""
    return [run_task(sources[task.space], task, config) for task in tasks]


def analyze_dataset(
    heatmaps: Any,
    labels: Any,
    class_names: Sequence[str],
    config: SprayConfig | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    space: str = HEATMAP_SPACE,
    dataset_wide: bool = False,
    runner: TaskRunner | None = None,
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
        dataset_wide: also analyse all selected rows together, as class ``-1``
            (``"all classes"``), appended last.
        runner: runs the (class) analyses; default :func:`run_here` (one after another in
            this process); :func:`spray.analysis.distributed.dask_runner` spreads them over
            Dask workers with the same results.

    Returns:
        One :class:`ClassAnalysis` per analysed class. A class whose heatmaps contain
        NaN/Inf values is returned not analysable, its ``reason`` naming the rows.

    Raises:
        AnalysisInputError: labels and heatmaps of different lengths, rows out of range,
            labels without a class name, unknown requested classes.
    """
    config = config or SprayConfig()
    selected, selected_labels = _select_rows(heatmaps.shape[0], labels, class_names, rows)
    wanted = _wanted_classes(selected_labels, class_names, classes)
    return (runner or run_here)(tasks_for(space, selected, selected_labels, wanted, class_names, dataset_wide), {space: heatmaps}, config)


def _wanted_classes(selected_labels: np.ndarray, class_names: Sequence[str], classes: Sequence[int] | None) -> list[int]:
    """The classes to analyse, in order: ``classes``, or every class among the selected rows."""
    wanted = np.unique(selected_labels).tolist() if classes is None else list(classes)
    unknown = [c for c in wanted if not 0 <= int(c) < len(class_names)]
    if unknown:
        raise AnalysisInputError(
            f"classes {unknown} are not among the {len(class_names)} class names."
        )
    return [int(c) for c in wanted]


def tasks_for(
    space: str, selected: np.ndarray, selected_labels: np.ndarray, classes: Sequence[int],
    class_names: Sequence[str], dataset_wide: bool,
) -> list[AnalysisTask]:
    """The analyses of one space: each class of ``classes`` in order, then the dataset-wide one."""
    tasks = [
        AnalysisTask(space, int(index), str(class_names[index]), selected[selected_labels == index]) for index in classes
    ]
    if dataset_wide:
        tasks.append(AnalysisTask(space, DATASET_WIDE, DATASET_WIDE_NAME, selected, selected_labels))
    return tasks


def analyze_spaces(
    heatmaps: Any,
    labels: Any,
    class_names: Sequence[str],
    config: SprayConfig | None = None,
    concepts: Mapping[str, Any] | None = None,
    spaces: Sequence[str] | None = None,
    dataset_wide: bool | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    runner: TaskRunner | None = None,
) -> list[ClassAnalysis]:
    """Run SpRAy in several representations at once, per class and optionally dataset-wide.

    Args:
        heatmaps: (N, H, W) heatmaps (e.g. ``attributions.h5``'s ``attribution``).
        labels: (N,) class index per row.
        class_names: name per class index.
        config: analysis parameters, shared by every space; defaults to ``SprayConfig()``.
        concepts: layer name -> (N, C) concept-relevance vectors (``concepts/<layer>``).
        spaces: which representations, in this order: ``"heatmap"``,
            ``"concept:<layer>"`` for a layer of ``concepts``, or ``"concept:*"`` for every
            layer of ``concepts`` (in their order); None: ``config.spaces``.
        dataset_wide: also analyse all selected rows of each space together (class -1);
            None: ``config.dataset_wide``.
        rows, classes, runner: as for :func:`analyze_dataset`.

    Returns:
        The results of :func:`analyze_dataset` for each space, concatenated in the order
        of ``spaces`` (each space: its classes, then its dataset-wide result).

    Raises:
        AnalysisInputError: an unknown space or layer (naming the available ones), and the
            errors of :func:`analyze_dataset`.
    """
    config = config or SprayConfig()
    spaces = config.spaces if spaces is None else spaces
    dataset_wide = config.dataset_wide if dataset_wide is None else dataset_wide
    concepts = dict(concepts or {})
    resolved: list[tuple[str, Any]] = []
    for space in expand_spaces(spaces, list(concepts)):
        if space == HEATMAP_SPACE:
            resolved.append((space, heatmaps))
        elif space.startswith(CONCEPT_PREFIX) and space[len(CONCEPT_PREFIX) :] in concepts:
            resolved.append((space, concepts[space[len(CONCEPT_PREFIX) :]]))
        else:
            available = [HEATMAP_SPACE] + [concept_space(layer) for layer in concepts]
            raise AnalysisInputError(
                f"unknown analysis space {space!r}; available: {available} "
                "(concept spaces need the layer among the attribution's concept layers)."
            )
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise AnalysisInputError(f"analysis spaces repeat: {names}.")
    for name, source in resolved:
        if source.shape[0] != heatmaps.shape[0]:
            raise AnalysisInputError(f"space {name!r} has {source.shape[0]} rows but the heatmaps have {heatmaps.shape[0]}.")
    selected, selected_labels = _select_rows(heatmaps.shape[0], labels, class_names, rows)
    wanted = _wanted_classes(selected_labels, class_names, classes)
    tasks = [
        task for space in names for task in tasks_for(space, selected, selected_labels, wanted, class_names, dataset_wide)
    ]
    return (runner or run_here)(tasks, dict(resolved), config)
