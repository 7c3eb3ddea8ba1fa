"""The SpRAy analysis's settings (``[analysis]``), declared once (:mod:`spray.config`).

Every parameter of the steps of :mod:`spray.analysis.pipeline` lives in one
:class:`SprayConfig`, which is stored with the results so a report can say how they were
obtained. The steps' choices and defaults are declared here too, so a job spec validates
without importing the steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from spray.config import Choice, ConfigError, Each, Length, Pattern, Range, setting, validate

# The choices and defaults of the analysis steps live here, so that a job spec validates
# without importing the steps (scikit-learn and friends); each step imports its own.

# The Clever Hans score (spray.analysis.artifacts).
# Score at or above which a cluster is a candidate for the causal test (spray.confirm), which
# decides whether it is flagged. Chosen on the dev split of bench Q3 (docs/analysis.md, "From
# candidates to flags") among 0, 0.3, 0.5, 0.6 and 0.75, together with the test's constants
# (spray.confirm.config): 0.6 found the most relied-on artifacts there with the fewest models
# flagged falsely once a class's confirmed candidates are settled (spray.confirm.resolve).
DEFAULT_THRESHOLD = 0.6
DEFAULT_MIN_CLUSTER_SIZE = 3
# Clustering (spray.analysis.cluster).
CLUSTERERS = ("kmeans", "agglomerative", "dbscan", "hdbscan")
DEFAULT_MINIBATCH_ABOVE = 100_000
# Pictures (spray.analysis.embed).
EMBEDDINGS = ("umap", "tsne", "spectral")
DEFAULT_MAX_SAMPLES = 20_000
# Neighbour graph (spray.analysis.graph).
AFFINITIES = ("gaussian", "connectivity")
KNN_METHODS = ("auto", "exact", "ivf", "pynndescent")
DEFAULT_EXACT_BELOW = 20000
DEFAULT_PCA_COMPONENTS = 64
# Preprocessing (spray.analysis.preprocess).
RELEVANCE_MODES = ("signed", "positive", "absolute")
SCALINGS = ("sqrt", "linear")
NORMALISATIONS = ("l2", "max", "sum", "none")
DEFAULT_POOLED_SIZE = (16, 16)
# Eigengap (spray.analysis.spectral).
DEFAULT_N_EIGEN = 32
# Proposals are liberal because the causal test (spray.confirm) decides: chosen on the dev split of
# bench Q3 (1.5 against 5.0; at 5.0 legitimate two-mode classes were never split, so never shown).
DEFAULT_MIN_RATIO = 1.5

#: Smallest subset UMAP/t-SNE may be fitted on for large classes.
MIN_EMBED_SAMPLES = 100
HEATMAP_SPACE = "heatmap"
CONCEPT_PREFIX = "concept:"
#: ``spaces`` entry for every stored concept layer.
ALL_CONCEPTS = f"{CONCEPT_PREFIX}*"
#: Keys of earlier versions, with why they went: an old job file is told, an old
#: ``analysis.h5`` is read with them ignored.
RETIRED = {
    "max_cluster_fraction": "the size gate gave way to the causal test ([confirm]), which flags an artifact "
    "on any share of a class on the stamped side; delete the key",
}
SPACE = Pattern(r"heatmap|concept:.+", "'heatmap', 'concept:*' or 'concept:<layer>'", optional=False)


def concept_space(layer: str) -> str:
    """The ``space`` name of the concept relevances of ``layer``."""
    return f"{CONCEPT_PREFIX}{layer}"


def expand_spaces(spaces: tuple[str, ...] | list[str], layers: list[str]) -> list[str]:
    """``spaces`` with ``concept:*`` replaced by one ``concept:<layer>`` per stored layer, in order.

    Names are kept as given otherwise; whether a named layer exists is for the caller to say.
    """
    expanded: list[str] = []
    for space in spaces:
        if space == ALL_CONCEPTS:
            expanded.extend(concept_space(layer) for layer in layers)
        else:
            expanded.append(space)
    return expanded


def space_layer(space: str) -> str | None:
    """The layer of a ``concept:<layer>`` space (``*`` for every layer); None for the heatmap space."""
    return space[len(CONCEPT_PREFIX) :] if space.startswith(CONCEPT_PREFIX) else None


@dataclass
class SprayConfig:
    """Parameters of a SpRAy analysis.

    Attributes:
        spaces: what is clustered, in this order: ``"heatmap"`` (pooled LRP heatmaps),
            ``"concept:<layer>"`` (the concept-relevance vectors of one stored layer) or
            ``"concept:*"`` (every stored layer).
        dataset_wide: also analyse all classes together per space (class -1).
        pooled_size: (h, w) grid heatmaps are sum-pooled to (capped at their size); one
            integer for a square grid; ``None`` keeps full resolution.
        relevance: ``"signed"``, ``"positive"`` or ``"absolute"`` relevance.
        scaling: ``"sqrt"`` (Hellinger-like distances between relevance maps) or
            ``"linear"``; see :mod:`spray.analysis.preprocess`.
        normalisation: per-sample ``"l2"``, ``"max"``, ``"sum"`` or ``"none"``.
        n_neighbors: neighbours per sample in the affinity graph.
        n_eigen: Laplacian eigenpairs computed (capped at n - 1 per class).
        max_clusters: the eigengap considers at most this many clusters.
        min_eigen_ratio: eigengap ratio needed to report more than one cluster
            (see :func:`~spray.analysis.spectral.choose_n_clusters`).
        knn_method: neighbour search: ``"auto"`` (exact below ``knn_exact_below``
            samples, inverted-file index above), ``"exact"``, ``"ivf"`` or
            ``"pynndescent"`` (see :func:`~spray.analysis.graph.knn`).
        knn_exact_below: with ``knn_method="auto"``, exact kNN below this many samples.
        pca_components: the neighbour search runs on this many principal components
            (``None``: on the full vectors); see
            :func:`~spray.analysis.graph.reduce_dimensions`.
        affinity: ``"gaussian"`` (self-tuning kernel) or ``"connectivity"``.
        clusterer: ``"kmeans"``, ``"agglomerative"``, ``"dbscan"`` or ``"hdbscan"``.
        minibatch_above: k-means switches to mini-batches above this many samples.
        embedding: 2-d picture: ``"spectral"`` (default: the Laplacian eigenvectors the
            clusters were found in, free), ``"umap"`` or ``"tsne"`` (nicer islands, but UMAP
            compiles for about 13 s in every new process and each costs seconds per
            analysis; see ``docs/analysis.md``, "Pictures").
        embedding_neighbors: UMAP neighbourhood size.
        embedding_max_samples: UMAP/t-SNE embed at most this many samples directly; the
            others are placed through the kNN graph.
        threshold: artifact score at or above which a cluster is a candidate, tested
            causally (``[confirm]``) before it is flagged.
        min_cluster_size: clusters with fewer members are never flagged.
        min_class_size: classes with fewer analysable samples are not analysed
            (at least ``n_neighbors + 1`` is needed in any case).
        random_state: seed for every random step (a job's ``[job] seed``).
        n_threads: BLAS/OpenMP/torch threads during the analysis (``None``: leave the
            libraries' own setting). The default 1 is fastest on a machine shared with
            other work, where idle threads of multi-threaded BLAS spin and can make small
            matrix products ten times slower; raise it on a dedicated many-core machine.
    """

    spaces: tuple[str, ...] = setting((HEATMAP_SPACE, ALL_CONCEPTS), Each(SPACE), doc="what is clustered")
    dataset_wide: bool = setting(False, doc="also analyse all classes together")
    pooled_size: int | tuple[int, ...] | None = setting(DEFAULT_POOLED_SIZE, Length((2,)), Each(Range(1)), doc="grid heatmaps are pooled to")
    relevance: str = setting("signed", Choice(RELEVANCE_MODES), doc="signed, positive or absolute relevance")
    scaling: str = setting("sqrt", Choice(SCALINGS), doc="sqrt (Hellinger-like) or linear")
    normalisation: str = setting("l2", Choice(NORMALISATIONS), doc="per-sample normalisation")
    n_neighbors: int = setting(10, Range(1), doc="neighbours per sample in the affinity graph")
    n_eigen: int = setting(DEFAULT_N_EIGEN, Range(2), doc="Laplacian eigenpairs computed")
    max_clusters: int = setting(8, Range(1), doc="the eigengap considers at most this many clusters")
    min_eigen_ratio: float = setting(DEFAULT_MIN_RATIO, Range(1.0, low_open=True), doc="eigengap ratio needed for more than one cluster")
    knn_method: str = setting("auto", Choice(KNN_METHODS), doc="neighbour search")
    knn_exact_below: int = setting(DEFAULT_EXACT_BELOW, Range(0), doc="auto: exact kNN below this many samples")
    pca_components: int | None = setting(DEFAULT_PCA_COMPONENTS, Range(2), doc="principal components of the neighbour search")
    affinity: str = setting("gaussian", Choice(AFFINITIES), doc="edge weights of the graph")
    clusterer: str = setting("kmeans", Choice(CLUSTERERS), doc="clustering of the spectral embedding")
    minibatch_above: int = setting(DEFAULT_MINIBATCH_ABOVE, Range(1), doc="mini-batch k-means above this many samples")
    embedding: str = setting("spectral", Choice(EMBEDDINGS), doc="2-d picture")
    embedding_neighbors: int = setting(15, Range(2), doc="UMAP neighbourhood size")
    embedding_max_samples: int = setting(DEFAULT_MAX_SAMPLES, Range(MIN_EMBED_SAMPLES), doc="embedded directly; the rest placed by the graph")
    threshold: float = setting(DEFAULT_THRESHOLD, Range(), doc="artifact score at or above which a cluster is tested as a candidate")
    min_cluster_size: int = setting(DEFAULT_MIN_CLUSTER_SIZE, Range(1), doc="smallest flaggable cluster")
    min_class_size: int = setting(20, Range(2), doc="classes with fewer samples are not analysed")
    random_state: int = setting(0, Range(0, 2**32 - 1), doc="seed of every random step (the job's seed)", job_key=False)
    n_threads: int | None = setting(1, Range(1), doc="BLAS/OpenMP/torch threads during the analysis")

    RETIRED_KEYS: ClassVar[dict[str, str]] = RETIRED

    def __post_init__(self) -> None:
        if isinstance(self.pooled_size, int) and not isinstance(self.pooled_size, bool):
            self.pooled_size = (self.pooled_size, self.pooled_size)
        elif isinstance(self.pooled_size, list):
            self.pooled_size = tuple(self.pooled_size)
        if isinstance(self.spaces, (list, str)):
            self.spaces = (self.spaces,) if isinstance(self.spaces, str) else tuple(self.spaces)
        _numpy_scalars_to_python(self)
        validate(self)
        if not self.spaces:
            raise ConfigError("spaces", "must name at least one space, e.g. [\"heatmap\"]")
        if len(set(self.spaces)) != len(self.spaces):
            raise ConfigError("spaces", f"repeats a space: {list(self.spaces)}")
        if self.max_clusters >= self.n_eigen:
            raise ConfigError(
                "max_clusters",
                f"({self.max_clusters}) must be below n_eigen ({self.n_eigen}): the eigengap after the k-th "
                "eigenvalue needs eigenvalue k+1. Raise n_eigen or lower max_clusters",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SprayConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys default."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in values.items() if key not in RETIRED}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SprayConfig fields {unknown}; known: {sorted(known)}.")
        values = dict(values)
        for key in ("pooled_size", "spaces"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def _numpy_scalars_to_python(config: SprayConfig) -> None:
    """NumPy integers and floats given by library callers, as Python numbers (what the validator checks)."""
    for item in fields(config):
        value = getattr(config, item.name)
        if type(value).__module__ == "numpy" and hasattr(value, "item"):
            setattr(config, item.name, value.item())
