"""The Clever Hans score of each cluster of a class.

A Clever Hans strategy shows up in SpRAy as a cluster that is

* **displaced**: its relevance sits where the rest of the class puts little relevance
  (the model looks at a watermark, a border, a tag, not at the object);
* **consistent**: its members agree with each other on where that is (one artifact, one
  place), rather than being a bag of leftovers;
* **separated**: a distinct group in the analysis space, not an arbitrary slice of a
  continuum of object positions that k-means had to cut somewhere;
* **concentrated** (a weaker cue): artifacts are usually small, so its mean map puts
  more of its mass on few pixels than the rest of the class does;
* **a minority**: the artifact is the exception in the class, not the rule.

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
``separation``    = mean silhouette of the members in the analysis space (Euclidean, the
                    nearest *other cluster* as the alternative), clipped at 0. A slice of a
                    continuum has neighbours in the next slice and scores low.
``concentration`` = ``t_M / (t_M + t_R)``, with ``t_X`` the share of ``P_X``'s mass in its
                    top 5 % pixels: 0.5 when the cluster is as concentrated as the rest,
                    towards 1 when it is much more concentrated.
``size_fraction`` = ``|M| / (|M| + |R|)``, reported, and used only by the gate below.

The score is the geometric mean of the first four, times a gate::

    score = gate * (displacement * consistency * separation * concentration) ** (1/4)
    gate  = 1 if min_cluster_size <= |M| and size_fraction <= max_cluster_fraction else 0

A geometric mean because every property is needed: a cluster that looks elsewhere but is
only a slice of a continuum (low separation), or a well-separated group that looks at the
same object (low displacement), is a sub-strategy, not a Clever Hans; one low term pulls
the score down however high the others are. ``concentration`` enters with the same weight
but, being a ratio of two shares, rarely gets near 0: a spread-out artifact (a text banner)
that is *less* concentrated than the object still scores e.g. 0.2 / (0.2 + 0.4) = 0.33, so
it tilts the score rather than vetoing it. The gate encodes the minority
rule: a cluster holding more than ``max_cluster_fraction`` (default 0.5) of the class is
the class's main strategy and cannot be flagged, and clusters below ``min_cluster_size``
members are outliers, too small to call a strategy. A class with a single cluster has no
rest to compare with: its cluster scores 0 (one strategy means no distinct strategy).

:data:`DEFAULT_THRESHOLD` is the score at or above which a cluster is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Score at or above which a cluster is flagged as a likely Clever Hans strategy.
# Evidence (embedded demo, 4 classes x 600 training images, DemoNet, LRP epsilon-plus-flat,
# default SprayConfig): in three runs (30 % of "square" tagged, seeds 0 and 1; 10 % tagged,
# seed 0) the eigengap found two clusters in "square" only, one of them exactly the tagged
# images, scoring 0.81, 0.65 and 0.66. A model trained without tags gives one cluster per
# class, so nothing to flag. Forcing k = 2..8 clusters on the untagged classes of these
# four runs gives clusters scoring at most 0.57. On synthetic 16x16 classes
# (tests/analysis/conftest.py) planted corner clusters score 0.67-0.89 and forced splits of
# clean classes 0.29-0.60. 0.6 sits between the forced splits and the weakest real artifact;
# the margin is about 0.05 on either side, so re-check it when the demo model changes.
DEFAULT_THRESHOLD = 0.6

DEFAULT_MAX_CLUSTER_FRACTION = 0.5
DEFAULT_MIN_CLUSTER_SIZE = 3
TOP_PIXEL_SHARE = 0.05

COMPONENTS = ("displacement", "consistency", "separation", "concentration", "size_fraction")

# Members (and samples of each other cluster) used to estimate silhouettes: bounds the cost
# at O(k^2 * SILHOUETTE_SAMPLES^2 * d) for any class size.
SILHOUETTE_SAMPLES = 400

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


def cluster_silhouettes(
    vectors: np.ndarray,
    labels: np.ndarray,
    random_state: int = 0,
    max_samples: int = SILHOUETTE_SAMPLES,
) -> dict[int, float]:
    """Mean silhouette per cluster, estimated on at most ``max_samples`` per cluster.

    For a member ``i``: ``a`` = mean distance to the other members, ``b`` = smallest mean
    distance to the members of another cluster, ``s_i = (b - a) / max(a, b)``. Clusters of
    one sample, and classes of one cluster, get 0.
    """
    rng = np.random.default_rng(random_state)
    ids = np.unique(labels)
    samples = {}
    for cluster in ids:
        members = np.flatnonzero(labels == cluster)
        if len(members) > max_samples:
            members = np.sort(rng.choice(members, max_samples, replace=False))
        samples[int(cluster)] = np.asarray(vectors[members], dtype=np.float64)
    result = {int(c): 0.0 for c in ids}
    if len(ids) < 2:
        return result
    for cluster, own in samples.items():
        if len(own) < 2:
            continue
        within = _distances(own, own)
        a = within.sum(axis=1) / (len(own) - 1)
        b = np.full(len(own), np.inf)
        for other, points in samples.items():
            if other != cluster:
                b = np.minimum(b, _distances(own, points).mean(axis=1))
        scale = np.maximum(a, b)
        silhouette = np.where(scale > 0, (b - a) / np.where(scale > 0, scale, 1.0), 0.0)
        result[cluster] = float(silhouette.mean())
    return result


def _distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    squared = (
        (first**2).sum(axis=1)[:, None] + (second**2).sum(axis=1)[None, :] - 2 * first @ second.T
    )
    return np.sqrt(np.maximum(squared, 0.0))


def combine(components: dict[str, float]) -> float:
    """Geometric mean of displacement, consistency, separation and concentration."""
    terms = [max(0.0, components[name]) for name in COMPONENTS[:4]]
    return float(np.prod(terms) ** (1.0 / len(terms)))


def _scaled_rows(maps: np.ndarray, start: int, stop: int) -> np.ndarray:
    return scaled_maps(np.asarray(maps[start:stop]))


def group_sums(maps: np.ndarray, labels: np.ndarray, ids: np.ndarray, chunk: int = SCORE_CHUNK) -> np.ndarray:
    """(len(ids), P) sums of the scaled maps of each group, read ``chunk`` rows at a time."""
    n = len(labels)
    sums = np.zeros((len(ids), int(np.prod(maps.shape[1:]))))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scaled = _scaled_rows(maps, start, stop)
        block = labels[start:stop]
        for position, cluster in enumerate(ids):
            inside = block == cluster
            if inside.any():
                sums[position] += scaled[inside].sum(axis=0)
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
        dots = np.einsum("ij,ij->i", scaled, references[where])
        scale = norms * ref_norms[where]
        cosines = np.where(scale > 0, dots / np.where(scale > 0, scale, 1.0), 0.0)
        totals += np.bincount(where, weights=cosines, minlength=len(ids))
    counts = np.bincount(position, minlength=len(ids))
    return np.maximum(0.0, totals / np.maximum(counts, 1))


def score_clusters(
    maps: np.ndarray,
    vectors: np.ndarray,
    labels: np.ndarray,
    max_cluster_fraction: float = DEFAULT_MAX_CLUSTER_FRACTION,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
    random_state: int = 0,
) -> list[ClusterScore]:
    """Clever Hans score of every cluster of one class (formula: module docstring).

    Args:
        maps: (n, h, w) or (n, P) relevance maps of the class (sign as analysed; only the
            positive part of group means is used). Any positive per-sample scaling is
            irrelevant (each map is divided by its total absolute relevance first), so the
            normalised analysis vectors can be passed here. Read in chunks.
        vectors: (n, d) analysis vectors (for the separation term).
        labels: (n,) cluster label per sample.
        max_cluster_fraction: clusters holding a larger share of the class score 0.
        min_cluster_size: clusters with fewer members score 0.
        random_state: seeds the subsampling of large clusters for the silhouette.

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
    silhouettes = cluster_silhouettes(vectors, labels, random_state)
    scores = []
    for j, cluster in enumerate(ids):
        size = int(counts[j])
        mean_in = means_in[j]
        components = {name: 0.0 for name in COMPONENTS}
        components["consistency"] = float(consistency[j])
        components["size_fraction"] = size / n
        if len(ids) > 1:
            mean_out = group_distribution_from_sum(total - sums[j], n - size)
            top_in, top_out = top_share(mean_in), top_share(mean_out)
            components["displacement"] = displacement(mean_in, mean_out)
            components["separation"] = max(0.0, silhouettes[int(cluster)])
            components["concentration"] = (
                top_in / (top_in + top_out) if top_in + top_out > 0 else 0.0
            )
        gate = (
            len(ids) > 1
            and size >= min_cluster_size
            and components["size_fraction"] <= max_cluster_fraction
        )
        score = combine(components) if gate else 0.0
        scores.append(ClusterScore(int(cluster), score, components))
    return scores
