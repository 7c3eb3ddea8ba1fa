"""Datasets held in memory: numpy arrays handed over in Python, or a NumPy ``.npz`` file (``data.source = "npz"``)."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

#: What reading a damaged ``.npz`` raises (a truncated zip, a corrupt member, a bad header).
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


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


def declared_shape(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> tuple[int, ...]:
    """The shape of array ``key`` of an open ``.npz`` archive, read from its header alone."""
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
    except UNREADABLE as error:
        raise DataSourceError(f"{path}: array {key!r} has no readable .npy header ({error}); save the file with numpy.savez.") from error
    return tuple(shape)


class ArrayFileSource:
    """Images held in memory from an ``.npz`` file (``data`` or ``images``; ``label`` or ``labels``).

    ``max_pixels`` (``[data] max_image_pixels``) bounds the images the archive's header may
    declare: a larger one is refused before the array is loaded.
    """

    def __init__(self, path: Path, class_names: Sequence[str] | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        try:
            archive = np.load(self.path, allow_pickle=False)
        except UNREADABLE as error:
            raise DataSourceError(f"{self.path}: cannot read as .npz ({error}); save it with numpy.savez.") from error
        with archive:
            keys = set(archive.files)
            image_key = next((k for k in ("data", "images", "x") if k in keys), None)
            label_key = next((k for k in ("label", "labels", "y") if k in keys), None)
            if image_key is None or label_key is None:
                raise DataSourceError(f"{self.path}: needs arrays 'data' (images) and 'label'; found {sorted(keys)}.")
            check_image_pixels(declared_shape(archive, image_key, self.path), self.path, max_pixels)
            try:
                images, labels = archive[image_key], archive[label_key]
                ids = archive["sample_id"] if "sample_id" in keys else None
            except UNREADABLE as error:
                raise DataSourceError(f"{self.path}: cannot read its arrays ({error}); the file may be truncated, save it again with numpy.savez.") from error
        self.images = to_display(images, self.path)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise DataSourceError(f"{self.path}: {len(self.images)} images but {len(self.labels)} labels.")
        self.sample_ids = [str(s) for s in ids] if ids is not None else [str(i) for i in range(len(self.labels))]
        self.class_names = checked_class_names(self.labels, class_names, self.path)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(rows)]

    def recipe(self) -> SourceRecipe:
        """Load the same ``.npz`` file again (absolute path) with the same class names and pixel limit."""
        return file_recipe(self)

    def fingerprint(self) -> str:
        """Hash of every sample's pixels and label (:func:`spray.data.base.content_fingerprint`)."""
        return content_fingerprint(self)
