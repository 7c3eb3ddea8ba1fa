"""HDF5 datasets in the ViRelAy input layout: ``data`` (N×C×H×W) and ``label`` (N).

spray writes this layout itself for the demo (``stages/input.h5``, :func:`write_input_h5`)
and reads users' files in it (``data.source = "h5"``, :func:`open_h5_source`), which may
also hold N×H×W×C or uint8 images. Images are read lazily, one batch at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from spray.data.base import (
    DataSourceError,
    SourceRecipe,
    check_image_pixels,
    checked_class_names,
    content_fingerprint,
    file_recipe,
    to_display,
)
from spray.data.config import DEFAULT_MAX_IMAGE_PIXELS
from spray.store.common import READ_CACHE, StoreError, atomic_h5
from spray.store.rows import take_rows


def write_input_h5(path: Path, images: np.ndarray, labels: np.ndarray, sample_ids: list[str], class_names: list[str]) -> None:
    """Write a dataset in the ViRelAy input layout (``data``, ``label``) plus ids and class names."""
    with atomic_h5(Path(path)) as handle:
        handle.create_dataset("data", data=images.astype(np.float32), chunks=(min(64, len(images)), *images.shape[1:]), compression="gzip", compression_opts=1)
        handle.create_dataset("label", data=labels.astype(np.int64))
        handle.create_dataset("sample_id", data=np.array(sample_ids, dtype=object), dtype=h5py.string_dtype())
        handle.attrs["class_names"] = json.dumps(list(class_names))


class H5Source:
    """A dataset stored in the ViRelAy input layout (float32 display images); read lazily per batch.

    ``max_pixels`` (``[data] max_image_pixels``) bounds the images that ``data``'s declared
    shape may hold: a larger one is refused when the file is opened, before any batch is read.
    """

    def __init__(self, path: Path, class_names: Sequence[str] | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        try:
            self._file = h5py.File(self.path, "r", **READ_CACHE)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot open as HDF5 ({error}); check the path or re-create the file.") from error
        for key in ("data", "label"):
            if key not in self._file:
                raise StoreError(f"{self.path}: dataset '{key}' missing; the input layout needs 'data' (N×C×H×W) and 'label' (N).")
        self._data = self._file["data"]
        try:
            check_image_pixels(self._data.shape, self.path, max_pixels)
        except DataSourceError:
            self._file.close()
            raise
        self.labels = np.asarray(self._file["label"][...], dtype=np.int64)
        if len(self.labels) != self._data.shape[0]:
            raise StoreError(f"{self.path}: 'data' has {self._data.shape[0]} rows but 'label' has {len(self.labels)}.")
        if "sample_id" in self._file:
            self.sample_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in self._file["sample_id"][...]]
        else:
            self.sample_ids = [str(i) for i in range(len(self.labels))]
        stored = json.loads(self._file.attrs.get("class_names", "null"))
        try:
            self.class_names = checked_class_names(self.labels, class_names or stored, self.path)
        except DataSourceError as error:
            raise StoreError(str(error)) from error

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(take_rows(self._data, rows), dtype=np.float32)

    def recipe(self) -> SourceRecipe:
        """Reopen this file (by its absolute path) with the same class names and pixel limit."""
        return file_recipe(self)

    def fingerprint(self) -> str:
        """Hash of every sample's pixels and label (:func:`spray.data.base.content_fingerprint`).

        The pixels as read, not the file's bytes: an HDF5 dataset may be stored in another
        file (external storage, virtual datasets) whose changes would not show in this one's.
        """
        return content_fingerprint(self)

    def close(self) -> None:
        self._file.close()


class DisplayH5Source(H5Source):
    """``H5Source`` that also accepts N×H×W×C and uint8 data (converted to display images)."""

    def read(self, rows: np.ndarray) -> np.ndarray:
        return to_display(take_rows(self._data, rows), self.path)


def open_h5_source(path: Path, class_names: list[str] | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DisplayH5Source:
    """A user's HDF5 file as a source; a file that cannot be read is a ``DataSourceError``."""
    try:
        return DisplayH5Source(path, class_names, max_pixels)
    except StoreError as error:
        raise DataSourceError(str(error)) from error
