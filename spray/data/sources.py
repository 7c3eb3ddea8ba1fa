"""Users' own datasets: an image folder, an HDF5 file, a NumPy ``.npz``, or a Python entry point.

Every source yields *display* images: float32 N×C×H×W in [0, 1] after the job's resize
and crop. The model's normalisation (mean, std) is applied by the attribution engine, so
heatmaps stay aligned with the pictures a reviewer sees.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spray.data.source import H5Source, SourceRecipe, file_recipe, source_identity
from spray.store.common import StoreError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataSourceError(ValueError):
    """A dataset that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize (then centre-crop) applied to every image; sizes as (height, width), empty = keep."""

    resize: tuple[int, ...] = ()
    crop: tuple[int, ...] = ()


def _to_display(images: np.ndarray, path: Path) -> np.ndarray:
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


class FolderSource:
    """An image folder with one sub-folder per class; sample ids are paths relative to the root.

    Unreadable or corrupt image files are skipped and listed in ``skipped`` (or raise when
    ``strict``), so one broken file does not stop an audit of a million.
    """

    def __init__(self, root: Path, preprocessing: ImagePreprocessing = ImagePreprocessing(), strict: bool = False, class_names: Sequence[str] | None = None) -> None:
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise DataSourceError(f"{self.root}: not a folder; data.path must name a folder with one sub-folder per class.")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataSourceError(f"{self.root}: no class sub-folders found; put each class's images in a folder of its own.")
        self.class_names = list(class_names or [p.name for p in folders])
        if len(self.class_names) != len(folders):
            raise DataSourceError(f"{self.root}: {len(folders)} class folders but {len(self.class_names)} class names given.")
        self.preprocessing = preprocessing
        self.strict = strict
        self.files: list[Path] = []
        labels: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for label, folder in enumerate(folders):
            for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
                try:
                    with Image.open(path) as image:
                        image.verify()
                except Exception as error:  # PIL raises many types for broken files
                    if strict:
                        raise DataSourceError(f"{path}: unreadable image ({error}); fix or remove it, or set data.strict = false to skip it.") from error
                    self.skipped.append((str(path.relative_to(self.root)), str(error) or type(error).__name__))
                    continue
                self.files.append(path)
                labels.append(label)
        if not self.files:
            raise DataSourceError(f"{self.root}: no readable images ({', '.join(IMAGE_SUFFIXES)}) in the class folders.")
        if self.skipped:
            log.warning("%s: skipped %d unreadable image(s), e.g. %s", self.root, len(self.skipped), self.skipped[0][0])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sample_ids = [p.relative_to(self.root).as_posix() for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            if self.preprocessing.resize:
                height, width = (list(self.preprocessing.resize) * 2)[:2]
                image = image.resize((width, height), Image.BILINEAR)
            if self.preprocessing.crop:
                height, width = (list(self.preprocessing.crop) * 2)[:2]
                left, top = (image.width - width) // 2, (image.height - height) // 2
                image = image.crop((left, top, left + width, top + height))
            return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0

    def read(self, rows: np.ndarray) -> np.ndarray:
        images = [self._load(self.files[int(r)]) for r in rows]
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            raise DataSourceError(f"{self.root}: images of different sizes {sorted(shapes)}; set data.resize (and data.crop) in the job spec.")
        return np.stack(images)

    def recipe(self) -> SourceRecipe:
        """Scan the same folder again (absolute path) with the same preprocessing, strictness and class names."""
        args = (self.root.resolve(), self.preprocessing, self.strict, tuple(self.class_names))
        return SourceRecipe(type(self), args, source_identity(self))

    def fingerprint(self) -> str:
        """Hash of every file's relative path, size and modification time (changes when any file does)."""
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


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
            self.images = _to_display(archive[image_key], self.path)
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


class DisplayH5Source(H5Source):
    """``H5Source`` that also accepts N×H×W×C and uint8 data (converted to display images)."""

    def read(self, rows: np.ndarray) -> np.ndarray:
        return _to_display(self._data[np.asarray(rows)], self.path)

    def fingerprint(self) -> str:
        return file_hash(self.path)


@dataclass
class DatasetSource:
    """Wraps a torch ``Dataset`` returned by an entry point: items are (image tensor, label)."""

    dataset: Any
    class_names: list[str]
    name: str
    labels: np.ndarray = field(init=False)
    sample_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            targets = [int(self.dataset[i][1]) for i in range(len(self.dataset))]
        self.labels = np.asarray(targets, dtype=np.int64)
        self.sample_ids = [str(i) for i in range(len(self.labels))]
        self.class_names = checked_class_names(self.labels, self.class_names or None, Path(self.name))

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return _to_display(np.stack([np.asarray(self.dataset[int(r)][0]) for r in rows]), Path(self.name))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update(self.labels.tobytes())
        digest.update(self.read(np.arange(min(len(self), 16))).tobytes())
        return digest.hexdigest()[:16]


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


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks), shortened."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_entry_point(spec: str, base_dir: Path) -> Callable[..., Any]:
    """Resolve ``package.module:function`` or ``file.py:function`` (relative to ``base_dir``)."""
    if ":" not in spec:
        raise DataSourceError(f"entry point {spec!r} must look like 'package.module:function' or 'file.py:function'.")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = (base_dir / module_name).resolve()
        if not path.is_file():
            raise DataSourceError(f"entry point file {path} not found; give its path relative to the job file.")
        module_spec = importlib.util.spec_from_file_location(f"spray_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise DataSourceError(f"entry point {spec!r}: cannot import {module_name!r} ({error}).") from error
        finally:
            sys.path.remove(str(base_dir))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataSourceError(f"entry point {spec!r}: {module_name!r} has no function {function_name!r}.")
    return function


def open_h5_source(path: Path, class_names: list[str] | None) -> DisplayH5Source:
    try:
        return DisplayH5Source(path, class_names)
    except StoreError as error:
        raise DataSourceError(str(error)) from error

