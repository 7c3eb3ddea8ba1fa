"""A small synthetic audit for the report tests: two analysed classes, one not analysable.

Class and sample names are hostile on purpose (HTML tags, quotes, ampersands) so the
escaping tests have something to catch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.report.context import ArtifactCheck, ReportContext

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
QUOTES_NAME = "\"&'"
N_SAMPLES = 40
SIDE = 16


def _cluster(
    cluster_id: int, rows: list[int], score: float, flagged: bool, rng: np.random.Generator
) -> ClusterResult:
    return ClusterResult(
        cluster_id=cluster_id,
        member_rows=np.array(sorted(rows), dtype=np.int64),
        artifact_score=score,
        flagged=flagged,
        score_components={
            "concentration": score / 2,
            "separation": score / 2,
            "outside_object": float("nan"),
        },
        mean_heatmap=rng.normal(size=(8, 8)),
    )


def _analysis(
    class_index: int,
    name: str,
    groups: list[tuple[int, list[int], float, bool]],
    rng: np.random.Generator,
) -> ClassAnalysis:
    rows = np.array(sorted(row for _, members, _, _ in groups for row in members), dtype=np.int64)
    labels = np.empty(rows.size, dtype=np.int64)
    for cluster_id, members, _, _ in groups:
        labels[np.searchsorted(rows, members)] = cluster_id
    embedding = rng.normal(size=(rows.size, 3)) + labels[:, None] * 4.0
    clusters = [_cluster(*group, rng) for group in groups]
    clusters.sort(key=lambda cluster: np.nan_to_num(-cluster.artifact_score, nan=np.inf))
    return ClassAnalysis(
        class_index=class_index,
        class_name=name,
        space="heatmap",
        rows=rows,
        eigenvalues=np.array([0.0, 0.01, 0.02, 0.4, 0.5, 0.55, 0.6]),
        n_clusters=len(groups),
        labels=labels,
        spectral_embedding=embedding,
        embedding_2d=embedding[:, :2],
        clusters=clusters,
        class_mean_heatmap=rng.normal(size=(8, 8)),
    )


def make_context() -> ReportContext:
    """Build the synthetic audit (deterministic)."""
    rng = np.random.default_rng(7)
    class_names = [HOSTILE_NAME, QUOTES_NAME, "cat"]
    sample_ids = [f"img_{row:03d}.png" for row in range(N_SAMPLES)]
    sample_ids[3] = HOSTILE_NAME
    sample_ids[4] = QUOTES_NAME
    labels = np.array([0] * 20 + [1] * 17 + [2] * 3, dtype=np.int64)
    predictions = labels.copy()
    predictions[[5, 25]] = [1, 0]
    artifact_rows = [1, 3, 4, 8, 13, 17]
    class0 = _analysis(
        0,
        HOSTILE_NAME,
        [
            (0, [row for row in range(20) if row not in artifact_rows], 0.2, False),
            (1, artifact_rows, 0.9, True),
        ],
        rng,
    )
    class1 = _analysis(
        1,
        QUOTES_NAME,
        [
            (0, list(range(20, 26)), 0.75, True),
            (1, list(range(26, 32)), 0.1, False),
            (2, list(range(32, 37)), float("nan"), False),
        ],
        rng,
    )
    not_analysable = ClassAnalysis(
        class_index=2,
        class_name="cat",
        space="heatmap",
        rows=np.arange(37, 40),
        eigenvalues=np.empty(0),
        n_clusters=0,
        labels=np.empty(0, dtype=np.int64),
        spectral_embedding=np.empty((0, 0)),
        embedding_2d=np.empty((0, 2)),
        analysable=False,
        reason="only 3 samples, at least 10 needed",
    )
    return ReportContext(
        job_name=f"demo {HOSTILE_NAME}",
        created="2024-05-01T12:00:00+00:00",
        class_names=class_names,
        sample_ids=sample_ids,
        labels=labels,
        predictions=predictions,
        images=rng.random((N_SAMPLES, 3, SIDE, SIDE)),
        heatmaps=rng.normal(size=(N_SAMPLES, SIDE, SIDE)),
        analyses=[class1, not_analysable, class0],
        threshold=0.5,
        metadata={"model": "resnet18", "note": QUOTES_NAME, "seed": 7, "bad": float("nan")},
        artifact_check=ArtifactCheck(
            target_class=0,
            n_images=20,
            flip_rate=0.85,
            mean_prob_before=0.05,
            mean_prob_after=0.81,
            description="8x8 corner tag",
        ),
        ground_truth_rows=np.array(artifact_rows + [21], dtype=np.int64),
    )


@pytest.fixture(scope="session")
def report_context() -> ReportContext:
    """The synthetic audit; tests must not modify it (use ``dataclasses.replace``)."""
    return make_context()


@pytest.fixture(scope="session")
def rendered(report_context: ReportContext, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the synthetic audit, rendered once; returns ``index.html``."""
    from spray.report.render import render_report

    return render_report(report_context, tmp_path_factory.mktemp("report") / "out")
