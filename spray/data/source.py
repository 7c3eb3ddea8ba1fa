"""Dataset sources as seen by the attribution stage: rows of images, labels and ids.

A source is anything with ``len()``, ``class_names``, ``sample_ids``, ``labels`` and
``read(rows)``; rows are integers in ``0..len-1``. ``H5Source`` reads the ViRelAy input
layout (``data`` N×C×H×W, ``label`` N) that spray also writes for the demo.

A file-backed source also has ``recipe()``: a small picklable ``SourceRecipe`` (its class
and constructor arguments, paths rather than pixels) with which a Dask worker opens the
same dataset itself (``[cluster] write = "workers"``). In-memory sources have none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import h5py
import numpy as np

from spray.store.common import StoreError, atomic_h5


class DataSource(Protocol):
    """What the attribution engine needs from a dataset."""

    class_names: list[str]
    sample_ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images (len(rows), C, H, W) float32 for ascending ``rows``."""
        ...


class SourceReopenError(ValueError):
    """A source's recipe did not give back the same dataset in another process."""


def source_identity(source: DataSource) -> str:
    """Hash of a source's sample ids, labels and class names: what a reopened copy must match."""
    digest = hashlib.sha256(json.dumps([list(source.sample_ids), list(source.class_names)]).encode())
    digest.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SourceRecipe:
    """How to open a file-backed source again in another process: its class and arguments.

    Small, hashable and picklable (it names files, not their contents), so it can travel to
    every Dask worker and key a per-worker cache. ``identity`` is ``source_identity`` of the
    source it describes: ``open`` checks the reopened copy against it, so a worker that sees
    other files (or none) fails with the path named instead of writing wrong rows.
    """

    factory: Callable[..., Any]
    args: tuple[Any, ...]
    identity: str

    def open(self) -> DataSource:
        """The described source, opened here; ``SourceReopenError`` when it cannot be, or differs."""
        where = self.args[0] if self.args else self.factory
        try:
            source = self.factory(*self.args)
        except (OSError, ValueError, RuntimeError) as error:
            raise SourceReopenError(
                f"{where}: cannot open the dataset on this Dask worker ({error}); with [cluster] write = 'workers' "
                "the data must be on a filesystem every worker sees, or use write = 'client'."
            ) from error
        if source_identity(source) != self.identity:
            raise SourceReopenError(
                f"{where}: a Dask worker sees other samples (ids, labels or class names) than this process; give every "
                "worker the same copy of the data, or use [cluster] write = 'client'."
            )
        return source


def file_recipe(source: Any) -> SourceRecipe:
    """The recipe of a source built as ``type(source)(path, class_names)`` from one file."""
    return SourceRecipe(type(source), (Path(source.path).resolve(), tuple(source.class_names)), source_identity(source))


@runtime_checkable
class ReopenableSource(DataSource, Protocol):
    """A source that a Dask worker can open by itself from ``recipe()``."""

    def recipe(self) -> SourceRecipe: ...


@dataclass
class ArraySource:
    """An in-memory dataset (images N×C×H×W float32)."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[rows], dtype=np.float32)


def write_input_h5(path: Path, images: np.ndarray, labels: np.ndarray, sample_ids: list[str], class_names: list[str]) -> None:
    """Write a dataset in the ViRelAy input layout (``data``, ``label``) plus ids and class names."""
    with atomic_h5(Path(path)) as handle:
        handle.create_dataset("data", data=images.astype(np.float32), chunks=(min(64, len(images)), *images.shape[1:]), compression="gzip", compression_opts=1)
        handle.create_dataset("label", data=labels.astype(np.int64))
        handle.create_dataset("sample_id", data=np.array(sample_ids, dtype=object), dtype=h5py.string_dtype())
        handle.attrs["class_names"] = json.dumps(list(class_names))


class H5Source:
    """A dataset stored in the ViRelAy input layout; images are read lazily per batch."""

    def __init__(self, path: Path, class_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise StoreError(f"{self.path}: cannot open as HDF5 ({error}); check the path or re-create the file.") from error
        for key in ("data", "label"):
            if key not in self._file:
                raise StoreError(f"{self.path}: dataset '{key}' missing; the input layout needs 'data' (N×C×H×W) and 'label' (N).")
        self._data = self._file["data"]
        self.labels = np.asarray(self._file["label"][...], dtype=np.int64)
        if len(self.labels) != self._data.shape[0]:
            raise StoreError(f"{self.path}: 'data' has {self._data.shape[0]} rows but 'label' has {len(self.labels)}.")
        if "sample_id" in self._file:
            self.sample_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in self._file["sample_id"][...]]
        else:
            self.sample_ids = [str(i) for i in range(len(self.labels))]
        stored = json.loads(self._file.attrs.get("class_names", "null"))
        from spray.data.sources import DataSourceError, checked_class_names

        try:
            self.class_names = checked_class_names(self.labels, class_names or stored, self.path)
        except DataSourceError as error:
            raise StoreError(str(error)) from error

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._data[np.asarray(rows)], dtype=np.float32)

    def recipe(self) -> SourceRecipe:
        """Reopen this file (by its absolute path) with the same class names."""
        return file_recipe(self)

    def close(self) -> None:
        self._file.close()


class SourceImages:
    """Array-like, read-only view of a source's display images, for the report.

    Supports ``len``, ``shape``, ``dtype`` and indexing by an integer, a slice or an array of
    rows; every read goes through ``source.read``.
    """

    def __init__(self, source: DataSource) -> None:
        self.source = source
        first = source.read(np.array([0]))
        self.shape = (len(source), *first.shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: object) -> np.ndarray:
        rows = np.arange(len(self.source))[index]
        if np.ndim(rows) == 0:
            return self.source.read(np.array([int(rows)]))[0]
        return self.source.read(np.asarray(rows))
