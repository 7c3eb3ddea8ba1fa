"""index.html: order of sections, escaping, self-containment, h5py inputs, size caps."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from spray.report.context import ReportContext
from spray.report.render import render_report
from spray.report.config import ReportConfig
from tests.report.conftest import confirmation

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


def test_classes_seen_as_one_strategy_are_named_on_the_page_escaped(report_context: ReportContext, tmp_path: Path) -> None:
    """The page says which classes had nothing to compare (``summary.json``'s
    ``one_strategy``), with their dataset-given names escaped; without any, no such row."""
    plain = _html(render_report(report_context, tmp_path / "plain"))
    assert "seen as one strategy" not in plain
    strict = _html(render_report(dataclasses.replace(report_context, min_cluster_size=7), tmp_path / "strict"))
    row = strict[strict.index("seen as one strategy") : strict.index("artifact-score threshold")]
    assert row.count("<li>") == 2 and "&lt;img src=x onerror=alert(1)&gt;" in row and "&#34;&amp;" in row
    assert "<img src=x" not in strict


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


def _section(html: str, start: str, end: str) -> str:
    return html[html.index(start) : html.index(end, html.index(start))]


def _png_sizes(html: str, alt: str | None = None) -> list[tuple[int, int]]:
    """(height, width) of every inline PNG in ``html`` (only ``<img alt="alt">`` when given)."""
    import io

    from PIL import Image

    pattern = r'<img[^>]*src="data:image/png;base64,([^"]*)"[^>]*alt="([^"]*)"'
    sizes = []
    for data, text in re.findall(pattern, html):
        if alt is None or text == alt:
            width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
            sizes.append((height, width))
    return sizes


@pytest.fixture(scope="module")
def tested_html(tested_context: ReportContext, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _html(render_report(tested_context, tmp_path_factory.mktemp("tested") / "out"))


def test_confirmed_flag_shows_the_causal_test_and_its_examples(tested_html: str) -> None:
    flag = _section(tested_html, 'id="flag-0"', 'id="flag-1"')
    assert "Causal test" in flag
    assert "confirmed: pasting the evidence moves predictions" in flag
    assert "moved 17/20 = 85.0% <small>[64.0%&ndash;94.8%]</small>" in flag
    assert "mean \u0394P +0.412" in flag
    assert "moved 2/20 = 10.0%" in flag and "mean \u0394P n/a" in flag  # control, NaN gain
    assert "lost 5/6 = 83.3% <small>[43.6%&ndash;97.0%]</small>" in flag and "mean drop +0.550" in flag
    assert "evidence area</th><td class=\"num\">6.2%" in flag
    for kind in ("member", "evidence", "removed", "host", "pasted"):
        assert _png_sizes(flag, kind) == [(16, 16)] * 3, kind


def _with_first_flag_confirmation(context: ReportContext, **extra: Any) -> ReportContext:
    """``context`` with ``extra`` keys added to the confirmation of class 0's cluster 1 (the first flag)."""
    analyses = []
    for analysis in context.analyses:
        clusters = [
            dataclasses.replace(cluster, confirmation={**cluster.confirmation, **extra})
            if analysis.class_index == 0 and cluster.cluster_id == 1 else cluster
            for cluster in analysis.clusters
        ]
        analyses.append(dataclasses.replace(analysis, clusters=clusters))
    return dataclasses.replace(context, analyses=analyses)


def test_a_joined_cluster_shows_its_own_test_in_the_flag(tested_context: ReportContext, tmp_path: Path) -> None:
    """A flag merged from two clusters of one shortcut (spray.confirm.resolve) lists the
    joined cluster's paste and control rows under its own."""
    part = confirmation("confirmed", "", 0)
    joined = {"cluster_id": 7, "size": 9, "artifact_score": 0.5, "paste": {**part["paste"], "moved": 13, "rate": 0.65}, "control": part["control"]}
    html = _html(render_report(_with_first_flag_confirmation(tested_context, joined=[joined]), tmp_path / "out"))
    flag = _section(html, 'id="flag-0"', 'id="flag-1"')
    assert "joined cluster 7 (9 samples): pasted" in flag and "moved 13/20 = 65.0%" in flag
    assert "joined cluster 7 (9 samples): control" in flag


def test_a_flag_tested_at_two_evidence_settings_shows_both(tested_context: ReportContext, tmp_path: Path) -> None:
    """A candidate tested with the default and the wide evidence (``[confirm] wide_evidence``)
    and the members' mean overlay lists each setting's paste and control rows, named by the
    region's largest share or as the overlay."""
    part = confirmation("confirmed", "", 0)
    settings = [
        {"evidence": {"area": 0.3, "mass": 0.5}, "paste": {**part["paste"], "moved": 3, "rate": 0.15}, "control": part["control"]},
        {"evidence": {"area": 0.5, "mass": 0.9}, "paste": part["paste"], "control": part["control"]},
        {"evidence": {"area": 1.0, "mass": 1.0, "overlay": True}, "paste": {**part["paste"], "moved": 17, "rate": 0.85}, "control": part["control"]},
    ]
    html = _html(render_report(_with_first_flag_confirmation(tested_context, settings=settings), tmp_path / "out"))
    flag = _section(html, 'id="flag-0"', 'id="flag-1"')
    assert "evidence of at most 30% of the image: pasted" in flag and "moved 3/20 = 15.0%" in flag
    assert "evidence of at most 50% of the image: control" in flag
    assert "the members&#39; mean overlay, added: pasted" in flag and "moved 17/20 = 85.0%" in flag


def test_untested_flag_says_why(tested_html: str) -> None:
    flag = _section(tested_html, 'id="flag-1"', 'id="classes"')
    assert "untested: no held-out images of other classes were available" in flag
    assert "moved" not in flag and 'alt="pasted"' not in flag
    head = tested_html[: tested_html.index('id="flags"')]
    assert "1 untested" in head and "rejected candidates</th><td>1" in head


def test_rejected_candidate_is_listed_in_its_class_not_as_a_flag(tested_html: str) -> None:
    assert tested_html.count('class="card flag"') == 2
    flags = _section(tested_html, 'id="flags"', 'id="classes"')
    assert "moved no more predictions than the control" not in flags
    class1 = _section(tested_html, 'id="class-1"', 'id="class-2"')
    rejected = class1[class1.index("Tested and rejected") :]
    assert 'id="class-1-cluster-1-test"' in rejected
    assert "rejected: pasting the evidence moved no more predictions than the control" in rejected
    assert "moved 3/20 = 15.0%" in rejected and "score 0.600" in rejected
    assert len(_png_sizes(rejected, "pasted")) == 2
    assert "Tested and rejected" not in _section(tested_html, 'id="class-0"', 'id="class-1"')


def test_concept_space_cluster_is_a_bar_chart_and_pixel_heatmaps(report_context: ReportContext, tmp_path: Path) -> None:
    """A concept-space analysis stores (1, channels) means: the page draws a bar chart of
    them and the members' pixel heatmaps, never a 1-pixel-high picture."""
    rng = np.random.default_rng(3)
    class0 = next(a for a in report_context.analyses if a.class_index == 0)
    profiles = [dataclasses.replace(c, mean_heatmap=rng.random((1, 40)), flagged=False) for c in class0.clusters]
    concept = dataclasses.replace(
        class0, space="concept:features.3", clusters=profiles, class_mean_heatmap=rng.random((1, 40))
    )
    context = dataclasses.replace(report_context, analyses=[concept])
    html = _html(render_report(context, tmp_path / "out"))
    section = html[html.index('id="class-0"') :]
    sizes = _png_sizes(section)
    assert sizes and min(height for height, _ in sizes) > 4, sizes
    assert section.count('<table class="profile-bars">') == 2  # one bar chart per cluster
    assert not _png_sizes(section, "concept profile")
    first = section[section.index('<table class="profile-bars">') :]
    assert first.index("</table>") > first.index("rest of the class")  # cluster beside the rest
    assert section.count("<figcaption>mean pixel heatmap of the") == 3  # two clusters and the class
    for caption in ("of the 8 members shown", "of the 6 members shown", "of the 14 samples shown"):
        assert len(_png_sizes(section, f"mean pixel heatmap {caption}")) == 1, caption


def test_precision_reads_n_a_for_a_class_without_planted_rows(report_context: ReportContext, tmp_path: Path) -> None:
    context = dataclasses.replace(report_context, ground_truth_rows=np.array([1, 3, 4, 8, 13, 17]))
    html = _html(render_report(context, tmp_path / "out"))
    class0 = _section(html, 'id="class-0"', 'id="class-1"')
    class1 = _section(html, 'id="class-1"', 'id="class-2"')
    na = '<tr><th>precision</th><td class="num">n/a</td></tr>'
    assert '<tr><th>precision</th><td class="num">100.0%</td></tr>' in class0 and na not in class0
    assert class1.count(na) == 3 and "\"num\">0.0%" not in class1
    flag = _section(html, 'id="flag-1"', 'id="classes"')
    assert na in flag and '<tr><th>recall</th><td class="num">n/a</td></tr>' in flag


def test_causal_tests_keep_the_page_escaped_and_self_contained(tested_html: str) -> None:
    assert "<img src=x" not in tested_html and "\"&'" not in tested_html
    assert "predicted as &lt;img src=x onerror=alert(1)&gt;" in tested_html  # target class name in the legend
    sources = re.findall(r'src="([^"]*)"', tested_html)
    assert all(source.startswith("data:image/png;base64,") for source in sources)


def test_class_pictures_drawn_on_dask_workers_give_the_same_report(report_context, rendered, tmp_path):
    """The class sections drawn as Dask tasks (``dask_starmap``) make the very same page."""
    from spray.attribution.distributed import start_client
    from spray.dask_tasks import dask_starmap
    from spray.report.render import render_report

    cluster = start_client("local", workers=2, threads_per_worker=1, memory_limit="2GiB", processes=False)
    try:
        on_workers = render_report(report_context, tmp_path / "dask", starmap=dask_starmap(cluster.client))
    finally:
        cluster.close()
    assert on_workers.read_bytes() == rendered.read_bytes()
    assert b"<img" in on_workers.read_bytes()  # pictures were drawn, not left out


def test_header_states_the_verdict_and_what_was_not_checked(rendered: Path) -> None:
    html = _html(rendered)
    head = html[: html.index('id="flags"')]
    summary = json.loads((rendered.parent / "summary.json").read_text(encoding="utf-8"))
    assert f"<strong>{summary['verdict']}</strong>" in head and summary["complete"] is False
    assert "not analysed: only 3 samples, at least 10 needed" in head
