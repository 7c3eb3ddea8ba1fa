"""The concept atlas of flagged clusters: which concepts a cluster uses, and what they look like.

For each chosen cluster and one concept layer:

1. **Distinguishing concepts.** Every row's stored concept relevances
   (``concepts/<layer>`` of ``attributions.h5``) are turned into shares of the row's total
   absolute concept relevance, so that samples explained with large and small logits
   compare. For each channel ``c`` the standardised difference between the cluster ``M``
   and the rest ``R`` of its class is

       d_c = (mean_M s_c - mean_R s_c) / sqrt((var_M s_c + var_R s_c) / 2 + 1e-12)

   and the channels with the largest positive ``d_c`` (used more by the cluster than by
   the rest) are the cluster's concepts.
2. **Reference samples.** For each concept, the rows of the whole dataset with the highest
   stored relevance of that channel (relevance maximisation, collected during the
   attribution pass; see ``spray.attribution.crp.collected_top_rows``), shown cropped to where the channel's
   conditional heatmap puts its relevance (``relevance_box``).
3. **On the cluster.** The concept's conditional heatmap on the cluster's most typical
   member (closest to the cluster centre in the spectral embedding).

Conditional heatmaps need the model, so the atlas is built where the model is loaded
(the audit) and handed to the report in ``ReportContext.concept_atlas``. Pictures are
stored as small arrays (at most ``AtlasSettings.display_side`` pixels a side).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.attribution.crp import (
    collected_top_rows,
    iter_conditional_heatmaps,
    relevance_box,
    top_rows_by_concept,
)
from spray.attribution.lrp import LRPExplainer
from spray.report.context import AtlasConcept, ClusterAtlas, ConceptPicture
from spray.report.plots import shrink
from spray.report.rows import representatives, take_rows, texts_at
from spray.findings import group_findings


@dataclass(frozen=True)
class AtlasSettings:
    """How much of an atlas to compute.

    Attributes:
        n_concepts: concepts shown per cluster.
        n_references: reference samples per concept.
        flagged_only: atlas for flagged clusters only (else for every cluster).
        max_clusters: the most clusters to build an atlas for, highest score first.
        crop_mass: share of a reference's positive conditional relevance its crop holds.
        crop_pad: padding around the crop, as a share of the image side.
        display_side: the largest side of a stored picture, in pixels.
        batch_size: conditional heatmaps computed per backward pass.
    """

    n_concepts: int = 4
    n_references: int = 6
    flagged_only: bool = True
    max_clusters: int = 30
    crop_mass: float = 0.6
    crop_pad: float = 0.15
    display_side: int = 64
    batch_size: int = 32


@dataclass
class _Plan:
    """The concepts chosen for one cluster, before any heatmap is computed."""

    analysis: ClassAnalysis
    cluster: ClusterResult
    representative: int
    channels: list[int]
    distinction: np.ndarray
    cluster_share: np.ndarray
    rest_share: np.ndarray


def build_concept_atlas(
    explainer: LRPExplainer,
    source: Any,
    attributions: Any,
    analyses: list[ClassAnalysis],
    layer: str,
    settings: AtlasSettings = AtlasSettings(),
    model_input: Callable[[np.ndarray], Any] | None = None,
    images: Any | None = None,
) -> list[ClusterAtlas]:
    """Compute the concept atlas of the flagged (or all) clusters at ``layer``.

    Args:
        explainer: the audited classifier's explainer, with the attribution stage's composite
            and ``layer`` among its concept layers (``spray.attribution.select.make_explainer``
            with the stage's settings), so conditional heatmaps add up to the stored ones;
            entered here while the heatmaps are computed.
        source: the dataset (``read(rows)`` gives display images in [0, 1] for ascending rows).
        attributions: the open ``attributions.h5`` (``spray.store.attributions.Attributions``
            or anything with ``concepts``, ``targets`` and ``sample_ids``).
        analyses: the SpRAy results.
        layer: a concept layer stored in ``attributions.concepts``.
        settings: sizes and caps.
        model_input: maps display images to the model's input, as in the attribution
            stage (``AttributionSettings.model_input``: normalisation); default: unchanged.
        images: display images (N, C, H, W) in [0, 1]; default: ``source.read``.

    Returns:
        One ``ClusterAtlas`` per chosen cluster, in report order (highest score first).

    Raises:
        KeyError: ``layer`` has no stored concept relevances.
    """
    if layer not in attributions.concepts:
        raise KeyError(
            f"no concept relevances for layer {layer!r} in the attribution file; stored "
            f"layers: {sorted(attributions.concepts)}. Add it to [attribution] layers."
        )
    concepts = attributions.concepts[layer]
    targets = np.asarray(attributions.targets, dtype=np.int64)
    plans = [
        plan
        for analysis, cluster in _chosen_clusters(analyses, settings)
        if (plan := _plan(analysis, cluster, concepts, settings.n_concepts)) is not None
    ]
    if not plans:
        return []
    channels = sorted({channel for plan in plans for channel in plan.channels})
    collected = getattr(attributions, "references", {}).get(layer)
    references = collected_top_rows(collected, channels, settings.n_references)
    if references is None:  # a file without collected references: scan the stored relevances
        references = top_rows_by_concept(concepts, channels, settings.n_references)
    requests = [
        (row, int(targets[row]), channel)
        for plan in plans
        for channel in plan.channels
        for row in [plan.representative, *references[channel].tolist()]
    ]
    shown = np.array(sorted({row for row, _, _ in requests}), dtype=np.int64)
    ids = dict(zip(shown.tolist(), texts_at(attributions.sample_ids, shown)))
    stored = _stored_relevance(concepts, shown, channels)
    uncropped = {(plan.representative, channel) for plan in plans for channel in plan.channels}
    cropped = {(int(row), channel) for channel in channels for row in references[channel].tolist()}
    pictures: dict[tuple[int, int, bool], ConceptPicture] = {}
    with explainer:
        for row, channel, heatmap, image in iter_conditional_heatmaps(
            explainer, layer, source.read, requests, settings.batch_size, model_input
        ):
            pixels = _display(images, row, image)
            for crop in (False, True):
                if (row, channel) in (cropped if crop else uncropped):
                    pictures[(row, channel, crop)] = make_picture(
                        row, ids[row], stored[(row, channel)], pixels, heatmap, crop, settings
                    )
    return [
        ClusterAtlas(
            class_index=int(plan.analysis.class_index),
            space=str(plan.analysis.space),
            cluster_id=int(plan.cluster.cluster_id),
            layer=layer,
            representative_row=int(plan.representative),
            concepts=[
                AtlasConcept(
                    channel=channel,
                    distinction=float(plan.distinction[index]),
                    cluster_share=float(plan.cluster_share[index]),
                    rest_share=float(plan.rest_share[index]),
                    representative=pictures[(plan.representative, channel, False)],
                    references=[pictures[(int(row), channel, True)] for row in references[channel].tolist()],
                )
                for index, channel in enumerate(plan.channels)
            ],
        )
        for plan in plans
    ]


def _chosen_clusters(
    analyses: list[ClassAnalysis], settings: AtlasSettings
) -> list[tuple[ClassAnalysis, ClusterResult]]:
    """Clusters to build an atlas for, in the order of the summary's flags (highest artifact
    score first, ties by class, space and cluster id).

    With ``flagged_only`` a cluster flagged again in another analysis with (nearly) the same
    members is left out: the report shows one card per finding, so its atlas would never be
    shown (``spray.report.summary.group_findings``).
    """
    chosen = [
        (analysis, cluster)
        for analysis in analyses
        if analysis.analysable
        for cluster in analysis.clusters
        if cluster.flagged or not settings.flagged_only
    ]
    chosen.sort(key=lambda item: (
        -np.nan_to_num(float(item[1].artifact_score), nan=-np.inf),
        int(item[0].class_index), str(item[0].space), int(item[1].cluster_id),
    ))
    if settings.flagged_only:
        chosen = [primary for primary, _ in group_findings(chosen, lambda item: item[1].member_rows)]
    return chosen[: settings.max_clusters]


def concept_distinction(
    shares: np.ndarray, members: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised difference of each channel's share between members and the rest.

    Args:
        shares: (n, C) relevance shares of the class's rows.
        members: (n,) bool, True for the cluster's rows.

    Returns:
        ``(d, cluster_mean, rest_mean)``, each (C,).
    """
    inside, outside = shares[members], shares[~members]
    cluster_mean, rest_mean = inside.mean(axis=0), outside.mean(axis=0)
    spread = np.sqrt(0.5 * (inside.var(axis=0) + outside.var(axis=0)) + 1e-12)
    return (cluster_mean - rest_mean) / spread, cluster_mean, rest_mean


def relevance_shares(values: np.ndarray) -> np.ndarray:
    """Each row's concept relevances divided by the row's total absolute relevance."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    total = np.abs(values).sum(axis=1, keepdims=True)
    return np.divide(values, total, out=np.zeros_like(values), where=total > 0)


def _plan(
    analysis: ClassAnalysis, cluster: ClusterResult, concepts: Any, n_concepts: int
) -> _Plan | None:
    """Pick the cluster's concepts; None when the class has no rest to compare with."""
    rows = np.asarray(analysis.rows, dtype=np.int64)
    members = np.isin(rows, np.asarray(cluster.member_rows, dtype=np.int64))
    if members.sum() == 0 or members.all():
        return None
    shares = relevance_shares(take_rows(concepts, rows))
    distinction, cluster_share, rest_share = concept_distinction(shares, members)
    order = np.lexsort((np.arange(distinction.size), -distinction))
    channels = [int(channel) for channel in order[:n_concepts] if distinction[channel] > 0]
    if not channels:
        return None
    representative = representatives(
        cluster.member_rows, rows, analysis.spectral_embedding, 1
    )
    return _Plan(
        analysis=analysis,
        cluster=cluster,
        representative=int(representative[0]),
        channels=channels,
        distinction=distinction[channels],
        cluster_share=cluster_share[channels],
        rest_share=rest_share[channels],
    )


def _display(images: Any | None, row: int, image: np.ndarray) -> np.ndarray:
    """Display pixels (C, H, W) in [0, 1] of ``row``: from ``images`` when given, else as read."""
    pixels = image if images is None else take_rows(images, np.array([row]))[0]
    return np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32), nan=0.0), 0.0, 1.0)


def _stored_relevance(concepts: Any, rows: np.ndarray, channels: list[int]) -> dict[tuple[int, int], float]:
    block = take_rows(concepts, rows)
    return {
        (int(row), channel): float(block[index, channel])
        for index, row in enumerate(rows.tolist())
        for channel in channels
    }


def make_picture(
    row: int,
    sample_id: str,
    relevance: float,
    image: np.ndarray,
    heatmap: np.ndarray,
    crop: bool,
    settings: AtlasSettings,
) -> ConceptPicture:
    """A stored atlas picture: ``image`` (C, H, W) and its conditional ``heatmap`` (h, w),
    cropped to the heatmap's relevance box when ``crop``, shrunk to ``display_side``.

    The box is found on the heatmap; an image of another resolution is cropped at the
    same relative position.
    """
    height, width = heatmap.shape
    box = (
        relevance_box(heatmap, settings.crop_mass, settings.crop_pad)
        if crop
        else (0, height, 0, width)
    )
    top, bottom, left, right = box
    side = settings.display_side
    rows_scale, cols_scale = image.shape[1] / height, image.shape[2] / width
    y0, x0 = int(top * rows_scale), int(left * cols_scale)
    y1 = max(y0 + 1, int(round(bottom * rows_scale)))
    x1 = max(x0 + 1, int(round(right * cols_scale)))
    cropped = image[:, y0:y1, x0:x1]
    small = np.transpose(shrink(np.transpose(cropped, (1, 2, 0)), side), (2, 0, 1))
    return ConceptPicture(
        row=int(row),
        sample_id=sample_id,
        relevance=float(relevance),
        image=small.astype(np.float32),
        heatmap=shrink(heatmap[top:bottom, left:right], side).astype(np.float32),
        box=(int(top), int(bottom), int(left), int(right)),
    )
