"""A small synthetic audit for the report tests: two analysed classes, one not analysable.

Class and sample names are hostile on purpose (HTML tags, quotes, ampersands) so the
escaping tests have something to catch.
"""

from __future__ import annotations

import dataclasses
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


UNTESTED_REASON = "no held-out images of other classes were available"
REJECTED_REASON = "pasting the evidence moved no more predictions than the control"


def confirmation(status: str, reason: str, target: int) -> dict:
    """A causal-test record in the schema of ``ClusterResult.confirmation``."""
    record = {"status": status, "reason": reason, "target_class": target, "evidence_area": 0.0625}
    if status == "untested":
        return record
    moved = 17 if status == "confirmed" else 3
    return {
        **record,
        "paste": {"n": 20, "moved": moved, "rate": moved / 20, "low": 0.64 if moved == 17 else 0.052, "high": 0.948 if moved == 17 else 0.36, "gain": 0.412 if moved == 17 else 0.03},
        "control": {"n": 20, "moved": 2, "rate": 0.1, "low": 0.028, "high": 0.301, "gain": float("nan")},
        "removal": {"n": 6, "lost": 5, "rate": 5 / 6, "low": 0.436, "high": 0.97, "drop": 0.55},
    }


def examples(k: int, seed: int) -> dict[str, np.ndarray]:
    """Display images of a causal test: uint8 (k, H, W, C), hosts in grey (C = 1)."""
    rng = np.random.default_rng(seed)
    shapes = {"member": 3, "evidence": 3, "removed": 3, "host": 1, "pasted": 1}
    return {kind: rng.integers(0, 256, size=(k, SIDE, SIDE, c), dtype=np.uint8) for kind, c in shapes.items()}


def with_causal_tests(context: ReportContext) -> ReportContext:
    """``context`` after the causal test: class 0's flag confirmed (3 examples), class 1's
    flag untested, and class 1's cluster 1 raised to a candidate (score 0.6) that the test
    rejected (2 examples)."""
    analyses = []
    for analysis in context.analyses:
        clusters = []
        for cluster in analysis.clusters:
            key = (analysis.class_index, cluster.cluster_id)
            if key == (0, 1):
                cluster = dataclasses.replace(cluster, candidate=True, confirmation=confirmation("confirmed", "", 0), examples=examples(3, 1))
            elif key == (1, 0):
                cluster = dataclasses.replace(cluster, candidate=True, confirmation=confirmation("untested", UNTESTED_REASON, 1))
            elif key == (1, 1):
                cluster = dataclasses.replace(
                    cluster, artifact_score=0.6, candidate=True, flagged=False,
                    confirmation=confirmation("rejected", REJECTED_REASON, 1), examples=examples(2, 2),
                )
            clusters.append(cluster)
        analyses.append(dataclasses.replace(analysis, clusters=clusters))
    return dataclasses.replace(context, analyses=analyses)


@pytest.fixture(scope="session")
def tested_context(report_context: ReportContext) -> ReportContext:
    """The synthetic audit with causal tests (see :func:`with_causal_tests`)."""
    return with_causal_tests(report_context)
