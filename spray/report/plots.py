"""The report's pictures, rendered with matplotlib to small PNGs.

Two kinds of picture:

* charts (eigenvalue spectrum, 2-D embedding, concept profile) are drawn on a ``matplotlib.figure.Figure``
  with the Agg canvas directly. They never go through ``pyplot``, so no global backend is
  switched, no figure registry grows, and a figure is freed as soon as it is dropped.
  The render is stored as a small palette PNG (Pillow, which matplotlib depends on);
* thumbnails (images, heatmaps, overlays) are computed as RGB(A) arrays and encoded
  straight to PNG with Pillow, without a figure: much faster, and one pixel per pixel.

Heatmaps use the diverging ``bwr`` colormap centred on 0 (red: evidence for the class,
blue: against), each map scaled by its own largest ``|R|``. Thumbnails are shrunk by area
averaging to at most ``max_side`` pixels, which keeps a report of a large dataset small.
"""

from __future__ import annotations

from dataclasses import dataclass

import base64
import io
from collections.abc import Iterable

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

HEATMAP_CMAP = "bwr"
CHART_DPI = 90
CHART_COLOURS = 64
THUMB_SIDE = 64
HEATMAP_SIDE = 128
EXAMPLE_SIDE = 96
PROFILE_CHANNELS = 16
MAX_SCATTER_POINTS = 20_000
_PALETTE = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
_HEATMAP_COLOURS = matplotlib.colormaps[HEATMAP_CMAP]


def cluster_colour(cluster_id: int) -> str:
    """A stable hex colour for a cluster id, shared by the embedding plot and the page."""
    return matplotlib.colors.to_hex(_PALETTE[int(cluster_id) % len(_PALETTE)])


def data_uri(png: bytes) -> str:
    """Embed PNG bytes in the page as a ``data:`` URI (no separate file, no network)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(figure: Figure) -> bytes:
    """Render a chart to a palette PNG of at most ``CHART_COLOURS`` colours.

    Charts use few colours, so a palette image is about four times smaller than the
    anti-aliased RGB render and looks the same. No metadata is written, so the bytes are
    reproducible.
    """
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(CHART_DPI)
    canvas.draw()
    rgb = np.array(canvas.buffer_rgba())[:, :, :3]
    figure.clear()
    palette = Image.fromarray(rgb).quantize(
        colors=CHART_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    buffer = io.BytesIO()
    palette.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def rgba_png(rgba: np.ndarray) -> bytes:
    """Encode an (H, W, 3|4) array of floats in [0, 1] or uint8 as PNG bytes."""
    if rgba.dtype != np.uint8:
        rgba = np.round(np.clip(rgba, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba)).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def spectrum_png(eigenvalues: np.ndarray, n_clusters: int) -> bytes:
    """Plot the smallest Laplacian eigenvalues and mark the eigengap that set ``n_clusters``.

    SpRAy picks the number of clusters k where the gap between the k-th and (k+1)-th
    eigenvalue is largest; the shaded band shows that gap.
    """
    values = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    index = np.arange(1, values.size + 1)
    figure = Figure(figsize=(4.0, 2.6))
    axes = figure.add_subplot()
    axes.plot(index, values, marker="o", markersize=3.5, linewidth=1.2, color="#33415c")
    k = int(n_clusters)
    if 1 <= k < values.size and np.all(np.isfinite(values[k - 1 : k + 1])):
        axes.axvspan(k, k + 1, color="#f4a261", alpha=0.35, linewidth=0)
        axes.text(
            k + 0.5,
            0.97,
            f"gap: k = {k}",
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"},
        )
    axes.set_xlabel("index", fontsize=8)
    axes.set_ylabel("eigenvalue", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3, linewidth=0.5)
    figure.subplots_adjust(left=0.15, right=0.97, top=0.96, bottom=0.17)
    return figure_png(figure)


def embedding_png(points: np.ndarray, labels: np.ndarray, flagged: Iterable[int]) -> bytes:
    """Scatter the 2-D embedding coloured by cluster; flagged clusters drawn on top, outlined.

    At most ``MAX_SCATTER_POINTS`` points are drawn, evenly spaced over the rows, so the
    picture of a large class costs the same as a small one.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if points.shape[0] > MAX_SCATTER_POINTS:
        keep = np.round(np.linspace(0, points.shape[0] - 1, MAX_SCATTER_POINTS)).astype(np.int64)
        points, labels = points[keep], labels[keep]
    flagged = {int(cluster) for cluster in flagged}
    size = 10.0 if points.shape[0] < 2000 else 3.0
    figure = Figure(figsize=(4.0, 3.2))
    axes = figure.add_subplot()
    ordered = sorted(np.unique(labels).tolist(), key=lambda cluster: (cluster in flagged, cluster))
    for cluster in ordered:
        chosen = points[labels == cluster]
        is_flagged = cluster in flagged
        axes.scatter(
            chosen[:, 0],
            chosen[:, 1],
            s=size * (1.8 if is_flagged else 1.0),
            color=cluster_colour(cluster),
            alpha=0.95 if is_flagged else 0.55,
            edgecolors="#000000" if is_flagged else "none",
            linewidths=0.5,
            label=f"cluster {cluster}" + (" (flagged)" if is_flagged else ""),
            rasterized=True,
        )
    if ordered:
        axes.legend(fontsize=7, markerscale=1.5, frameon=False, loc="best")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.02)
    return figure_png(figure)


def profile_channels(cluster: np.ndarray, top: int = PROFILE_CHANNELS) -> np.ndarray:
    """The ``top`` channels with the largest ``|cluster|`` (mean relevance), largest first;
    ties by channel index, non-finite values last."""
    values = np.nan_to_num(np.asarray(cluster, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    order = np.lexsort((np.arange(values.size), -np.abs(values)))
    return order[: max(int(top), 0)]


@dataclass(frozen=True)
class ProfileBar:
    """One channel of a concept profile: its mean relevance in the cluster and in the rest of
    its class, and the bar lengths (shares of the largest |value| shown, in [0, 1])."""

    channel: int
    cluster: float
    rest: float | None
    cluster_bar: float
    rest_bar: float | None


def concept_profile_bars(cluster: np.ndarray, rest: np.ndarray | None, top: int = PROFILE_CHANNELS) -> list[ProfileBar]:
    """The bar chart of a concept-space cluster as rows for the page's CSS bars: the ``top``
    channels with the largest ``|mean relevance|`` (:func:`profile_channels`), largest first,
    beside the rest of the class when given.

    Drawn by the browser rather than by matplotlib: a report holds one per concept-space
    cluster, and 17 matplotlib charts took 8.7 s of the demo's report stage.
    """
    values = np.nan_to_num(np.asarray(cluster, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    channels = profile_channels(values, top)
    others = None if rest is None else np.nan_to_num(np.asarray(rest, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    shown = [np.abs(values[channels])] + ([] if others is None else [np.abs(others[channels])])
    scale = float(max((part.max() for part in shown if part.size), default=0.0)) or 1.0
    return [
        ProfileBar(
            channel=int(c),
            cluster=float(values[c]),
            rest=None if others is None else float(others[c]),
            cluster_bar=abs(float(values[c])) / scale,
            rest_bar=None if others is None else abs(float(others[c])) / scale,
        )
        for c in channels
    ]


def display_png(pixels: np.ndarray, max_side: int = EXAMPLE_SIDE) -> bytes:
    """A uint8 (H, W, C) display image (C is 1, 3 or 4; or (H, W) grey) as a small PNG."""
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = array[:, :, None]
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    channels = np.transpose(array.astype(np.float64) / scale, (2, 0, 1))
    return image_png(channels[:3] if channels.shape[0] >= 3 else channels[:1], max_side)


def heatmap_rgba(heatmap: np.ndarray) -> np.ndarray:
    """Colour a signed heatmap with ``bwr``: white at 0, full colour at the map's max ``|R|``."""
    relevance = _normalised(heatmap)
    return _HEATMAP_COLOURS(0.5 + 0.5 * relevance)


def heatmap_png(heatmap: np.ndarray, max_side: int = HEATMAP_SIDE) -> bytes:
    """A heatmap as a small PNG (shrunk by area averaging, then coloured)."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    return rgba_png(heatmap_rgba(shrink(values, max_side)))


def image_png(image: np.ndarray, max_side: int = THUMB_SIDE) -> bytes:
    """A (C, H, W) image in [0, 1] as a small PNG thumbnail (colour kept)."""
    pixels = _thumbnail_pixels(image, max_side)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return rgba_png(pixels[:, :, :3])


def overlay_png(image: np.ndarray, heatmap: np.ndarray, max_side: int = THUMB_SIDE) -> bytes:
    """The image in grey with the heatmap on top, opacity growing with ``|R|``.

    Both are shrunk first; a heatmap of another resolution (pooled) is then stretched to
    the thumbnail's size by nearest neighbour, so its blocks stay visible.
    """
    grey = _grey(_thumbnail_pixels(image, max_side))
    relevance = shrink(np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0), max_side)
    relevance = _stretch(relevance, grey.shape)
    colour = heatmap_rgba(relevance)[:, :, :3]
    alpha = 0.85 * np.sqrt(np.abs(_normalised(relevance)))[:, :, None]
    base = (0.15 + 0.7 * grey)[:, :, None]
    return rgba_png(base * (1.0 - alpha) + colour * alpha)


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an (H, W) or (H, W, C) array by an integer factor so no side exceeds ``max_side``.

    Each output pixel is the mean of a factor x factor block; trailing rows and columns
    that do not fill a block are dropped.
    """
    height, width = array.shape[:2]
    factor = int(np.ceil(max(height, width) / max(int(max_side), 1)))
    if factor <= 1:
        return array
    rows, cols = height // factor, width // factor
    if rows == 0 or cols == 0:
        return array
    cropped = array[: rows * factor, : cols * factor]
    blocks = cropped.reshape(rows, factor, cols, factor, *array.shape[2:])
    return blocks.mean(axis=(1, 3))


def _normalised(heatmap: np.ndarray) -> np.ndarray:
    """Scale a heatmap into [-1, 1] by its largest ``|R|`` (all-zero maps stay zero)."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    return values / peak if peak > 0 else values


def _thumbnail_pixels(image: np.ndarray, max_side: int) -> np.ndarray:
    """(C, H, W) or (H, W) image -> shrunk (h, w, C) floats in [0, 1].

    Shrinking comes first (on a transposed view), so the clean-up touches only the
    thumbnail's pixels.
    """
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[None]
    small = shrink(np.transpose(pixels, (1, 2, 0)), max_side).astype(np.float64)
    return np.clip(np.nan_to_num(small, nan=0.0), 0.0, 1.0)


def _grey(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W) luminance (Rec. 601 weights for RGB)."""
    if pixels.shape[2] >= 3:
        return pixels[:, :, :3] @ np.array([0.299, 0.587, 0.114])
    return pixels.mean(axis=2)


def _stretch(heatmap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) heatmap to ``shape[:2]``."""
    height, width = shape[:2]
    if heatmap.shape == (height, width):
        return heatmap
    rows = np.arange(height) * heatmap.shape[0] // height
    cols = np.arange(width) * heatmap.shape[1] // width
    return heatmap[np.ix_(rows, cols)]
