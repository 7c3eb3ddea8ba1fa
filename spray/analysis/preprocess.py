"""Turn per-sample relevance heatmaps into the vectors that SpRAy clusters.

Four steps, in this order:

1. **Sum pooling** to a coarse grid (default 16x16). SpRAy compares *where* a model looks,
   not pixel detail; pooling removes high-frequency LRP noise and makes the vectors short
   enough for a kNN graph. Sum (not mean) pooling keeps the total relevance of a region.
2. **Sign handling**: keep signed relevance (``"signed"``, SpRAy's original choice), its
   positive part (``"positive"``: only evidence *for* the class) or its magnitude
   (``"absolute"``).
3. **Scaling**: ``"sqrt"`` (default) replaces every value ``r`` by ``sign(r) sqrt(|r|)``;
   ``"linear"`` keeps it. After L2 normalisation, square-rooted maps make Euclidean
   distances those of the Hellinger distance between relevance distributions: a share
   of relevance moved to another place counts the same whether it lands on four pixels
   (a corner patch) or is spread thinly over a hundred (a frame, a text banner). With
   linear maps the spread-out share nearly vanishes from the distance (its L2 norm
   shrinks with the square root of its area), and such artifacts go unseen.
4. **Normalisation per sample** (``"l2"``, ``"max"``, ``"sum"`` or ``"none"``), so that
   samples with strong and weak relevance are compared by the *shape* of their maps.

Two-dimensional input ``(n, d)`` (e.g. concept relevances) skips pooling and is treated as
maps of shape ``(1, d)``.

:func:`linear_maps` undoes the scaling (up to each sample's normalisation factor) for the
artifact score, which reasons about shares of relevance.

Bad input is caught here, before any graph is built: non-finite rows raise
:class:`AnalysisInputError` naming them; rows whose map carries no spatial information
(constant maps, or maps that sign handling turns to all zeros) are flagged in
``Preprocessed.constant`` so the caller can leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spray.analysis.config import DEFAULT_POOLED_SIZE, NORMALISATIONS, RELEVANCE_MODES, SCALINGS

# Input values read, pooled and converted to float64 at a time (32 MiB): bounds memory for
# large classes and large heatmaps alike.
_CHUNK_VALUES = 2**22


class AnalysisInputError(ValueError):
    """The heatmaps (or the analysis parameters) cannot be analysed as given."""


@dataclass
class Preprocessed:
    """Heatmaps made ready for SpRAy.

    Attributes:
        vectors: (n, h*w) float32 analysis vectors: pooled, sign-handled, normalised.
        pooled: (n, h, w) float32 pooled and sign-handled maps, *not* normalised; None
            when :func:`preprocess` was asked not to keep them (they double the memory,
            and the artifact score does not need them: it rescales each map itself).
        constant: (n,) bool, True where the map carries no spatial information: constant
            input, or all zeros after sign handling. Their vectors are all zeros.
        shape: (h, w) of one pooled map.
    """

    vectors: np.ndarray
    pooled: np.ndarray | None
    constant: np.ndarray
    shape: tuple[int, int] = (0, 0)

    @property
    def map_shape(self) -> tuple[int, int]:
        return int(self.shape[0]), int(self.shape[1])


def pooled_shape(height: int, width: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """Target grid for maps of ``height`` x ``width``: ``size`` per axis, never upsampled.

    ``size=None`` keeps the input resolution.
    """
    if size is None:
        return height, width
    return min(int(size[0]), height), min(int(size[1]), width)


def pooling_matrix(length: int, bins: int) -> np.ndarray:
    """(bins, length) 0/1 matrix that sums ``length`` cells into ``bins`` adaptive bins.

    Bin ``i`` covers cells ``floor(i*length/bins)`` to ``ceil((i+1)*length/bins) - 1``, the
    same bins as adaptive average pooling; when ``length`` is not a multiple of ``bins``
    neighbouring bins share a boundary cell.
    """
    starts = (np.arange(bins) * length) // bins
    stops = -((-(np.arange(1, bins + 1)) * length) // bins)  # ceil division
    cells = np.arange(length)
    return ((cells >= starts[:, None]) & (cells < stops[:, None])).astype(np.float64)


def sum_pool(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Adaptive sum pooling of (n, H, W) maps to (n, h, w), in float64."""
    maps = np.asarray(maps, dtype=np.float64)
    height, width = maps.shape[1:]
    if (height, width) == tuple(shape):
        return maps.copy()
    rows = pooling_matrix(height, shape[0])
    cols = pooling_matrix(width, shape[1])
    return np.einsum("ih,nhw,jw->nij", rows, maps, cols, optimize=True)


def apply_relevance_mode(maps: np.ndarray, mode: str) -> np.ndarray:
    """Signed relevance as is, its positive part, or its absolute value."""
    if mode == "signed":
        return maps
    if mode == "positive":
        return np.maximum(maps, 0.0)
    if mode == "absolute":
        return np.abs(maps)
    raise AnalysisInputError(f"relevance mode must be one of {RELEVANCE_MODES}, got {mode!r}.")


def apply_scaling(maps: np.ndarray, scaling: str) -> np.ndarray:
    """``sign(r) * sqrt(|r|)`` for ``"sqrt"``; the maps unchanged for ``"linear"``."""
    if scaling == "linear":
        return maps
    if scaling == "sqrt":
        return np.sign(maps) * np.sqrt(np.abs(maps))
    raise AnalysisInputError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")


class LinearMaps:
    """Lazy view of analysis vectors with the scaling undone: ``sign(v) v^2`` for ``"sqrt"``.

    Each row equals the sign-handled pooled map up to a positive factor (its
    normalisation), which is all the artifact score needs. Sliced along the first axis, a
    chunk at a time, so it never holds a second copy of the data.
    """

    def __init__(self, vectors: np.ndarray, scaling: str) -> None:
        if scaling not in SCALINGS:
            raise AnalysisInputError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")
        self.vectors = vectors
        self.scaling = scaling
        self.shape = tuple(vectors.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        block = np.asarray(self.vectors[item], dtype=np.float64)
        return block if self.scaling == "linear" else block * np.abs(block)


def linear_maps(vectors: np.ndarray, scaling: str) -> LinearMaps:
    """The analysis vectors as (scaled) linear relevance maps, see :class:`LinearMaps`."""
    return LinearMaps(vectors, scaling)


def normalise_rows(vectors: np.ndarray, method: str) -> np.ndarray:
    """Scale each row by its L2 norm, max |value|, sum of |values|, or not at all.

    Rows with a zero scale stay all zeros (no division by zero).
    """
    if method == "none":
        return vectors
    if method == "l2":
        scale = np.linalg.norm(vectors, axis=1)
    elif method == "max":
        scale = np.abs(vectors).max(axis=1)
    elif method == "sum":
        scale = np.abs(vectors).sum(axis=1)
    else:
        raise AnalysisInputError(
            f"normalisation must be one of {NORMALISATIONS}, got {method!r}."
        )
    safe = np.where(scale > 0, scale, 1.0)
    return vectors / safe[:, None]


def _describe_rows(positions: np.ndarray, rows: np.ndarray | None, limit: int = 10) -> str:
    named = positions if rows is None else np.asarray(rows)[positions]
    shown = ", ".join(str(int(r)) for r in named[:limit])
    more = f", ... ({len(named) - limit} more)" if len(named) > limit else ""
    return f"[{shown}{more}]"


def preprocess(
    heatmaps: Any,
    pooled_size: tuple[int, int] | None = DEFAULT_POOLED_SIZE,
    relevance: str = "signed",
    normalisation: str = "l2",
    rows: np.ndarray | None = None,
    keep_pooled: bool = True,
    scaling: str = "linear",
) -> Preprocessed:
    """Pool, sign-handle and normalise heatmaps into analysis vectors.

    Args:
        heatmaps: (n, H, W) signed relevance maps, or (n, d) relevance vectors; a NumPy
            array or anything sliceable along the first axis with a ``shape`` (e.g. an
            ``h5py`` dataset). Read in chunks, so it is never held in float64 at once.
        pooled_size: target grid (h, w), capped at (H, W); ``None`` keeps (H, W).
            Ignored for (n, d) input.
        relevance: ``"signed"``, ``"positive"`` or ``"absolute"``.
        normalisation: ``"l2"``, ``"max"``, ``"sum"`` or ``"none"``, per sample.
        rows: attribution-file row index per sample, used only to name bad rows in errors.
        keep_pooled: also return the pooled maps before normalisation (one more float32
            copy of the data).
        scaling: ``"linear"`` or ``"sqrt"`` (module docstring). The function's default
            is ``"linear"``; the pipeline's (``SprayConfig.scaling``) is ``"sqrt"``.

    Raises:
        AnalysisInputError: on NaN/Inf values (naming how many rows and which), an input
            of the wrong rank, or an unknown mode.
    """
    shape = tuple(heatmaps.shape)
    if len(shape) not in (2, 3):
        raise AnalysisInputError(
            f"heatmaps must have shape (n, H, W) or (n, d), got shape {shape}."
        )
    if relevance not in RELEVANCE_MODES:
        raise AnalysisInputError(
            f"relevance mode must be one of {RELEVANCE_MODES}, got {relevance!r}."
        )
    if normalisation not in NORMALISATIONS:
        raise AnalysisInputError(
            f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}."
        )
    if scaling not in SCALINGS:
        raise AnalysisInputError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")
    n = shape[0]
    if rows is not None and len(rows) != n:
        raise AnalysisInputError(f"got {n} heatmaps but {len(rows)} row indices.")
    if len(shape) == 2:
        in_shape, out_shape = (1, shape[1]), (1, shape[1])
    else:
        in_shape = (shape[1], shape[2])
        out_shape = pooled_shape(shape[1], shape[2], pooled_size)

    width = int(np.prod(out_shape))
    pooled = np.empty((n, *out_shape), dtype=np.float32) if keep_pooled else None
    vectors = np.empty((n, width), dtype=np.float32)
    finite = np.ones(n, dtype=bool)
    constant = np.zeros(n, dtype=bool)
    chunk = max(1, _CHUNK_VALUES // int(np.prod(in_shape)))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = np.asarray(heatmaps[start:stop], dtype=np.float64).reshape(-1, *in_shape)
        flat = block.reshape(len(block), -1)
        finite[start:stop] = np.isfinite(flat).all(axis=1)
        constant[start:stop] = np.ptp(np.where(np.isfinite(flat), flat, 0.0), axis=1) == 0
        handled = apply_relevance_mode(sum_pool(block, out_shape), relevance)
        if pooled is not None:
            pooled[start:stop] = handled
        handled = handled.reshape(len(handled), width)
        handled[~finite[start:stop]] = 0.0  # reported below; keeps the arithmetic quiet
        constant[start:stop] |= ~np.any(handled != 0, axis=1)
        normalised = normalise_rows(apply_scaling(handled, scaling), normalisation)
        normalised[constant[start:stop]] = 0.0
        vectors[start:stop] = normalised

    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AnalysisInputError(
            f"{len(bad)} of {n} heatmaps contain NaN or Inf values, rows "
            f"{_describe_rows(bad, rows)}; re-run the attribution for these samples or "
            "leave them out of the analysis."
        )
    return Preprocessed(vectors=vectors, pooled=pooled, constant=constant, shape=tuple(out_shape))
