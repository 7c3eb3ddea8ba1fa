"""Datasets held in memory: numpy arrays handed over in Python, or a NumPy ``.npz`` file (``data.source = "npz"``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spray.data.base import DataSourceError, SourceRecipe, checked_class_names, file_hash, file_recipe, to_display


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


class ArrayFileSource:
    """Images held in memory from an ``.npz`` file (``data`` or ``images``; ``label`` or ``labels``)."""

    def __init__(self, path: Path, class_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        try:
            archive = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataSourceError(f"{self.path}: cannot read as .npz ({error}); save it with numpy.savez.") from error
        with archive:
            keys = set(archive.files)
            image_key = next((k for k in ("data", "images", "x") if k in keys), None)
            label_key = next((k for k in ("label", "labels", "y") if k in keys), None)
            if image_key is None or label_key is None:
                raise DataSourceError(f"{self.path}: needs arrays 'data' (images) and 'label'; found {sorted(keys)}.")
            self.images = to_display(archive[image_key], self.path)
            self.labels = np.asarray(archive[label_key], dtype=np.int64)
            ids = archive["sample_id"] if "sample_id" in keys else None
        if len(self.labels) != len(self.images):
            raise DataSourceError(f"{self.path}: {len(self.images)} images but {len(self.labels)} labels.")
        self.sample_ids = [str(s) for s in ids] if ids is not None else [str(i) for i in range(len(self.labels))]
        self.class_names = checked_class_names(self.labels, class_names, self.path)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(rows)]

    def recipe(self) -> SourceRecipe:
        """Load the same ``.npz`` file again (absolute path) with the same class names."""
        return file_recipe(self)

    def fingerprint(self) -> str:
        return file_hash(self.path)
