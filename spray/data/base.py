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
import math
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


class ImageTooLargeError(DataSourceError):
    """An image (declared by a file's header or an array's shape) above ``[data] max_image_pixels``."""


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
    """The recipe of a source built as ``type(source)(path, class_names, max_pixels)`` from one file."""
    args = (Path(source.path).resolve(), tuple(source.class_names), source.max_pixels)
    return SourceRecipe(type(source), args, source_identity(source))


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


#: How far float images may stray outside [0, 1] (resampling overshoot) before they are refused.
DISPLAY_TOLERANCE = 0.01
#: Values examined at a time by the range check (bounds its temporary copies).
_RANGE_BLOCK_VALUES = 1 << 24


def channels_last(sample_shape: tuple[int, ...]) -> bool:
    """Whether one image of this shape (without the sample axis) is H×W×C rather than C×H×W.

    The rule of :func:`to_display`: channels first unless the first axis cannot be channels
    (not 1 or 3) and the last one can.
    """
    return len(sample_shape) == 3 and sample_shape[0] not in (1, 3) and sample_shape[-1] in (1, 3)


def image_pixels(shape: tuple[int, ...]) -> int:
    """Pixels (height × width) of one image of an N×C×H×W, N×H×W×C or N×H×W array of ``shape``."""
    sample = tuple(int(n) for n in shape[1:])
    if len(sample) == 3:
        sample = sample[:2] if channels_last(sample) else sample[1:]
    return math.prod(sample)


def check_image_pixels(shape: tuple[int, ...], path: Path, max_pixels: int) -> None:
    """Refuse an array of ``shape`` (N first) whose images exceed ``max_pixels`` before any of it is read."""
    pixels = image_pixels(shape)
    if pixels > max_pixels:
        gib = pixels * 3 * 4 / 2**30
        raise ImageTooLargeError(
            f"{path}: images of shape {tuple(shape)} hold {pixels:,} pixels each (about {gib:.1f} GiB as float32 RGB), "
            f"above [data] max_image_pixels = {max_pixels:,}; raise max_image_pixels in the job spec if the images "
            "really are this large, or store them smaller."
        )


def check_display_range(images: np.ndarray, path: Path) -> None:
    """Refuse float (or integer, not uint8) images outside [0, 1] (± ``DISPLAY_TOLERANCE``).

    Images in 0..255, or already normalised with a mean and std, would otherwise be explained
    as they are and give heatmaps of a model fed the wrong input. Non-finite values are left to
    the attribution pass, which names the sample (``spray.attribution.chunks.check_batch``).
    """
    low, high = math.inf, -math.inf
    rows = max(1, _RANGE_BLOCK_VALUES // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        block = np.asarray(images[start : start + rows])
        finite = block[np.isfinite(block)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low >= -DISPLAY_TOLERANCE and high <= 1 + DISPLAY_TOLERANCE:
        return
    if low >= -DISPLAY_TOLERANCE:
        fix = "they look like 0-255 pixel values: divide them by 255 (or store them as uint8)"
    else:
        fix = "they look normalised already: give the images in [0, 1] and the normalisation as [data] mean and std"
    raise DataSourceError(
        f"{path}: {images.dtype} images hold values from {low:.4g} to {high:.4g}, but images must lie in [0, 1] "
        f"(uint8 images are divided by 255 by spray); {fix}."
    )


def to_display(images: np.ndarray, path: Path) -> np.ndarray:
    """N×C×H×W (or N×H×W×C, or N×H×W) of uint8 or float -> float32 N×C×H×W in [0, 1].

    uint8 images are divided by 255; others must already lie in [0, 1] (:func:`check_display_range`)
    and are clipped to it, so a resampling overshoot within the tolerance is removed.
    """
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataSourceError(f"{path}: images must be N×C×H×W or N×H×W×C, got shape {array.shape}.")
    if channels_last(array.shape[1:]):
        array = array.transpose(0, 3, 1, 2)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    check_display_range(array, path)
    display = array.astype(np.float32)
    np.clip(display, 0.0, 1.0, out=display, where=np.isfinite(display))
    return display


def hash_file_into(digest: Any, path: Path) -> None:
    """Feed a file's bytes (read in 1 MiB blocks) into a hashlib ``digest``."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes, shortened."""
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()[:16]


#: Bytes of display images hashed at a time by :func:`content_fingerprint`.
_FINGERPRINT_BLOCK_BYTES = 64 << 20


def content_fingerprint(source: DataSource) -> str:
    """Hash of every sample a source gives: all display pixels (as ``read`` gives them, so after
    any conversion), the labels, sample ids and class names.

    The data's part of the attribution stage's fingerprint: changing one pixel of one sample
    (the last one included) changes it. Reads the whole dataset once, in blocks of about
    64 MiB; cheap next to explaining it.
    """
    digest = hashlib.sha256(source_identity(source).encode())
    first = source.read(np.array([0]))
    rows = max(1, _FINGERPRINT_BLOCK_BYTES // max(1, first.nbytes))
    for start in range(0, len(source), rows):
        block = np.ascontiguousarray(source.read(np.arange(start, min(start + rows, len(source)))), dtype=np.float32)
        digest.update(repr(block.shape).encode())
        digest.update(memoryview(block).cast("B"))
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
