"""Image folders with one sub-folder per class (``data.source = "folder"``).

Images are decoded with Pillow on every read, converted to RGB, resized and centre-cropped
as the job says (:class:`ImagePreprocessing`), and given as display images in [0, 1].
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spray.data.base import DataSourceError, SourceRecipe, source_identity

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize (then centre-crop) applied to every image; sizes as (height, width), empty = keep."""

    resize: tuple[int, ...] = ()
    crop: tuple[int, ...] = ()


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
