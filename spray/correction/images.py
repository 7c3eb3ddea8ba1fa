"""Audited images read when a step of the correction asks for them, not all at once.

A correction needs few of the audited images: the flagged class's for the CAV, a bounded
sample of the other classes' to calibrate a detector gate, RR-ClArC's fine-tuning subset
(``[correct] rr_max_samples``) and the held-out evaluation set. :class:`RowImages` stands in
for the (N, C, H, W) array of a data source: indexing it with rows (an array, a list or a
slice) reads just those rows from the source, in ascending batches, and hands them back in
the order asked for. The correction's steps index their images with row arrays, so they
work on it unchanged, and ``spray correct`` on a large dataset holds only what it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Rows read from the source at once.
READ_BATCH = 256


class CountingReader:
    """A source's ``read`` that counts the images it has read (``spray correct`` reports it)."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]) -> None:
        self._read = read
        self.images_read = 0
        self._distinct: set[int] = set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.images_read += len(rows)
        self._distinct.update(int(row) for row in rows)
        return self._read(rows)

    @property
    def distinct_rows(self) -> np.ndarray:
        """The rows read at least once, ascending."""
        return np.array(sorted(self._distinct), dtype=np.int64)


class RememberingReader:
    """A ``read`` that keeps every image it has read and reads each row from the source once
    (for steps that ask for the same rows again and again, such as the search's candidates)."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]) -> None:
        self._read = read
        self._kept: dict[int, np.ndarray] = {}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        missing = np.array([row for row in rows if int(row) not in self._kept], dtype=np.int64)
        if missing.size:
            for row, image in zip(missing.tolist(), self._read(missing)):
                self._kept[row] = image
        return np.stack([self._kept[int(row)] for row in rows])


class RowImages:
    """Rows ``rows`` of a source's images, read by ``read`` (ascending rows in, images out)
    when indexed, then passed through ``transform`` (e.g. the model's normalisation)."""

    def __init__(
        self,
        read: Callable[[np.ndarray], np.ndarray],
        rows: np.ndarray,
        image_shape: tuple[int, ...],
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.read = read
        self.rows = np.asarray(rows, dtype=np.int64)
        self.image_shape = tuple(image_shape)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.image_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.image_shape)

    def subset(self, positions: Any) -> RowImages:
        """The images at ``positions`` of this set, still unread."""
        return RowImages(self.read, self.rows[self._positions(positions)], self.image_shape, self.transform)

    def remembering(self) -> RowImages:
        """The same images, each row read from the source once however often it is asked
        for (held in memory: for a bounded set of rows, asked for repeatedly)."""
        return RowImages(RememberingReader(self.read), self.rows, self.image_shape, self.transform)

    def mapped(self, transform: Callable[[np.ndarray], np.ndarray]) -> RowImages:
        """The same rows, passed through ``transform`` after this set's own."""
        first = self.transform
        combined = transform if first is None else (lambda images: transform(first(images)))
        return RowImages(self.read, self.rows, self.image_shape, combined)

    def _positions(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self.rows))[index]
        positions = np.asarray(index)
        if positions.dtype == bool:
            return np.flatnonzero(positions)
        return positions.astype(np.int64).reshape(-1)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        wanted = self.rows[self._positions(index)]
        if wanted.size == 0:
            images = np.zeros((0, *self.image_shape), dtype=np.float32)
        else:
            unique, inverse = np.unique(wanted, return_inverse=True)
            block = np.concatenate([self.read(unique[start : start + READ_BATCH]) for start in range(0, len(unique), READ_BATCH)])
            images = block[inverse]
        return images if self.transform is None else self.transform(images)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every image (for code that needs the whole array)."""
        images = self[:]
        return images if dtype is None else images.astype(dtype)
