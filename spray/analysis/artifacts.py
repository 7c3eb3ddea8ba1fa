"""The Clever Hans score of each cluster of a class.

A Clever Hans strategy shows up in SpRAy as a cluster that is

* **displaced**: its relevance sits where the rest of the class puts little relevance
  (the model looks at a watermark, a border, a tag, not at the object);
* **consistent**: its members agree with each other on where that is (one artifact, one
  place), rather than being a bag of leftovers;
* **separated**: a distinct group of samples, not an arbitrary slice of a continuum of
  object positions that k-means had to cut somewhere.

Size is *not* a criterion: an artifact may sit on 90 % of a class. Which side of a split
carries the shortcut is decided by the causal test (:mod:`spray.confirm`), which pastes
each candidate's evidence into other classes' images; the score only proposes candidates.

Each cluster ``M`` is compared with the rest of its class ``R``. Every member's pooled map
``m_i`` is scaled by its total absolute relevance, ``s_i = m_i / sum |m_i|``; ``P_M`` and
``P_R`` are the relevance distributions of ``M`` and ``R``: the positive part of the mean
``s_i`` over the group, rescaled to sum 1 (scaled signed maps averaged *before* taking the
positive part, so that zero-mean noise cancels instead of adding a uniform floor). The
components, each in [0, 1]:

``displacement``  = ``1 - sum_p P_M(p) * P_R(p) / max_p P_R(p)``: the share of the
                    cluster's relevance on pixels the rest of the class does not look at,
                    each pixel weighted by the rest's attention relative to its peak. 0 when
                    the cluster looks only where the rest looks most (also when it looks at
                    a *part* of that region, e.g. a tighter crop of the same object), 1 when
                    it looks only where the rest puts nothing. (A total-variation distance
                    would also call "same place, different shape" displaced.)
``consistency``   = mean over members of ``cos(s_i, P_M)`` (clipped at 0): 1 when every
                    member's map has the shape of the cluster mean.
``separation``    = ``1 - conductance / MAX_CONDUCTANCE`` clipped to [0, 1], where the
                    conductance is the share of the cluster's edge weight in the kNN
                    affinity graph (the graph SpRAy clustered) that leads out of it,
                    ``cut(M, R) / vol(M)``. A distinct group keeps its neighbours to itself
                    (conductance near 0); a slice of a continuum shares a border with the
                    next slice. Above ``MAX_CONDUCTANCE`` = 0.05 the cluster counts as not
                    separated at all.
``concentration`` = ``t_M / (t_M + t_R)``, with ``t_X`` the share of ``P_X``'s mass in its
                    top 5 % pixels: 0.5 when the cluster is as concentrated as the rest.
                    Reported for the reader, not part of the score (frames and text banners
                    are artifacts *less* concentrated than the object).
``size_fraction`` = ``|M| / (|M| + |R|)``, reported for the reader. In a dataset-wide
                    analysis (all classes together) it is the largest share of any one
                    class held by the cluster, and the gate below uses it there: a cluster
                    that is (most of) one class is that class's main strategy, not a
                    strategy inside it.

The score is the geometric mean of the first three, times a gate::

    score = gate * (displacement * consistency * separation) ** (1/3)
    gate  = 1 if min_cluster_size <= |M| and min_cluster_size <= |R|
              (and, dataset-wide only, size_fraction <= 0.5) else 0

A geometric mean because every property is needed: a cluster that looks elsewhere but is
only a slice of a continuum (low separation), or a well-separated group that looks at the
same object (low displacement), is a sub-strategy, not a Clever Hans; one low term pulls
the score down however high the others are. Clusters below ``min_cluster_size`` members are
outliers, too small to call a strategy. A class with a single cluster has no rest to
compare with: its cluster scores 0 (one strategy means no distinct strategy). So does a
cluster whose rest (its class's other clusters together) holds fewer than
``min_cluster_size`` samples: it is its class up to a few outliers, and a contrast with
outliers says what the outliers lack, not what the cluster adds (on bench Q3 a 798-of-800
concept-space cluster of a model that ignored its planted watermark scored 0.96 against its
2 outliers, and its evidence, the class's own object, moved other classes' images more than
the outliers' did). Within one
class every side of a split may be proposed, the majority included (an artifact on most
of a class); the causal test then says which side moves predictions. In a dataset-wide
analysis, a cluster holding more than ``DATASET_WIDE_MAX_SHARE`` of one class is that
class, not a strategy, and is not proposed.

Why conductance and not a silhouette: on MNIST with planted artifacts (``bench/detection.py``)
the mean silhouette of artifact clusters in the analysis space was only 0.3-0.5 (pixel
noise makes every within-cluster distance large), no higher than for k-means slices of
clean classes (up to 0.46), while their conductance was below 0.01 against 0.02-0.29 for
the slices. ``docs/analysis.md`` has the numbers.

:data:`spray.analysis.config.DEFAULT_THRESHOLD` is the score at or above which a cluster is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from spray.analysis.config import DEFAULT_MIN_CLUSTER_SIZE

TOP_PIXEL_SHARE = 0.05
#: In a dataset-wide analysis, a cluster holding more than this share of one class is that
#: class's main strategy (the clustering found the classes), not a candidate.
DATASET_WIDE_MAX_SHARE = 0.5

# Conductance at and above which a cluster counts as not separated (separation 0).
MAX_CONDUCTANCE = 0.05

COMPONENTS = ("displacement", "consistency", "separation", "concentration", "size_fraction")
SCORED = ("displacement", "consistency", "separation")

# Rows of maps scaled at a time: bounds the float64 working memory for any class size.
SCORE_CHUNK = 16384


@dataclass
class ClusterScore:
    """Clever Hans score of one cluster and the named terms it is made of."""

    cluster_id: int
    score: float
    components: dict[str, float]


def scaled_maps(maps: np.ndarray) -> np.ndarray:
    """(n, P) signed maps, each divided by its total absolute relevance (zeros stay zero).

    Puts samples with strong and weak relevance on one scale before averaging.
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    total = np.abs(flat).sum(axis=1, keepdims=True)
    return flat / np.where(total > 0, total, 1.0)


def group_distribution(scaled: np.ndarray) -> np.ndarray:
    """Where a group of samples puts its relevance, as a distribution over pixels.

    The mean of the scaled signed maps, then its positive part, rescaled to sum 1 (all
    zeros if nothing is positive). Averaging before clipping lets zero-mean noise cancel
    instead of piling up as a uniform floor that would mask real differences.
    """
    if len(scaled) == 0:
        return np.zeros(scaled.shape[1])
    mean = np.maximum(scaled.mean(axis=0), 0.0)
    total = mean.sum()
    return mean / total if total > 0 else mean


def group_distribution_from_sum(summed: np.ndarray, count: int) -> np.ndarray:
    """:func:`group_distribution` from the sum of a group's scaled maps and its size."""
    if count <= 0:
        return np.zeros_like(summed)
    mean = np.maximum(summed / count, 0.0)
    total = mean.sum()
    return mean / total if total > 0 else mean


def top_share(distribution: np.ndarray, share: float = TOP_PIXEL_SHARE) -> float:
    """Mass of a distribution in its top ``share`` of pixels (at least one pixel)."""
    count = max(1, int(np.ceil(share * distribution.size)))
    return float(np.sort(distribution)[-count:].sum())


def displacement(cluster: np.ndarray, rest: np.ndarray) -> float:
    """Share of the cluster's relevance on pixels the rest of the class does not look at.

    ``1 - sum_p P_M(p) * P_R(p) / max P_R``: each pixel is weighted by how much attention
    the rest pays to it relative to its most-looked-at pixel.
    """
    peak = rest.max() if rest.size else 0.0
    if peak <= 0 or cluster.sum() <= 0:
        return 0.0
    return float(np.clip(1.0 - (cluster * (rest / peak)).sum(), 0.0, 1.0))


def mean_cosine(rows: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity of ``rows`` to ``reference``, clipped at 0 (zero rows count 0)."""
    ref_norm = np.linalg.norm(reference)
    if len(rows) == 0 or ref_norm == 0:
        return 0.0
    norms = np.linalg.norm(rows, axis=1)
    cosines = (rows @ reference) / (np.where(norms > 0, norms, 1.0) * ref_norm)
    return max(0.0, float(cosines.mean()))


def conductances(graph: sp.spmatrix, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per cluster: the share of its members' edge weight that leads to other clusters.

    ``cut(M, R) / vol(M)`` with ``vol(M)`` the summed degree of the members; 0 for a
    cluster without edges.
    """
    edges = sp.coo_matrix(graph)
    position = np.searchsorted(ids, labels)
    source, target = position[edges.row], position[edges.col]
    volume = np.bincount(source, weights=edges.data, minlength=len(ids))
    inside = source == target
    internal = np.bincount(source[inside], weights=edges.data[inside], minlength=len(ids))
    safe = np.where(volume > 0, volume, 1.0)
    return np.where(volume > 0, 1.0 - internal / safe, 0.0)


def separation_from_conductance(conductance: float, limit: float = MAX_CONDUCTANCE) -> float:
    """``1 - conductance / limit``, clipped to [0, 1]."""
    return float(np.clip(1.0 - conductance / limit, 0.0, 1.0))


def combine(components: dict[str, float]) -> float:
    """Geometric mean of displacement, consistency and separation."""
    terms = [max(0.0, components[name]) for name in SCORED]
    return float(np.prod(terms) ** (1.0 / len(terms)))


def comparable(size: int, total: int, min_cluster_size: int) -> bool:
    """Whether a cluster of ``size`` of its analysis's ``total`` samples is a strategy with
    another one to compare with: both it and its rest hold at least ``min_cluster_size``
    (a smaller side is outliers). The score's gate and the causal test's choice of clusters
    under the threshold share this rule."""
    return size >= min_cluster_size and total - size >= min_cluster_size


def largest_group_share(groups: np.ndarray, members: np.ndarray) -> float:
    """``max_g |M & g| / |g|``: the largest share of any one group (class) held by the
    members (boolean mask aligned with ``groups``)."""
    groups = np.asarray(groups)
    names, totals = np.unique(groups, return_counts=True)
    inside = np.unique(groups[members], return_counts=True)
    if inside[0].size == 0:
        return 0.0
    return float((inside[1] / totals[np.searchsorted(names, inside[0])]).max())


def _scaled_rows(maps: np.ndarray, start: int, stop: int) -> np.ndarray:
    return scaled_maps(np.asarray(maps[start:stop]))


def _one_hot(block: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return (block[:, None] == ids[None, :]).astype(np.float64)


def group_sums(maps: np.ndarray, labels: np.ndarray, ids: np.ndarray, chunk: int = SCORE_CHUNK) -> np.ndarray:
    """(len(ids), P) sums of the scaled maps of each group, read ``chunk`` rows at a time."""
    n = len(labels)
    sums = np.zeros((len(ids), int(np.prod(maps.shape[1:]))))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sums += _one_hot(labels[start:stop], ids).T @ _scaled_rows(maps, start, stop)
    return sums


def mean_cosines(
    maps: np.ndarray, labels: np.ndarray, ids: np.ndarray, references: np.ndarray,
    chunk: int = SCORE_CHUNK,
) -> np.ndarray:
    """Per group: mean cosine of its members' scaled maps to its reference, clipped at 0."""
    n = len(labels)
    position = np.searchsorted(ids, labels)
    ref_norms = np.linalg.norm(references, axis=1)
    totals = np.zeros(len(ids))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scaled = _scaled_rows(maps, start, stop)
        where = position[start:stop]
        norms = np.linalg.norm(scaled, axis=1)
        dots = np.take_along_axis(scaled @ references.T, where[:, None], axis=1)[:, 0]
        scale = norms * ref_norms[where]
        cosines = np.where(scale > 0, dots / np.where(scale > 0, scale, 1.0), 0.0)
        totals += np.bincount(where, weights=cosines, minlength=len(ids))
    counts = np.bincount(position, minlength=len(ids))
    return np.maximum(0.0, totals / np.maximum(counts, 1))


def score_clusters(
    maps: np.ndarray,
    vectors: np.ndarray,
    labels: np.ndarray,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
    random_state: int = 0,
    graph: sp.spmatrix | None = None,
    groups: np.ndarray | None = None,
) -> list[ClusterScore]:
    """Clever Hans score of every cluster of one class (formula: module docstring).

    Args:
        maps: (n, h, w) or (n, P) relevance maps of the class (sign as analysed; only the
            positive part of group means is used). Any positive per-sample scaling is
            irrelevant (each map is divided by its total absolute relevance first). Read
            in chunks, so a lazy view such as
            :func:`~spray.analysis.preprocess.linear_maps` works.
        vectors: (n, d) analysis vectors; used only to build the kNN affinity graph when
            ``graph`` is not given.
        labels: (n,) cluster label per sample.
        min_cluster_size: clusters with fewer members score 0, and so do clusters whose
            rest (the other clusters together) is smaller.
        random_state: seeds the graph's neighbour search when it is built here.
        graph: the (n, n) affinity graph the clusters were found in.
        groups: (n,) class of each sample when the samples span several classes (a
            dataset-wide analysis). ``size_fraction`` is then the largest share of any
            one class that the cluster holds, and a cluster holding more than
            ``DATASET_WIDE_MAX_SHARE`` of a class (it *is* that class) scores 0.

    Returns:
        One :class:`ClusterScore` per cluster id, in ascending id order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    ids = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in ids])
    sums = group_sums(maps, labels, ids)
    total = sums.sum(axis=0)
    means_in = [group_distribution_from_sum(sums[j], counts[j]) for j in range(len(ids))]
    consistency = mean_cosines(maps, labels, ids, np.stack(means_in))
    if len(ids) > 1 and graph is None:
        from spray.analysis.graph import affinity_graph  # noqa: PLC0415 - avoids a cycle

        graph = affinity_graph(
            np.asarray(vectors, dtype=np.float32), min(10, n - 1), random_state=random_state
        )
    conductance = conductances(graph, labels, ids) if len(ids) > 1 else np.zeros(len(ids))
    scores = []
    for j, cluster in enumerate(ids):
        size = int(counts[j])
        mean_in = means_in[j]
        components = {name: 0.0 for name in COMPONENTS}
        components["consistency"] = float(consistency[j])
        components["size_fraction"] = size / n if groups is None else largest_group_share(groups, labels == cluster)
        if len(ids) > 1:
            mean_out = group_distribution_from_sum(total - sums[j], n - size)
            top_in, top_out = top_share(mean_in), top_share(mean_out)
            components["displacement"] = displacement(mean_in, mean_out)
            components["separation"] = separation_from_conductance(float(conductance[j]))
            components["concentration"] = (
                top_in / (top_in + top_out) if top_in + top_out > 0 else 0.0
            )
        gate = (
            len(ids) > 1
            and comparable(size, n, min_cluster_size)
            and (groups is None or components["size_fraction"] <= DATASET_WIDE_MAX_SHARE)
        )
        score = combine(components) if gate else 0.0
        scores.append(ClusterScore(int(cluster), score, components))
    return scores
