"""Size and load time of the report of a large audit (not part of the test suite).

Builds a synthetic audit of ``--n`` samples in ``--classes`` classes (``--side`` px RGB
images with noise, 32 by default, 8 clusters per class, ``--flags`` flagged clusters each with a
concept atlas), renders it, and opens it in headless Chromium from file:// to read the
navigation timing. Images and heatmaps are generated on read, as an h5py dataset would
be read, so memory stays small.

    python3 tests/report/scale_check.py --out /tmp/scale --n 60000 --classes 10

Prints render time, page size and the browser's DOMContentLoaded / load times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.report.context import AtlasConcept, ClusterAtlas, ConceptPicture, ReportContext
from spray.report.render import render_report

SIDE = 32
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


class Generated:
    """An (N, ...) array whose rows are made on read, deterministically from the row."""

    def __init__(self, n: int, shape: tuple[int, ...], heatmap: bool) -> None:
        self.shape = (n, *shape)
        self.dtype = np.dtype(np.float32)
        self.heatmap = heatmap

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: object) -> np.ndarray:
        rows = np.arange(self.shape[0])[index]
        return np.stack([self._row(int(row)) for row in np.atleast_1d(rows)])

    def _row(self, row: int) -> np.ndarray:
        rng = np.random.default_rng(row)
        if self.heatmap:
            values = rng.normal(scale=0.2, size=self.shape[1:])
            y, x = 4 + row % 20, 4 + (row // 20) % 20
            values[y : y + 6, x : x + 6] += 1.0
            return values.astype(np.float32)
        base = rng.random(3)[:, None, None] * 0.6
        return np.clip(base + rng.normal(scale=0.15, size=self.shape[1:]), 0, 1).astype(np.float32)


def synthetic_context(n: int, n_classes: int, n_flags: int, side: int = SIDE, seed: int = 0) -> ReportContext:
    rng = np.random.default_rng(seed)
    per_class = -(-n_flags // n_classes)
    labels = np.repeat(np.arange(n_classes), n // n_classes)
    predictions = np.where(rng.random(labels.size) < 0.05, (labels + 1) % n_classes, labels)
    analyses = []
    flags_left = n_flags
    for cls in range(n_classes):
        rows = np.flatnonzero(labels == cls)
        cluster_of = rng.integers(0, 8, size=rows.size)
        embedding = rng.normal(size=(rows.size, 32)).astype(np.float32) + cluster_of[:, None]
        clusters = []
        for cid in range(8):
            flagged = cid < per_class and flags_left > 0
            score = 0.8 if flagged else float(rng.random() * 0.4)
            clusters.append(ClusterResult(
                cluster_id=cid, member_rows=rows[cluster_of == cid], artifact_score=score, flagged=flagged,
                score_components={"displacement": 0.9, "consistency": 0.8, "separation": 0.7,
                                  "concentration": 0.6, "size_fraction": 0.12},
                mean_heatmap=rng.normal(size=(16, 16)),
            ))
            flags_left -= int(flagged)
        clusters.sort(key=lambda c: -c.artifact_score)
        analyses.append(ClassAnalysis(
            class_index=cls, class_name=f"class {cls}", space="heatmap", rows=rows,
            eigenvalues=np.sort(rng.random(32)), n_clusters=8, labels=cluster_of,
            spectral_embedding=embedding, embedding_2d=embedding[:, :2] + rng.normal(size=(rows.size, 2)),
            clusters=clusters, class_mean_heatmap=rng.normal(size=(16, 16)),
        ))
    atlas = [
        ClusterAtlas(
            class_index=a.class_index, space="heatmap", cluster_id=c.cluster_id, layer="layer4",
            representative_row=int(c.member_rows[0]),
            concepts=[
                AtlasConcept(
                    channel=k, distinction=3.0 - k, cluster_share=0.1, rest_share=0.01,
                    representative=_picture(rng, int(c.member_rows[0])),
                    references=[_picture(rng, int(r)) for r in rng.choice(n, 6, replace=False)],
                )
                for k in range(4)
            ],
        )
        for a in analyses for c in a.clusters if c.flagged
    ]
    return ReportContext(
        job_name="scale", created="2025-01-01T00:00:00+00:00",
        class_names=[f"class {i}" for i in range(n_classes)],
        sample_ids=[f"train/{row:06d}.png" for row in range(n)], labels=labels, predictions=predictions,
        images=Generated(n, (3, side, side), heatmap=False), heatmaps=Generated(n, (side, side), heatmap=True),
        analyses=analyses, threshold=0.5, metadata={"model": "synthetic", "dataset": f"synthetic {n}"},
        concept_atlas=atlas,
    )


def _picture(rng: np.random.Generator, row: int) -> ConceptPicture:
    return ConceptPicture(row=row, sample_id=f"train/{row:06d}.png", relevance=1.0,
                          image=rng.random((3, 16, 16)), heatmap=rng.normal(size=(16, 16)), box=(0, 16, 0, 16))


def browser_timing(page_path: Path, runs: int = 5) -> list[dict[str, float]]:
    from playwright.sync_api import sync_playwright

    timings = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1300, "height": 1000})
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            start = time.perf_counter()
            page.goto(page_path.as_uri(), wait_until="load")
            wall = time.perf_counter() - start
            nav = page.evaluate("() => performance.getEntriesByType('navigation')[0].toJSON()")
            timings.append({
                "dom_content_loaded_s": nav["domContentLoadedEventEnd"] / 1000,
                "load_s": nav["loadEventEnd"] / 1000,
                "wall_s": wall,
                "images": page.evaluate("() => document.images.length"),
                "console_errors": len(errors),
            })
            context.close()
        browser.close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--flags", type=int, default=10)
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")
    args = parser.parse_args()
    context = synthetic_context(args.n, args.classes, args.flags, args.side)
    start = time.perf_counter()
    page = render_report(context, args.out)
    render_s = time.perf_counter() - start
    result = {
        "render_s": round(render_s, 1),
        "index_html_mb": round(page.stat().st_size / 1e6, 2),
        "summary_json_mb": round((page.parent / "summary.json").stat().st_size / 1e6, 2),
        "browser": browser_timing(page),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
