"""Audit index and comparison view, on two rendered audits that differ by one flag."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from spray.analysis.result import ClassAnalysis
from spray.report.compare import compare_summaries, jaccard, match_clusters, write_comparison
from spray.report.context import ReportContext
from spray.report.index import build_index, write_index
from spray.report.render import render_report


def _after(context: ReportContext) -> ReportContext:
    """The same audit where class 1's flag is gone and class 0's clusters are renumbered."""
    analyses = []
    for analysis in context.analyses:
        clusters = []
        for cluster in analysis.clusters:
            if analysis.class_index == 1 and cluster.flagged:
                cluster = dataclasses.replace(cluster, artifact_score=0.2, flagged=False)
            if analysis.class_index == 0:
                cluster = dataclasses.replace(
                    cluster,
                    cluster_id=1 - cluster.cluster_id,
                    artifact_score=cluster.artifact_score - 0.05 if cluster.flagged else cluster.artifact_score,
                )
            clusters.append(cluster)
        labels = np.asarray(analysis.labels)
        if analysis.class_index == 0:
            labels = 1 - labels
        analyses.append(dataclasses.replace(analysis, clusters=clusters, labels=labels))
    return dataclasses.replace(
        context, analyses=analyses, job_name="after <b>", created="2024-06-01T12:00:00+00:00"
    )


@pytest.fixture(scope="module")
def reports_root(report_context: ReportContext, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reports")
    render_report(report_context, root / "before")
    render_report(_after(report_context), root / "team" / "after")
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json", encoding="utf-8")
    (root / "before" / "stages").mkdir()
    (root / "before" / "stages" / "summary.json").write_text("{}", encoding="utf-8")
    return root


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def test_one_flag_disappeared_one_persisted(reports_root: Path) -> None:
    diff = compare_summaries(_summary(reports_root / "before"), _summary(reports_root / "team" / "after"))
    assert diff["counts"] == {"appeared": 0, "disappeared": 1, "persisted": 1, "clean": 3}
    (gone,) = diff["flags"]["disappeared"]
    assert gone["class_index"] == 1 and gone["before"]["cluster_id"] == 0
    assert gone["after"]["flagged"] is False and gone["jaccard"] == 1.0
    assert gone["score_change"] == pytest.approx(0.2 - 0.75)
    (kept,) = diff["flags"]["persisted"]
    # Matched by members although the cluster ids were swapped.
    assert (kept["before"]["cluster_id"], kept["after"]["cluster_id"]) == (1, 0)
    assert kept["shared"] == 6 and kept["score_change"] == pytest.approx(-0.05)
    assert diff["warnings"] == []


def test_reverse_comparison_reports_the_flag_as_appeared(reports_root: Path) -> None:
    diff = compare_summaries(_summary(reports_root / "team" / "after"), _summary(reports_root / "before"))
    assert diff["counts"]["appeared"] == 1 and diff["counts"]["disappeared"] == 0
    assert diff["flags"]["appeared"][0]["class_index"] == 1


def test_low_overlap_clusters_stay_unmatched() -> None:
    before = [{"cluster_id": 0, "member_ids": list("abcd"), "flagged": True, "artifact_score": 0.9}]
    after = [{"cluster_id": 0, "member_ids": list("defgh"), "flagged": True, "artifact_score": 0.8}]
    assert jaccard(set("abcd"), set("defgh")) == pytest.approx(1 / 8)
    pairs = match_clusters(before, after, min_jaccard=0.3)
    assert [(a is not None, b is not None) for a, b, _, _ in pairs] == [(True, False), (False, True)]
    summary = {"classes": [{"class_index": 0, "class_name": "x", "space": "heatmap", "clusters": before}]}
    other = {"classes": [{"class_index": 0, "class_name": "x", "space": "heatmap", "clusters": after}]}
    diff = compare_summaries(summary, other)
    assert diff["counts"]["appeared"] == 1 and diff["counts"]["disappeared"] == 1
    assert compare_summaries(summary, other, min_jaccard=0.1)["counts"]["persisted"] == 1


def test_comparison_files_are_written_escaped_and_linked(reports_root: Path, tmp_path: Path) -> None:
    out = reports_root / "comparisons" / "before-vs-after"
    page = write_comparison(reports_root / "before", reports_root / "team" / "after" / "summary.json", out)
    html = page.read_text(encoding="utf-8")
    diff = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert diff["counts"]["disappeared"] == 1 and diff["after"]["job"] == "after <b>"
    assert "after &lt;b&gt;" in html and "<b>" not in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'href="../../before/index.html"' in html and 'href="../../team/after/index.html"' in html
    assert "<script" not in html.lower() and not re.search(r"https?:", html)
    section = html[html.index('id="disappeared"') : html.index('id="persisted"')]
    assert section.count('class="match disappeared"') == 1


def test_index_lists_every_audit_newest_first(reports_root: Path) -> None:
    entries = build_index(reports_root)
    assert [entry.folder for entry in entries] == ["team/after", "before", "broken"]
    after, before, broken = entries
    assert after.n_flags == 1 and before.n_flags == 2 and after.model == "resnet18"
    assert after.link == "team/after/index.html" and after.has_page
    assert "unreadable" in broken.error and not broken.has_page
    page = write_index(reports_root)
    html = page.read_text(encoding="utf-8")
    assert page == reports_root / "index.html"
    assert html.index("team/after/index.html") < html.index('href="before/index.html"')
    assert "after &lt;b&gt;" in html and "<b>" not in html
    assert "demo &lt;img src=x onerror=alert(1)&gt;" in html


def test_index_refuses_an_audit_folder(reports_root: Path) -> None:
    with pytest.raises(ValueError, match="audit folder"):
        write_index(reports_root / "before")
    assert (reports_root / "before" / "index.html").read_text(encoding="utf-8").count('id="flag-0"') == 1


def test_index_never_overwrites_a_foreign_page(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>my own page</p>", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not written by spray"):
        write_index(tmp_path)
    assert (tmp_path / "index.html").read_text(encoding="utf-8") == "<p>my own page</p>"
    (tmp_path / "index.html").unlink()
    first = write_index(tmp_path)
    assert write_index(tmp_path) == first  # its own page is replaced
