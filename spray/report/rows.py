"""Reading rows out of stage arrays and choosing which members of a cluster to show.

The report's inputs may be NumPy arrays or open ``h5py`` datasets; every read goes through
:func:`spray.store.rows.take_rows`, which reads each HDF5 chunk once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spray.store.rows import take_rows

__all__ = ["representatives", "take_rows", "texts_at"]


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
