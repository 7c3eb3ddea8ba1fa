"""index.html: order of sections, escaping, self-containment, h5py inputs, size caps."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from spray.report.context import ReportContext
from spray.report.render import render_report
from spray.report.config import ReportConfig

HOSTILE_NAME = "<img src=x onerror=alert(1)>"


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_writes_index_and_summary_only_inside_out_dir(rendered: Path) -> None:
    out_dir = rendered.parent
    root = out_dir.parent
    written = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert written == ["out/index.html", "out/summary.json"]
    assert rendered.name == "index.html"


def test_flagged_clusters_come_before_class_sections(rendered: Path) -> None:
    html = _html(rendered)
    assert html.index('id="flag-0"') < html.index('id="flag-1"') < html.index('id="class-0"')
    assert html.index('id="class-0"') < html.index('id="class-1"') < html.index('id="class-2"')
    assert html.count('class="card flag"') == 2
    top = html[html.index('id="flag-0"') : html.index('id="flag-1"')]
    assert "score 0.900" in top and "cluster 1" in top


def test_dataset_strings_are_escaped(rendered: Path) -> None:
    html = _html(rendered)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=x" not in html
    assert "onerror=alert(1)>" not in html
    assert "&#34;&amp;&#39;" in html
    assert "\"&'" not in html


def test_page_is_self_contained(rendered: Path) -> None:
    html = _html(rendered)
    assert not re.search(r"https?:", html, flags=re.IGNORECASE)
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<style>" in html and "<link" not in html


def test_only_the_hashed_package_script_may_run(rendered: Path) -> None:
    html = _html(rendered)
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    assert len(scripts) == html.lower().count("<script") == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode("utf-8")).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "img-src data:" in policy
    assert "unsafe-inline" not in policy.split("script-src")[1]


def test_not_analysable_class_shows_reason(rendered: Path) -> None:
    html = _html(rendered)
    section = html[html.index('id="class-2"') :]
    assert "Not analysed: only 3 samples, at least 10 needed" in section


def test_header_and_artifact_check(rendered: Path) -> None:
    html = _html(rendered)
    head = html[: html.index('id="flags"')]
    assert "2024-05-01T12:00:00+00:00" in head and "resnet18" in head
    assert "85.0%" in head and "0.050" in head and "0.810" in head
    assert 'id="artifact-check"' in head


def test_summary_written_beside_page(rendered: Path) -> None:
    summary = json.loads((rendered.parent / "summary.json").read_text(encoding="utf-8"))
    assert summary["schema_version"] == 1 and len(summary["flags"]) == 2


def test_h5py_datasets_as_inputs(report_context: ReportContext, tmp_path: Path) -> None:
    order = np.arange(len(report_context.sample_ids))
    with h5py.File(tmp_path / "inputs.h5", "w") as handle:
        handle["images"] = np.asarray(report_context.images, dtype=np.float32)
        handle["heatmaps"] = np.asarray(report_context.heatmaps, dtype=np.float32)
        handle["labels"] = report_context.labels
        handle["predictions"] = report_context.predictions
        handle.create_dataset(
            "ids", data=[report_context.sample_ids[row] for row in order], dtype=h5py.string_dtype()
        )
        from_h5 = dataclasses.replace(
            report_context,
            images=handle["images"],
            heatmaps=handle["heatmaps"],
            labels=handle["labels"],
            predictions=handle["predictions"],
            sample_ids=handle["ids"],
        )
        page = render_report(from_h5, tmp_path / "out")
    summary = json.loads((page.parent / "summary.json").read_text(encoding="utf-8"))
    assert summary["flags"][0]["member_ids"][1] == HOSTILE_NAME
    html = _html(page)
    assert 'id="flag-0"' in html and "<img src=x" not in html
    assert "img_013.png" in html


def test_grids_are_capped(report_context: ReportContext, tmp_path: Path) -> None:
    limits = ReportConfig(samples_per_grid=2, cluster_samples=1)
    html = _html(render_report(report_context, tmp_path / "out", limits))
    flag = html[html.index('id="flag-0"') : html.index('id="flag-1"')]
    assert flag.count('<figure class="tile') == 2
    assert "2 of 6 members" in flag
    classes = html[html.index('id="classes"') :]
    assert classes.count('<figure class="tile') == 5


def test_flags_beyond_the_cap_are_listed(report_context: ReportContext, tmp_path: Path) -> None:
    limits = ReportConfig(max_flag_sections=1)
    html = _html(render_report(report_context, tmp_path / "out", limits))
    assert 'id="flag-0"' in html and 'id="flag-1"' not in html
    assert html.count('class="flag-row"') == 1


def test_no_flags_message(report_context: ReportContext, tmp_path: Path) -> None:
    quiet = dataclasses.replace(report_context, analyses=[report_context.analyses[1]])
    html = _html(render_report(quiet, tmp_path / "out"))
    assert "No cluster reached the artifact-score threshold" in html
    assert 'id="flag-0"' not in html


def test_out_dir_that_is_a_file_is_refused(report_context: ReportContext, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError):
        render_report(report_context, target)
    assert target.read_text() == "keep me"


def test_rendering_is_deterministic(report_context: ReportContext, tmp_path: Path) -> None:
    first = render_report(report_context, tmp_path / "a").read_bytes()
    second = render_report(report_context, tmp_path / "b").read_bytes()
    assert first == second


def test_score_drivers_mark_the_limiting_and_strongest_terms() -> None:
    from spray.report.views import component_views

    views = {v.name: v for v in component_views(
        {"concentration": 0.6, "consistency": 0.9, "displacement": 0.8, "separation": 0.3, "size_fraction": 0.1}
    )}
    assert views["separation"].limiting and views["consistency"].strongest
    assert not views["size_fraction"].limiting  # not a term of the geometric mean
    assert "rest of the class" in views["displacement"].note
    tied = component_views({"concentration": 0.45, "separation": 0.45})
    assert not any(v.limiting or v.strongest for v in tied)


def test_flag_of_the_checked_class_shows_the_stamped_test(rendered: Path) -> None:
    html = _html(rendered)
    first = html[html.index('id="flag-0"') : html.index('id="flag-1"')]
    second = html[html.index('id="flag-1"') : html.index('id="classes"')]
    assert "Stamped-test check" in first and "85.0%" in first
    assert "Stamped-test check" not in second


def test_class_sections_show_accuracy_and_filters(rendered: Path) -> None:
    html = _html(rendered)
    section = html[html.index('id="class-1"') : html.index('id="class-2"')]
    assert "accuracy 94.1%" in section and 'data-class-index="1"' in section
    assert 'id="filters" hidden' in html and 'id="zoom" class="zoom" hidden' in html


def test_a_finding_seen_in_two_spaces_is_one_card_naming_both(report_context: ReportContext, tmp_path: Path) -> None:
    """The class-0 artifact flagged again in a concept space: still two flag cards, and the
    first one lists the heatmap and the concept space under "revealed by"."""
    class0 = next(a for a in report_context.analyses if a.class_index == 0)
    again = dataclasses.replace(class0, space="concept:layer<4>", clusters=[
        dataclasses.replace(c, artifact_score=0.8) if c.flagged else c for c in class0.clusters
    ])
    context = dataclasses.replace(report_context, analyses=[*report_context.analyses, again])
    html = _html(render_report(context, tmp_path / "out"))
    assert html.count('class="card flag"') == 2
    top = html[html.index('id="flag-0"') : html.index('id="flag-1"')]
    assert "revealed by" in top
    assert "heatmap, cluster 1: score 0.900" in top
    assert "concept:layer&lt;4&gt;, cluster 1: score 0.800" in top and "concept:layer<4>" not in top
