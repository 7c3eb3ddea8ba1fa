"""Pictures: valid small PNGs, heatmaps centred on zero, thumbnails shrunk."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest

from spray.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_MAGIC)
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_heatmap_is_white_at_zero_and_red_or_blue_at_the_extremes() -> None:
    heatmap = np.array([[-2.0, 0.0, 1.0]])
    rgba = plots.heatmap_rgba(heatmap)
    np.testing.assert_allclose(rgba[0, 1, :3], 1.0, atol=0.01)
    assert rgba[0, 0, 2] > 0.9 and rgba[0, 0, 0] < 0.1
    assert rgba[0, 2, 0] > 0.9 and rgba[0, 2, 2] > 0.4
    assert np.all(np.isfinite(plots.heatmap_rgba(np.zeros((3, 3)))))


def test_thumbnails_are_shrunk() -> None:
    rng = np.random.default_rng(0)
    image, heatmap = rng.random((3, 200, 200)), rng.normal(size=(200, 200))
    assert _decode(plots.image_png(image)).shape[:2] == (50, 50)
    assert _decode(plots.overlay_png(image, heatmap)).shape[:2] == (50, 50)
    assert _decode(plots.overlay_png(image[:1], heatmap[:20, :20])).shape[:2] == (50, 50)
    assert _decode(plots.heatmap_png(heatmap, max_side=64)).shape[:2] == (50, 50)


def test_charts_render_and_are_reproducible() -> None:
    eigenvalues = np.array([0.0, 0.01, 0.5, 0.6])
    assert plots.spectrum_png(eigenvalues, 2) == plots.spectrum_png(eigenvalues, 2)
    _decode(plots.spectrum_png(eigenvalues, 4))
    points = np.random.default_rng(1).normal(size=(30, 2))
    labels = np.repeat([0, 1, 2], 10)
    _decode(plots.embedding_png(points, labels, flagged=[1]))
    _decode(plots.embedding_png(np.empty((0, 2)), np.empty(0), flagged=[]))


def test_data_uri_and_colours() -> None:
    assert plots.data_uri(b"\x89PNG").startswith("data:image/png;base64,")
    colours = [plots.cluster_colour(cluster) for cluster in range(10)]
    assert len(set(colours)) == 10 and all(colour.startswith("#") for colour in colours)
    assert plots.cluster_colour(3) == plots.cluster_colour(3)


def test_concept_profile_shows_the_largest_channels_as_a_chart() -> None:
    cluster = np.zeros(40)
    cluster[[3, 17, 30]] = [0.2, -0.9, 0.5]
    assert plots.profile_channels(cluster, top=4).tolist() == [17, 30, 3, 0]
    assert plots.profile_channels(np.array([np.nan, 1.0]), top=16).tolist() == [1, 0]
    bars = plots.concept_profile_bars(cluster, np.full(40, 0.1), top=4)
    assert [bar.channel for bar in bars] == [17, 30, 3, 0]
    assert bars[0].cluster == -0.9 and bars[0].cluster_bar == 1.0  # the largest |value| fills the bar
    assert bars[1].cluster_bar == pytest.approx(0.5 / 0.9) and bars[3].rest_bar == pytest.approx(0.1 / 0.9)
    alone = plots.concept_profile_bars(cluster, None, top=2)
    assert alone[0].rest is None and alone[0].rest_bar is None


def test_display_images_of_the_causal_test() -> None:
    rgb = np.zeros((192, 96, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    pixels = _decode(plots.display_png(rgb))
    assert pixels.shape[:2] == (96, 48) and np.allclose(pixels[..., 0], 1.0) and np.allclose(pixels[..., 1], 0.0)
    grey = _decode(plots.display_png(np.full((16, 16, 1), 128, dtype=np.uint8)))
    assert grey.shape[:2] == (16, 16) and np.allclose(grey[..., 0], grey[..., 2])
