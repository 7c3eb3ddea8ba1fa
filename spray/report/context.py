"""What the report stage needs to know about one audit, gathered from the stage files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spray.analysis.config import DEFAULT_MIN_CLUSTER_SIZE
from spray.analysis.result import ClassAnalysis
from spray.verdict import CheckConfig


@dataclass
class ArtifactCheck:
    """Evidence that the model uses an artifact: stamp it on other classes' images.

    Attributes:
        target_class: the class the artifact is suspected to push predictions toward.
        n_images: how many images of other classes were stamped.
        flip_rate: share of those images whose prediction changed to ``target_class``.
        mean_prob_before / mean_prob_after: mean softmax probability of ``target_class``
            before and after stamping.
        description: what was stamped (shown in the report).
    """

    target_class: int
    n_images: int
    flip_rate: float
    mean_prob_before: float
    mean_prob_after: float
    description: str = ""


@dataclass
class ConceptPicture:
    """One picture in a concept atlas: a (cropped) image and its conditional heatmap.

    Attributes:
        row: row in the attribution file.
        sample_id: the dataset's id of the row (escape before showing).
        relevance: the concept's stored relevance on this row (``concepts/<layer>``).
        image: (C, h, w) display pixels in [0, 1], cropped to ``box`` and shrunk.
        heatmap: (h', w') the concept's conditional heatmap over the same crop.
        box: ``(top, bottom, left, right)`` of the crop in input pixels (bottom and
            right exclusive); the whole image for an uncropped picture.
    """

    row: int
    sample_id: str
    relevance: float
    image: np.ndarray
    heatmap: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class AtlasConcept:
    """A concept (one channel of the concept layer) that sets a cluster apart from its class.

    Attributes:
        channel: channel index in the concept layer.
        distinction: standardised difference of the channel's relevance share between
            the cluster and the rest of its class (higher: used more by the cluster).
        cluster_share / rest_share: mean share of the total concept relevance that the
            channel carries, in the cluster and in the rest of the class.
        representative: the channel's conditional heatmap on the cluster's most typical
            member (uncropped).
        references: the dataset's samples with the highest stored relevance of this
            channel (relevance maximisation), cropped to where the channel's relevance is.
    """

    channel: int
    distinction: float
    cluster_share: float
    rest_share: float
    representative: ConceptPicture | None
    references: list[ConceptPicture] = field(default_factory=list)


@dataclass
class ClusterAtlas:
    """The concepts that distinguish one cluster, at one concept layer.

    ``(class_index, space, cluster_id)`` names the cluster as in ``analyses``.
    """

    class_index: int
    space: str
    cluster_id: int
    layer: str
    representative_row: int
    concepts: list[AtlasConcept] = field(default_factory=list)


@dataclass
class ReportContext:
    """Everything the HTML report and ``summary.json`` are rendered from.

    Array-like fields may be NumPy arrays or open ``h5py`` datasets; the report only
    indexes them with ascending integer row arrays. Every string that comes from the
    dataset (class names, sample ids, metadata values) must be escaped in HTML.

    Attributes:
        job_name: name of the audit (used in titles and the output folder name).
        created: ISO-8601 timestamp of the audit.
        class_names: one name per class index.
        sample_ids: one id per attribution row (file name, index, ...).
        labels: true label per row.
        predictions: predicted class per row.
        images: (N, C, H, W) float images in [0, 1] for display (C is 1 or 3).
        heatmaps: (N, H, W) signed LRP heatmaps at input resolution (or pooled).
        analyses: SpRAy results, one per analysed class (and optionally dataset-wide).
        threshold: artifact-score threshold used for flags.
        metadata: free-form facts shown in the report header (model, composite, dataset...).
        artifact_check: optional stamping evidence (the demo provides one).
        ground_truth_rows: optional rows known to carry the planted artifact (demo only);
            when given, the report shows each flag's precision and recall against them.
        concept_atlas: optional CRP concept atlas per cluster (see
            ``spray.report.atlas.build_concept_atlas``, which needs the model and data);
            the report renders without it.
        expected_spaces: the spaces every class should have been analysed in (the job's
            spaces with ``concept:*`` expanded); None: those of ``analyses``.
        dataset_wide: whether a dataset-wide analysis was asked for.
        skipped_images: unreadable images left out of the audit.
        check: what the gate accepts as not checked (``[check]``, ``spray.verdict``).
        min_cluster_size: ``[analysis] min_cluster_size``: a cluster is a strategy to compare
            with the rest of its class only when both hold at least this many samples
            (``spray.analysis.artifacts.comparable``); ``summary.json`` lists the analyses
            with none (``one_strategy``).
    """

    job_name: str
    created: str
    class_names: list[str]
    sample_ids: list[str]
    labels: Any
    predictions: Any
    images: Any
    heatmaps: Any
    analyses: list[ClassAnalysis]
    threshold: float
    metadata: dict[str, str] = field(default_factory=dict)
    artifact_check: ArtifactCheck | None = None
    ground_truth_rows: np.ndarray | None = None
    concept_atlas: list[ClusterAtlas] | None = None
    expected_spaces: list[str] | None = None
    dataset_wide: bool = False
    skipped_images: int = 0
    check: CheckConfig = field(default_factory=CheckConfig)
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE
