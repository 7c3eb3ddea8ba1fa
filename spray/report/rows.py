"""Reading rows out of stage arrays and choosing which members of a cluster to show.

The report's inputs may be NumPy arrays or open ``h5py`` datasets. ``h5py`` only accepts
strictly increasing integer index lists, so every read here sorts and de-duplicates the
requested rows, reads them and restores the caller's order afterwards. For datasets the
sorted rows are read as contiguous slices: ``h5py`` point selections are about ten times
slower than one slice read per run of neighbouring rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def take_rows(array: Any, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return ``array[rows]`` as a NumPy array, in the order of ``rows``.

    Works for NumPy arrays, ``h5py`` datasets and plain lists. Rows may be unsorted and
    may repeat; the underlying read always uses ascending unique indices.
    """
    wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
    if isinstance(array, (list, tuple)):
        return np.asarray([array[int(row)] for row in wanted])
    if wanted.size == 0:
        shape = tuple(getattr(array, "shape", (0,)))
        dtype = getattr(array, "dtype", np.float64)
        return np.empty((0, *shape[1:]), dtype=dtype)
    unique, inverse = np.unique(wanted, return_inverse=True)
    if isinstance(array, np.ndarray):
        block = array[unique]
    else:
        block = np.concatenate([np.asarray(array[start:stop]) for start, stop in _runs(unique)])
    return block[inverse.reshape(-1)]


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split ascending unique rows into ``(start, stop)`` slices of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def texts_at(values: Any, rows: Sequence[int] | np.ndarray) -> list[str]:
    """Return the strings at ``rows`` (sample ids, names), decoding ``bytes`` from HDF5."""
    return [_as_text(value) for value in take_rows(values, rows)]


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def representatives(
    member_rows: np.ndarray,
    analysis_rows: np.ndarray,
    embedding: np.ndarray | None,
    limit: int,
) -> np.ndarray:
    """Choose up to ``limit`` members of a cluster to show, deterministically.

    When a spectral embedding aligned with ``analysis_rows`` is available, the members
    closest to the cluster's centre in that embedding come first: they show the cluster's
    typical strategy. Otherwise the members are taken evenly spaced over the sorted rows.
    Ties are broken by row number so the same inputs always give the same picture.

    Args:
        member_rows: the cluster's rows (any order).
        analysis_rows: the analysed rows, ascending, aligned with ``embedding``.
        embedding: (n, d) coordinates per analysed row, or None.
        limit: the most rows to return.

    Returns:
        Row indices into the attribution file, most typical first.
    """
    members = np.unique(np.asarray(member_rows, dtype=np.int64))
    if limit <= 0:
        return members[:0]
    ranked = _centre_order(members, analysis_rows, embedding)
    if ranked is not None:
        return ranked[:limit]
    if members.size <= limit:
        return members
    picks = np.unique(np.round(np.linspace(0, members.size - 1, limit)).astype(np.int64))
    return members[picks]


def _centre_order(
    members: np.ndarray, analysis_rows: np.ndarray, embedding: np.ndarray | None
) -> np.ndarray | None:
    """Sort ``members`` by distance to their centre in ``embedding``; None if not possible."""
    analysis_rows = np.asarray(analysis_rows, dtype=np.int64)
    if embedding is None or members.size == 0:
        return None
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2 or embedding.shape[0] != analysis_rows.size or embedding.shape[1] == 0:
        return None
    positions = np.searchsorted(analysis_rows, members)
    if np.any(positions >= analysis_rows.size):
        return None
    if not np.array_equal(analysis_rows[positions], members):
        return None
    points = embedding[positions]
    if not np.all(np.isfinite(points)):
        return None
    distance = np.linalg.norm(points - points.mean(axis=0), axis=1)
    order = np.lexsort((members, distance))
    return members[order]
