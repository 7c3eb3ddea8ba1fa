"""The report in a real browser: headless Chromium driven by Playwright, from file://.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; ``.ci/system-setup`` installs it) and
the ``playwright`` Python package; no browser is ever downloaded. Skipped with the reason
when either is missing. Screenshots go to the test's ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spray.report.compare import write_comparison
from spray.report.context import AtlasConcept, ClusterAtlas, ConceptPicture, ReportContext
from spray.report.index import write_index
from spray.report.render import render_report

HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM = os.environ.get("SPRAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright; no browser download needed)"
)
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"Chromium not found at {CHROMIUM} (run .ci/system-setup)", allow_module_level=True)


def _atlas(context: ReportContext) -> list[ClusterAtlas]:
    """A hand-made atlas for the top flag, with a hostile sample id among the pictures."""
    rng = np.random.default_rng(0)

    def picture(row: int) -> ConceptPicture:
        return ConceptPicture(
            row=row, sample_id=context.sample_ids[row], relevance=1.0,
            image=rng.random((3, 8, 8)), heatmap=rng.normal(size=(8, 8)), box=(0, 8, 0, 8),
        )

    concepts = [
        AtlasConcept(channel=c, distinction=2.0 - c, cluster_share=0.3, rest_share=0.1,
                     representative=picture(1), references=[picture(3), picture(8), picture(30)])
        for c in range(2)
    ]
    return [ClusterAtlas(class_index=0, space="heatmap", cluster_id=1, layer="features.conv4",
                         representative_row=1, concepts=concepts)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        handle = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield handle
        finally:
            handle.close()


class Visit:
    """One page opened from file://, with everything it requested, logged or popped up."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.context = browser.new_context(viewport={"width": 1300, "height": 1000})
        self.page = self.context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)
        self.page.goto(path.as_uri(), wait_until="load")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def check_clean(self) -> None:
        """Nothing left the machine, nothing failed, nothing popped up."""
        outside = [url for url in self.requests if not url.startswith(("file:", "data:"))]
        assert outside == [], f"requests leaving the machine: {outside}"
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.dialogs == [], f"dialogs fired: {self.dialogs}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def report(tested_context: ReportContext, tmp_path_factory: pytest.TempPathFactory) -> Path:
    context = dataclasses.replace(tested_context, concept_atlas=_atlas(tested_context))
    return render_report(context, tmp_path_factory.mktemp("reports") / "audit")


@pytest.fixture(scope="module")
def visit(browser: Any, report: Path) -> Iterator[Visit]:
    opened = Visit(browser, report)
    yield opened
    opened.close()


def test_flagged_cluster_is_shown_first_with_its_images(visit: Visit, tmp_path: Path) -> None:
    page = visit.page
    page.screenshot(path=str(tmp_path / "report-top.png"))
    first = page.locator("article.flag").first
    assert first.get_attribute("id") == "flag-0"
    assert "score 0.900" in first.inner_text()
    order = page.evaluate(
        """() => {
            const flag = document.getElementById('flag-0').getBoundingClientRect().top;
            const classes = document.getElementById('classes').getBoundingClientRect().top;
            const other = document.getElementById('flag-1').getBoundingClientRect().top;
            return [flag, other, classes];
        }"""
    )
    assert order[0] < order[1] < order[2]
    first.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#flag-0 img')].every(i => i.complete)"
    )
    widths = page.eval_on_selector_all("#flag-0 img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) > 10 and all(width > 0 for width in widths)
    assert page.locator("#flag-0 .atlas figure.pic").count() == 8
    causal = page.locator("#flag-0 .causal")
    assert "confirmed: pasting the evidence moves predictions" in causal.inner_text()
    assert page.eval_on_selector_all("#flag-0 .causal img", "images => images.map(i => i.naturalHeight)") == [16] * 15
    first.screenshot(path=str(tmp_path / "flag-0.png"))
    visit.check_clean()


def test_hostile_names_are_shown_as_text(visit: Visit) -> None:
    page = visit.page
    heading = page.locator("#flag-0 h3")
    assert HOSTILE in heading.inner_text() and heading.is_visible()
    assert page.locator("#flag-0 .atlas .id", has_text=HOSTILE).first.is_visible()
    assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert visit.dialogs == []
    visit.check_clean()


def test_filters_and_zoom_work_offline(visit: Visit, tmp_path: Path) -> None:
    page = visit.page
    assert page.locator("#filters").is_visible()
    page.fill("#filter-class", "cat")
    assert page.locator("#class-2").is_visible() and not page.locator("#class-0").is_visible()
    page.fill("#filter-class", "")
    page.check("#filter-flagged")
    assert not page.locator("#class-2").is_visible()
    assert page.locator("#class-0-cluster-1").is_visible()
    assert not page.locator("#class-0-cluster-0").is_visible()
    page.uncheck("#filter-flagged")
    assert page.locator("#class-0-cluster-0").is_visible()

    page.locator("#flag-0 .tile img").first.click()
    zoom = page.locator("#zoom")
    assert zoom.is_visible()
    assert page.locator("#zoom-image").evaluate("i => i.naturalWidth") > 0
    caption = page.locator("#zoom-caption").inner_text()
    assert "row" in caption and "label" in caption
    page.screenshot(path=str(tmp_path / "zoom.png"))
    page.keyboard.press("Escape")
    assert not zoom.is_visible()
    hostile_tile = page.locator("#flag-0 figure.tile", has_text=HOSTILE).locator("img").first
    hostile_tile.click()
    assert HOSTILE in page.locator("#zoom-caption").inner_text()
    page.locator("#zoom").click()
    assert not zoom.is_visible()
    visit.check_clean()


def test_index_and_comparison_pages_load_clean(browser: Any, report: Path, report_context: ReportContext) -> None:
    root = report.parent.parent
    quiet = dataclasses.replace(report_context, analyses=[report_context.analyses[1]], job_name="after")
    render_report(quiet, root / "after")
    comparison = write_comparison(root / "audit", root / "after", root / "comparison")
    index = write_index(root)
    for path in (index, comparison):
        opened = Visit(browser, path)
        try:
            assert HOSTILE in opened.page.inner_text("body")
            links = opened.page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
            assert links and all(link.startswith("file:") or "#" in link for link in links)
            opened.check_clean()
        finally:
            opened.close()
