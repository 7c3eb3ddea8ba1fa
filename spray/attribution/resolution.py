"""The resolution at which heatmaps are stored (``[attribution] heatmap_size``).

Full 224-pixel heatmaps of ImageNet's 1.28M training images take about 250 GB in float32,
while SpRAy clusters them at 16×16 and a report shows them as thumbnails. Heatmaps can
therefore be stored sum-pooled to a coarser grid. The pooling is area-weighted: every
stored cell is the relevance of its exact share of the image, pixels on a cell boundary
split between the cells by the fraction of the pixel each covers. A heatmap's total
relevance is kept exactly (up to rounding), so LRP's conservation still holds for stored
heatmaps, and for sizes that divide the image it is plain block summing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spray.analysis.preprocess import pooled_shape


class HeatmapSizeError(ValueError):
    """A ``heatmap_size`` that cannot be used (not one or two positive integers)."""


def check_heatmap_size(size: Sequence[int]) -> tuple[int, int] | None:
    """``size`` as (height, width), or None for ``[]`` (the images' resolution).

    Raises ``HeatmapSizeError`` unless it is ``[]``, ``[side]`` or ``[height, width]`` of positive integers.
    """
    size = [int(v) for v in size]
    if len(size) not in (0, 1, 2) or any(v < 1 for v in size):
        raise HeatmapSizeError(f"heatmap_size must be [], [side] or [height, width] with positive sizes, got {list(size)}.")
    if not size:
        return None
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def stored_shape(image_shape: Sequence[int], size: Sequence[int]) -> tuple[int, int]:
    """The (height, width) heatmaps of ``image_shape`` (H, W) are stored at, for ``heatmap_size`` ``size``.

    A side larger than the image's is the image's: heatmaps are never upsampled.
    """
    return pooled_shape(int(image_shape[0]), int(image_shape[1]), check_heatmap_size(size))


def area_pooling_matrix(length: int, bins: int) -> np.ndarray:
    """(bins, length) matrix whose entry (i, p) is the share of pixel p inside bin i.

    Bin i spans ``[i·length/bins, (i+1)·length/bins)`` in pixel units; every column sums to
    one, so pooling with it keeps the total.
    """
    edges = np.arange(bins + 1, dtype=np.float64) * (length / bins)
    pixels = np.arange(length, dtype=np.float64)
    overlap = np.minimum(pixels[None, :] + 1.0, edges[1:, None]) - np.maximum(pixels[None, :], edges[:-1, None])
    return np.clip(overlap, 0.0, None)


def pool_heatmaps(heatmaps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(n, H, W) heatmaps area-weighted sum-pooled to (n, *shape), float32; unchanged at their own size."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    height, width = heatmaps.shape[1:]
    if (height, width) == tuple(shape):
        return heatmaps
    rows = area_pooling_matrix(height, shape[0])
    cols = area_pooling_matrix(width, shape[1])
    pooled = np.einsum("ih,nhw,jw->nij", rows, heatmaps.astype(np.float64), cols, optimize=True)
    return pooled.astype(np.float32)
