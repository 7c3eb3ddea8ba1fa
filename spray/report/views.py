"""The page model: what the HTML template shows, computed from the context and the summary.

Numbers (scores, sizes, precision, flag order) come from the ``summary.json`` structure,
so the page and the JSON never disagree; pictures come from the context's arrays. Every
string here is plain text: the template escapes it. Anchors are built from integers
only, never from dataset strings.

Size control: sample grids are capped (``ReportConfig``) and the members shown are chosen
deterministically (closest to the cluster centre first, see ``spray.report.rows``).
Each sample's thumbnails are rendered once, however many grids show it. The causal test's
example images are drawn for the detailed flags and for at most ``max_flag_sections``
rejected candidates; the other tests show their numbers only.

Concept spaces: a concept-space cluster's stored mean is a channel profile ``(1, d)``, not
a picture. It is drawn as a bar chart (cluster beside the rest of its class), and its
"mean heatmap" is the mean pixel heatmap of the members the page shows, read from the
attribution heatmaps with the same rows as the sample grids (no extra reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spray.analysis.artifacts import SCORED
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.dask_tasks import StarMap, starmap_here
from spray.report import plots
from spray.report.config import ReportConfig
from spray.report.context import ClusterAtlas, ConceptPicture, ReportContext
from spray.report.rows import representatives, take_rows, texts_at
from spray.confirm.test import overlay_name
from spray.report.summary import class_name, confirmation_status, sorted_analyses, sorted_clusters
from spray.verdict import describe_incomplete, describe_scope

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
    "size_fraction": "share of the class in this cluster (any share can be flagged; the causal test picks the side)",
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
class TestLine:
    """One row of a causal-test table: ``count`` of ``n`` images changed, with the Wilson
    95% interval of the rate and the mean change of P(class)."""

    label: str
    verb: str
    count: int | None
    n: int | None
    rate: float | None
    low: float | None
    high: float | None
    mean_label: str
    mean: float | None


@dataclass
class ExampleView:
    """One column of the causal test's example strip: a kind of image, one per example."""

    kind: str
    caption: str
    uris: list[str]


#: The causal test's example images, in the order shown, with their captions.
EXAMPLE_KINDS: dict[str, str] = {
    "member": "member",
    "evidence": "its evidence (outlined)",
    "removed": "evidence removed",
    "host": "host (other class)",
    "pasted": "evidence pasted in",
}
#: The causal test's statuses as the page states them.
STATUS_WORDS: dict[str, str] = {
    "confirmed": "confirmed: pasting the evidence moves predictions",
    "rejected": "rejected: pasting the evidence does not move predictions more than the control",
    "untested": "untested: the causal test could not be run",
}


@dataclass
class ConfirmationView:
    """A candidate cluster's causal test (``ClusterResult.confirmation``) for the page."""

    status: str
    headline: str
    detail: str
    target: str
    evidence_area: float | None
    lines: list[TestLine]
    examples: list[ExampleView] = field(default_factory=list)


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
    candidate: bool = False
    status: str = ""
    confirmation: ConfirmationView | None = None
    profile: list[plots.ProfileBar] = field(default_factory=list)
    mean_caption: str = "mean heatmap"


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
    class_mean_caption: str = "class mean heatmap"

    @property
    def rejected(self) -> list[ClusterView]:
        """Candidates the causal test rejected (not flagged), highest score first."""
        return [c for c in self.clusters if c.candidate and c.status == "rejected" and not c.flagged]


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
    untested_flags: int = 0
    n_rejected: int = 0
    verdict: str = ""
    not_checked: list[str] = field(default_factory=list)
    one_strategy: list[str] = field(default_factory=list)


def build_page(
    context: ReportContext, summary: dict[str, Any], limits: ReportConfig = ReportConfig(),
    starmap: StarMap = starmap_here,
) -> PageView:
    """Assemble the page model: class sections, flags in summary order, thumbnails.

    ``starmap`` draws the class sections' pictures (one call per analysis, the part that
    grows with classes x spaces); :func:`spray.dask_tasks.dask_starmap` draws them on Dask
    workers. Thumbnails and the concept atlas are capped in number (``[report]``) and are
    drawn here.
    """
    analyses = sorted_analyses(context.analyses)
    anchors = _class_anchors(analyses)
    classes = starmap(_class_view, list(zip(analyses, summary["classes"], anchors)))
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
    _attach_examples(classes, flags, sources, limits)
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
        untested_flags=int(summary.get("untested_flags", 0)),
        n_rejected=sum(len(view.rejected) for view in classes),
        verdict=str(summary.get("verdict", "")),
        not_checked=describe_incomplete(summary),
        one_strategy=describe_scope(summary),
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
    class_profile = _profile(analysis.class_mean_heatmap)
    for cluster, view in zip(ordered, clusters):
        profile = _profile(cluster.mean_heatmap)
        if profile is not None:
            rest = _rest_profile(class_profile, profile, _array(analysis.rows).size, cluster.size)
            view.profile = plots.concept_profile_bars(profile, rest)
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
        class_mean_uri=None if class_profile is not None else _heatmap_uri(analysis.class_mean_heatmap),
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
        mean_heatmap_uri=None if _profile(cluster.mean_heatmap) is not None else _heatmap_uri(cluster.mean_heatmap),
        candidate=bool(entry.get("candidate", False)),
        status=_known_status(confirmation_status(entry)),
        confirmation=_confirmation_view(entry.get("confirmation")),
    )


def _known_status(status: str | None) -> str:
    """The status when it is one the page knows (it names a CSS class), else ``""``."""
    return status if status in STATUS_WORDS else ""


def _confirmation_view(confirmation: dict[str, Any] | None) -> ConfirmationView | None:
    """The page model of a causal test (its example images are attached later)."""
    if not isinstance(confirmation, dict):
        return None
    status = str(confirmation.get("status", ""))
    reason = str(confirmation.get("reason") or "").strip()
    if status == "confirmed" or status not in STATUS_WORDS:
        headline = STATUS_WORDS.get(status, f"{status or 'unknown'}: {reason}".rstrip(": "))
        detail = reason if status == "confirmed" else ""
    else:
        headline = f"{status}: {reason}" if reason else STATUS_WORDS[status]
        detail = ""
    target = confirmation.get("target_class")
    lines = [
        _test_line(confirmation.get("paste"), "pasted into other classes", "moved", "moved", "mean \u0394P", "gain"),
        _test_line(confirmation.get("control"), "control: same regions from the rest of the class", "moved", "moved", "mean \u0394P", "gain"),
        _test_line(confirmation.get("removal"), "removed from members", "lost", "lost", "mean drop", "drop"),
    ]
    for entry in confirmation.get("settings") or []:
        if isinstance(entry, dict):  # each evidence setting the candidate was tested at (spray.confirm.run)
            evidence = entry.get("evidence") or {}
            area = _number(evidence.get("area"))
            name = "evidence of at most " + ("?" if area is None else f"{area:.0%}") + " of the image"
            name = f"{overlay_name(evidence.get('reference'), evidence.get('statistic'))}, added" if evidence.get("overlay") else name
            lines.append(_test_line(entry.get("paste"), f"{name}: pasted", "moved", "moved", "mean \u0394P", "gain"))
            lines.append(_test_line(entry.get("control"), f"{name}: control", "moved", "moved", "mean \u0394P", "gain"))
    for part in confirmation.get("joined") or []:
        if isinstance(part, dict):  # a cluster of the same shortcut merged into this one (spray.confirm.resolve)
            name = f"joined cluster {part.get('cluster_id', '?')} ({part.get('size', '?')} samples)"
            lines.append(_test_line(part.get("paste"), f"{name}: pasted", "moved", "moved", "mean \u0394P", "gain"))
            lines.append(_test_line(part.get("control"), f"{name}: control", "moved", "moved", "mean \u0394P", "gain"))
    return ConfirmationView(
        status=status,
        headline=headline,
        detail=detail,
        target="" if target is None else str(target),
        evidence_area=_number(confirmation.get("evidence_area")),
        lines=[line for line in lines if line is not None],
    )


def _test_line(
    part: Any, label: str, verb: str, count_key: str, mean_label: str, mean_key: str
) -> TestLine | None:
    """One table row of the causal test, or None when that part was not run."""
    if not isinstance(part, dict):
        return None
    count, n = _number(part.get(count_key)), _number(part.get("n"))
    return TestLine(
        label=label,
        verb=verb,
        count=None if count is None else int(count),
        n=None if n is None else int(n),
        rate=_number(part.get("rate")),
        low=_number(part.get("low")),
        high=_number(part.get("high")),
        mean_label=mean_label,
        mean=_number(part.get(mean_key)),
    )


def _attach_examples(
    classes: list[ClassView],
    flags: list[FlagView],
    sources: dict[str, tuple[ClassAnalysis, ClusterResult]],
    limits: ReportConfig,
) -> None:
    """Draw the causal test's example images of the detailed flags and of the first
    ``limits.max_flag_sections`` rejected candidates (page order)."""
    shown = [flag.cluster for flag in flags if flag.detailed]
    shown += [cluster for view in classes for cluster in view.rejected][: limits.max_flag_sections]
    for view in shown:
        if view.confirmation is not None:
            view.confirmation.examples = _examples(sources[view.anchor][1].examples)


def _examples(examples: dict[str, np.ndarray] | None) -> list[ExampleView]:
    """The example strip: one column per known kind present, one picture per example."""
    columns = []
    for kind, caption in EXAMPLE_KINDS.items():
        images = None if not examples else examples.get(kind)
        if images is None:
            continue
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[0] == 0 or 0 in images.shape[1:3]:
            continue
        columns.append(ExampleView(kind, caption, [plots.data_uri(plots.display_png(image)) for image in images]))
    return columns


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
    means = _pixel_means(classes, flags)
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
            for mean in means:
                if row in mean.rows:
                    mean.add(heatmap)
    for mean in means:
        mean.finish()
    for tile in tiles + flag_tiles:
        label, prediction = int(labels[tile.row]), int(predictions[tile.row])
        tile.sample_id = ids[tile.row]
        tile.label = class_name(context.class_names, label)
        tile.prediction = class_name(context.class_names, prediction)
        tile.misclassified = label != prediction
        tile.has_artifact = None if truth is None else tile.row in truth
        tile.image_uri, tile.overlay_uri = pictures[tile.row]


class _PixelMean:
    """The mean pixel heatmap of some shown rows, for a concept-space cluster or class.

    Each heatmap is shrunk to ``plots.HEATMAP_SIDE`` and scaled to sum 1 in ``|R|`` before
    averaging, so every member counts the same. ``finish`` hands the picture and its
    caption to ``target`` (a ``ClusterView`` or ``ClassView``).
    """

    def __init__(self, rows: set[int], target: ClusterView | ClassView, noun: str) -> None:
        self.rows = rows
        self.target = target
        self.noun = noun
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, heatmap: np.ndarray) -> None:
        values = plots.shrink(np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0), plots.HEATMAP_SIDE)
        if values.ndim != 2 or (self.total is not None and self.total.shape != values.shape):
            return
        mass = float(np.abs(values).sum())
        values = values / mass if mass > 0 else values
        self.total = values if self.total is None else self.total + values
        self.count += 1

    def finish(self) -> None:
        if self.total is None:
            return
        uri = plots.data_uri(plots.heatmap_png(self.total / self.count))
        plural = "" if self.count == 1 else "s"
        caption = f"mean pixel heatmap of the {self.count} {self.noun}{plural} shown"
        if isinstance(self.target, ClassView):
            self.target.class_mean_uri, self.target.class_mean_caption = uri, caption
        else:
            self.target.mean_heatmap_uri, self.target.mean_caption = uri, caption


def _pixel_means(classes: list[ClassView], flags: list[FlagView]) -> list[_PixelMean]:
    """Accumulators for the concept-space clusters (profile, no picture) and their classes:
    the rows of the cluster's class grid and flag grid; for the class, all its clusters'."""
    flag_rows: dict[str, set[int]] = {}
    for flag in flags:
        flag_rows.setdefault(flag.cluster.anchor, set()).update(tile.row for tile in flag.samples)
    means = []
    for view in classes:
        class_rows: set[int] = set()
        for cluster in view.clusters:
            if not cluster.profile:
                continue
            rows = {tile.row for tile in cluster.samples} | flag_rows.get(cluster.anchor, set())
            class_rows |= rows
            means.append(_PixelMean(rows, cluster, "member"))
        if class_rows and view.class_mean_uri is None:
            means.append(_PixelMean(class_rows, view, "sample"))
    return means


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


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, non-numeric or non-finite)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        return _finite(float(value))
    except (TypeError, ValueError):
        return None


def _profile(mean: np.ndarray | None) -> np.ndarray | None:
    """The channel profile when a stored mean is a vector (concept space: shape (1, d) or
    (d,)), else None (a pooled heatmap, drawn as a picture)."""
    if mean is None:
        return None
    values = np.asarray(mean, dtype=np.float64)
    if values.size == 0 or not (values.ndim == 1 or (values.ndim == 2 and values.shape[0] == 1)):
        return None
    return values.reshape(-1)


def _rest_profile(class_profile: np.ndarray | None, profile: np.ndarray, n_class: int, size: int) -> np.ndarray | None:
    """The mean profile of the class without the cluster, from the class and cluster means."""
    if class_profile is None or class_profile.shape != profile.shape or n_class <= size:
        return None
    return (class_profile * n_class - profile * size) / (n_class - size)


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
