"""The page model: what the HTML template shows, computed from the context and the summary.

Numbers (scores, sizes, precision, flag order) come from the ``summary.json`` structure,
so the page and the JSON never disagree; pictures come from the context's arrays. Every
string here is plain text: the template escapes it. Anchors are built from integers
only, never from dataset strings.

Size control: sample grids are capped (``ReportConfig``) and the members shown are chosen
deterministically (closest to the cluster centre first, see ``spray.report.rows``).
Each sample's thumbnails are rendered once, however many grids show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spray.analysis.artifacts import SCORED
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.report import plots
from spray.report.config import ReportConfig
from spray.report.context import ClusterAtlas, ConceptPicture, ReportContext
from spray.report.rows import representatives, take_rows, texts_at
from spray.report.summary import class_name, sorted_analyses, sorted_clusters

READ_CHUNK = 64


@dataclass
class SampleTile:
    """One sample in a grid."""

    row: int
    sample_id: str
    label: str
    prediction: str
    misclassified: bool
    has_artifact: bool | None
    image_uri: str = ""
    overlay_uri: str = ""


#: What each artifact-score component measures (see ``spray.analysis.artifacts``).
COMPONENT_NOTES: dict[str, str] = {
    "displacement": "relevance on pixels the rest of the class does not look at",
    "consistency": "members agree with each other on where the relevance is",
    "separation": "a distinct group in the analysis space, not a slice of a continuum",
    "concentration": "relevance more concentrated on few pixels than in the rest of the class",
    "size_fraction": "share of the class in this cluster (only small minorities can be flagged)",
}
#: Components multiplied into the score (geometric mean); the lowest one limits it.
SCORE_TERMS = SCORED


@dataclass
class ComponentView:
    """One named term of a cluster's artifact score."""

    name: str
    value: float | None
    note: str
    bar: float
    limiting: bool = False
    strongest: bool = False


@dataclass
class ClusterView:
    """One cluster as shown in its class section (and, when flagged, in the flags list)."""

    anchor: str
    cluster_id: int
    colour: str
    size: int
    share: float
    score: float | None
    flagged: bool
    components: list[ComponentView]
    precision: float | None
    recall: float | None
    accuracy: float | None
    mean_heatmap_uri: str | None
    samples: list[SampleTile] = field(default_factory=list)


@dataclass
class PictureView:
    """One concept-atlas picture: the (cropped) input and its conditional heatmap overlay."""

    row: int
    sample_id: str
    relevance: float
    image_uri: str
    overlay_uri: str


@dataclass
class ConceptView:
    """One distinguishing concept of a flagged cluster."""

    channel: int
    distinction: float | None
    cluster_share: float | None
    rest_share: float | None
    representative: PictureView | None
    references: list[PictureView]


@dataclass
class AtlasView:
    """The concept atlas of a flagged cluster at one layer."""

    layer: str
    representative_row: int
    representative_id: str
    concepts: list[ConceptView]


@dataclass
class ClassView:
    """One analysis (a class in one representation space)."""

    anchor: str
    class_index: int
    class_name: str
    space: str
    analysable: bool
    reason: str
    n_samples: int
    n_clusters: int
    n_flagged: int
    top_score: float | None
    accuracy: float | None
    spectrum_uri: str | None
    embedding_uri: str | None
    class_mean_uri: str | None
    clusters: list[ClusterView] = field(default_factory=list)


@dataclass
class FlagView:
    """A flagged cluster, with a larger sample grid showing images beside overlays."""

    anchor: str
    rank: int
    owner: ClassView
    cluster: ClusterView
    samples: list[SampleTile] = field(default_factory=list)
    detailed: bool = True
    atlases: list[AtlasView] = field(default_factory=list)
    revealed_by: list[str] = field(default_factory=list)


@dataclass
class PageView:
    """Everything ``report.html`` renders."""

    job: str
    created: str
    threshold: float | None
    metadata: list[tuple[str, str]]
    n_samples: int
    has_ground_truth: bool
    artifact_check: dict[str, Any] | None
    flags: list[FlagView]
    classes: list[ClassView]
    has_atlas: bool = False


def build_page(
    context: ReportContext, summary: dict[str, Any], limits: ReportConfig = ReportConfig()
) -> PageView:
    """Assemble the page model: class sections, flags in summary order, thumbnails."""
    analyses = sorted_analyses(context.analyses)
    anchors = _class_anchors(analyses)
    classes = [
        _class_view(analysis, entry, anchor)
        for analysis, entry, anchor in zip(analyses, summary["classes"], anchors)
    ]
    flags = _flag_views(classes, summary["flags"], limits)
    per_cluster = _class_grid_size(classes, limits)
    sources: dict[str, tuple[ClassAnalysis, ClusterResult]] = {}
    for analysis, view in zip(analyses, classes):
        for cluster, cluster_view in zip(sorted_clusters(list(analysis.clusters)), view.clusters):
            cluster_view.samples = _tiles(analysis, cluster, per_cluster)
            sources[cluster_view.anchor] = (analysis, cluster)
    for flag in flags:
        if flag.detailed:
            flag.samples = _tiles(*sources[flag.cluster.anchor], limits.samples_per_grid)
    _fill_tiles(context, classes, flags)
    _attach_atlas(context.concept_atlas, flags)
    return PageView(
        job=str(context.job_name),
        created=str(context.created),
        threshold=summary["threshold"],
        metadata=[(str(key), _text(value)) for key, value in summary["metadata"].items()],
        n_samples=summary["n_samples"],
        has_ground_truth=summary["ground_truth"] is not None,
        artifact_check=summary["artifact_check"],
        flags=flags,
        classes=classes,
        has_atlas=any(flag.atlases for flag in flags),
    )


def _class_anchors(analyses: list[ClassAnalysis]) -> list[str]:
    """``class-<index>`` for a class's first analysis, ``class-<index>-<n>`` for more spaces."""
    seen: dict[int, int] = {}
    anchors = []
    for analysis in analyses:
        index = int(analysis.class_index)
        stem = "class-all" if index == -1 else f"class-{index}"
        count = seen.get(index, 0)
        seen[index] = count + 1
        anchors.append(stem if count == 0 else f"{stem}-{count + 1}")
    return anchors


def _class_view(analysis: ClassAnalysis, entry: dict[str, Any], anchor: str) -> ClassView:
    ordered = sorted_clusters(list(analysis.clusters))
    clusters = [
        _cluster_view(cluster, cluster_entry, anchor, entry["n_samples"])
        for cluster, cluster_entry in zip(ordered, entry["clusters"])
    ]
    eigenvalues = _array(analysis.eigenvalues).reshape(-1)
    embedding = _array(analysis.embedding_2d)
    labels = _array(analysis.labels).reshape(-1).astype(np.int64)
    can_scatter = (
        analysis.analysable
        and embedding.ndim == 2
        and embedding.shape[1] >= 2
        and embedding.shape[0] == labels.size > 0
    )
    scores = [cluster.score for cluster in clusters if cluster.score is not None]
    return ClassView(
        anchor=anchor,
        class_index=entry["class_index"],
        class_name=entry["class_name"],
        space=entry["space"],
        analysable=entry["analysable"],
        reason=entry["reason"],
        n_samples=entry["n_samples"],
        n_clusters=entry["n_clusters"],
        n_flagged=sum(cluster.flagged for cluster in clusters),
        top_score=max(scores) if scores else None,
        accuracy=entry.get("accuracy"),
        spectrum_uri=(
            plots.data_uri(plots.spectrum_png(eigenvalues, analysis.n_clusters))
            if analysis.analysable and eigenvalues.size
            else None
        ),
        embedding_uri=(
            plots.data_uri(
                plots.embedding_png(
                    embedding[:, :2],
                    labels,
                    [cluster.cluster_id for cluster in clusters if cluster.flagged],
                )
            )
            if can_scatter
            else None
        ),
        class_mean_uri=_heatmap_uri(analysis.class_mean_heatmap),
        clusters=clusters,
    )


def _cluster_view(
    cluster: ClusterResult, entry: dict[str, Any], class_anchor: str, n_class: int
) -> ClusterView:
    return ClusterView(
        anchor=f"{class_anchor}-cluster-{entry['cluster_id']}",
        cluster_id=entry["cluster_id"],
        colour=plots.cluster_colour(entry["cluster_id"]),
        size=entry["size"],
        share=entry["size"] / n_class if n_class else 0.0,
        score=entry["artifact_score"],
        flagged=entry["flagged"],
        components=component_views(entry["score_components"]),
        precision=entry.get("precision"),
        recall=entry.get("recall"),
        accuracy=entry.get("accuracy"),
        mean_heatmap_uri=_heatmap_uri(cluster.mean_heatmap),
    )


def component_views(components: dict[str, float | None]) -> list[ComponentView]:
    """The score's terms with notes; marks the lowest and highest multiplied term.

    The score is a geometric mean, so its lowest term limits it and its highest term is
    what the cluster stands out by.
    """
    views = [
        ComponentView(
            name=name,
            value=value,
            note=COMPONENT_NOTES.get(name, ""),
            bar=0.0 if value is None else float(min(max(value, 0.0), 1.0)),
        )
        for name, value in components.items()
    ]
    terms = [view for view in views if view.name in SCORE_TERMS and view.value is not None]
    if len(terms) >= 2 and len({view.value for view in terms}) > 1:
        min(terms, key=lambda view: (view.value, view.name)).limiting = True
        max(terms, key=lambda view: (view.value, view.name)).strongest = True
    return views


def _flag_views(
    classes: list[ClassView], flags: list[dict[str, Any]], limits: ReportConfig
) -> list[FlagView]:
    """Flags in the summary's order (highest score first), linked to their class sections."""
    lookup = {
        (view.class_index, view.space, cluster.cluster_id): (view, cluster)
        for view in classes
        for cluster in view.clusters
    }
    views = []
    for rank, flag in enumerate(flags):
        owner, cluster = lookup[(flag["class_index"], flag["space"], flag["cluster_id"])]
        views.append(
            FlagView(
                anchor=f"flag-{rank}",
                rank=rank + 1,
                owner=owner,
                cluster=cluster,
                detailed=rank < limits.max_flag_sections,
                revealed_by=_evidence_lines(flag, classes),
            )
        )
    return views


def _evidence_lines(flag: dict[str, Any], classes: list[ClassView]) -> list[str]:
    """Plain-text lines naming every analysis that flagged this finding, and its overlap."""
    names = {view.class_index: view.class_name for view in classes}
    lines = []
    for item in flag.get("revealed_by", []):
        score = item["artifact_score"]
        text = f"{names.get(item['class_index'], item['class_index'])}, {item['space']}, cluster {item['cluster_id']}"
        text += f": score {score:.3f}" if score is not None else ": score n/a"
        if item["jaccard"] < 1.0:
            text += f", {item['jaccard']:.0%} member overlap"
        lines.append(text)
    return lines


def _class_grid_size(classes: list[ClassView], limits: ReportConfig) -> int:
    """Members per cluster grid in the class sections, shrunk when there are many clusters."""
    n_clusters = sum(len(view.clusters) for view in classes)
    if n_clusters == 0:
        return limits.cluster_samples
    return max(1, min(limits.cluster_samples, limits.max_class_thumbnails // n_clusters))


def _tiles(analysis: ClassAnalysis, cluster: ClusterResult, limit: int) -> list[SampleTile]:
    """Empty tiles for the members to show; ``_fill_tiles`` reads their data later."""
    rows = representatives(
        cluster.member_rows, analysis.rows, analysis.spectral_embedding, limit
    )
    return [SampleTile(int(row), "", "", "", False, None) for row in rows]


def _fill_tiles(context: ReportContext, classes: list[ClassView], flags: list[FlagView]) -> None:
    """Read every shown sample once and fill in its text and thumbnails.

    Overlays are rendered for every tile, raw images only for tiles in flag grids. Rows
    are read in ascending chunks of ``READ_CHUNK`` so memory stays flat.
    """
    tiles = [tile for view in classes for cluster in view.clusters for tile in cluster.samples]
    flag_tiles = [tile for flag in flags for tile in flag.samples]
    rows = np.unique(np.array([tile.row for tile in tiles + flag_tiles], dtype=np.int64))
    if rows.size == 0:
        return
    need_image = {tile.row for tile in flag_tiles}
    truth = (
        None
        if context.ground_truth_rows is None
        else set(np.asarray(context.ground_truth_rows, dtype=np.int64).reshape(-1).tolist())
    )
    ids = dict(zip(rows.tolist(), texts_at(context.sample_ids, rows)))
    labels = dict(zip(rows.tolist(), take_rows(context.labels, rows).tolist()))
    predictions = dict(zip(rows.tolist(), take_rows(context.predictions, rows).tolist()))
    pictures: dict[int, tuple[str, str]] = {}
    for start in range(0, rows.size, READ_CHUNK):
        chunk = rows[start : start + READ_CHUNK]
        images = take_rows(context.images, chunk)
        heatmaps = take_rows(context.heatmaps, chunk)
        for row, image, heatmap in zip(chunk.tolist(), images, heatmaps):
            image_uri = plots.data_uri(plots.image_png(image)) if row in need_image else ""
            pictures[row] = (image_uri, plots.data_uri(plots.overlay_png(image, heatmap)))
    for tile in tiles + flag_tiles:
        label, prediction = int(labels[tile.row]), int(predictions[tile.row])
        tile.sample_id = ids[tile.row]
        tile.label = class_name(context.class_names, label)
        tile.prediction = class_name(context.class_names, prediction)
        tile.misclassified = label != prediction
        tile.has_artifact = None if truth is None else tile.row in truth
        tile.image_uri, tile.overlay_uri = pictures[tile.row]


def _attach_atlas(atlas: list[ClusterAtlas] | None, flags: list[FlagView]) -> None:
    """Render the concept atlases (one per layer) of each detailed flag that has them."""
    if not atlas:
        return
    lookup: dict[tuple[int, str, int], list[ClusterAtlas]] = {}
    for item in atlas:
        key = (int(item.class_index), str(item.space), int(item.cluster_id))
        lookup.setdefault(key, []).append(item)
    for flag in flags:
        key = (flag.owner.class_index, flag.owner.space, flag.cluster.cluster_id)
        if flag.detailed:
            flag.atlases = [_atlas_view(item) for item in lookup.get(key, [])]


def _atlas_view(item: ClusterAtlas) -> AtlasView:
    """The page model of one cluster's atlas at one layer."""
    representative = next(
        (c.representative for c in item.concepts if c.representative is not None), None
    )
    return AtlasView(
        layer=str(item.layer),
        representative_row=int(item.representative_row),
        representative_id="" if representative is None else str(representative.sample_id),
        concepts=[
            ConceptView(
                channel=int(concept.channel),
                distinction=_finite(concept.distinction),
                cluster_share=_finite(concept.cluster_share),
                rest_share=_finite(concept.rest_share),
                representative=(
                    None
                    if concept.representative is None
                    else _picture(concept.representative)
                ),
                references=[_picture(picture) for picture in concept.references],
            )
            for concept in item.concepts
        ],
    )


def _picture(picture: ConceptPicture) -> PictureView:
    image = np.asarray(picture.image, dtype=np.float64)
    heatmap = np.asarray(picture.heatmap, dtype=np.float64)
    return PictureView(
        row=int(picture.row),
        sample_id=str(picture.sample_id),
        relevance=float(picture.relevance),
        image_uri=plots.data_uri(plots.image_png(image, plots.THUMB_SIDE)),
        overlay_uri=plots.data_uri(plots.overlay_png(image, heatmap, plots.THUMB_SIDE)),
    )


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if np.isfinite(number) else None


def _heatmap_uri(heatmap: np.ndarray | None) -> str | None:
    """A mean heatmap as a data URI, or None when it is missing or not a 2-D map."""
    if heatmap is None:
        return None
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        return None
    return plots.data_uri(plots.heatmap_png(values))


def _array(values: Any) -> np.ndarray:
    """``values`` as a float array; empty for ``None``."""
    return np.empty(0) if values is None else np.asarray(values, dtype=np.float64)


def _text(value: Any) -> str:
    return "n/a" if value is None else str(value)
