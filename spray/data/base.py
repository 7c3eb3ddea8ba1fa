"""What a dataset source is, independent of its format: the interface every format implements.

A source is anything with ``len()``, ``class_names``, ``sample_ids``, ``labels`` and
``read(rows)``; rows are integers in ``0..len-1`` and ``read`` gives *display* images:
float32 N×C×H×W in [0, 1]. The model's normalisation (mean, std) is applied by the
attribution engine, so heatmaps stay aligned with the pictures a reviewer sees.

A file-backed source also has ``recipe()``: a small picklable ``SourceRecipe`` (its class
and constructor arguments, paths rather than pixels) with which a Dask worker opens the
same dataset itself (``[cluster] write = "workers"``). In-memory sources have none.

The formats live in modules of their own, each importing only this one: ``h5`` (the
ViRelAy input layout), ``folder`` (one sub-folder per class), ``arrays`` (in memory and
``.npz``) and ``entrypoint`` (a torch ``Dataset`` from a Python function).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class DataSource(Protocol):
    """What the attribution engine needs from a dataset."""

    class_names: list[str]
    sample_ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images (len(rows), C, H, W) float32 for ascending ``rows``."""
        ...


class DataSourceError(ValueError):
    """A dataset that cannot be read; the message names the file and the fix."""


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


def checked_class_names(labels: np.ndarray, class_names: Sequence[str] | None, path: Path) -> list[str]:
    """The class names for ``labels`` (given, or '0'..'K-1'); errors for empty data and bad labels."""
    if len(labels) == 0:
        raise DataSourceError(f"{path}: the dataset holds no samples.")
    if labels.min() < 0:
        raise DataSourceError(f"{path}: labels must be class indices >= 0; found {int(labels.min())}.")
    names = list(class_names or [str(i) for i in range(int(labels.max()) + 1)])
    if labels.max() >= len(names):
        raise DataSourceError(f"{path}: label {int(labels.max())} but only {len(names)} class names; give data.class_names for every class.")
    return names


def to_display(images: np.ndarray, path: Path) -> np.ndarray:
    """N×C×H×W (or N×H×W×C, or N×H×W) of uint8 or float -> float32 N×C×H×W in [0, 1]."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataSourceError(f"{path}: images must be N×C×H×W or N×H×W×C, got shape {array.shape}.")
    if array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks), shortened."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


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
