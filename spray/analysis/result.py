"""Plain data records that the SpRAy analysis hands to the report and to ``analysis.h5``.

They hold numbers only (NumPy arrays and Python scalars), never models or files, so the
report stage can be re-run from ``analysis.h5`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ClusterResult:
    """One prediction strategy (cluster) found inside one class.

    Attributes:
        cluster_id: label of the cluster inside its class (0..n_clusters-1).
        member_rows: row indices into the attribution file of the members, ascending.
        artifact_score: the Clever Hans score (higher = more artifact-like), see
            ``spray.analysis.artifacts``.
        flagged: the verdict: a candidate whose causal test confirmed it, or a candidate
            that could not be tested (``confirmation["status"] == "untested"``; never
            taken for clean).
        score_components: the named terms the score is made of, for the report.
        mean_heatmap: the members' mean pooled heatmap, shape (h, w): sign-handled and
            normalised, with the analysis scaling undone (for the default square-root
            scaling and L2 normalisation, each member's map sums to 1 in absolute value).
        candidate: whether ``artifact_score`` is at or above the audit's threshold, so the
            cluster was proposed for the causal test (``spray.confirm``).
        confirmation: the causal test's numbers (JSON-ready; see
            :class:`spray.confirm.test.Confirmation`), None when no test was asked for.
        examples: a few before/after images of the test, uint8 (k, H, W, C) display
            images keyed ``"member"``, ``"evidence"`` (the member with its evidence
            outlined), ``"removed"``, ``"host"`` and ``"pasted"``; empty when not tested.
    """

    cluster_id: int
    member_rows: np.ndarray
    artifact_score: float
    flagged: bool
    score_components: dict[str, float]
    mean_heatmap: np.ndarray
    candidate: bool = False
    confirmation: dict[str, Any] | None = None
    examples: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(len(self.member_rows))


@dataclass
class ClassAnalysis:
    """SpRAy result for one class (or for the whole dataset, ``class_index == -1``).

    Attributes:
        class_index: the class analysed; -1 for a dataset-wide analysis.
        class_name: human-readable name (dataset-provided: escape before showing).
        space: which representation was clustered, e.g. ``"heatmap"`` or ``"concept:features.3"``.
        rows: row indices into the attribution file of the analysed samples, ascending.
        eigenvalues: the smallest eigenvalues of the normalised Laplacian, ascending.
        n_clusters: number of clusters chosen by the eigengap.
        labels: cluster label per analysed sample, aligned with ``rows``.
        spectral_embedding: (n, d) spectral coordinates, aligned with ``rows``.
        embedding_2d: (n, 2) UMAP (or t-SNE) coordinates for pictures, aligned with ``rows``.
        clusters: one record per cluster, highest ``artifact_score`` first.
        class_mean_heatmap: the same mean over the whole class, (h, w).
        analysable: False when the class could not be analysed; ``reason`` says why.
    """

    class_index: int
    class_name: str
    space: str
    rows: np.ndarray
    eigenvalues: np.ndarray
    n_clusters: int
    labels: np.ndarray
    spectral_embedding: np.ndarray
    embedding_2d: np.ndarray
    clusters: list[ClusterResult] = field(default_factory=list)
    class_mean_heatmap: np.ndarray | None = None
    analysable: bool = True
    reason: str = ""
