"""Image folders with one sub-folder per class (``data.source = "folder"``).

Images are decoded with Pillow on every read, converted to RGB, resized and centre-cropped
as the job says (:class:`ImagePreprocessing`), and given as display images in [0, 1]. An
image whose header declares more than ``[data] max_image_pixels`` pixels is refused before
it is decoded (:func:`open_image`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spray.data.base import DataSourceError, ImageTooLargeError, SourceRecipe, hash_file_into, source_identity
from spray.data.config import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize (then centre-crop) applied to every image; sizes as (height, width), empty = keep."""

    resize: tuple[int, ...] = ()
    crop: tuple[int, ...] = ()


def _refuse_decompression_bombs() -> None:
    """Make Pillow's ``DecompressionBombWarning`` an error in this process (added when missing).

    Pillow only warns for an image between ``MAX_IMAGE_PIXELS`` and twice that and decodes
    it anyway; spray refuses it. A process-wide filter rather than ``catch_warnings``, which
    is not thread-safe, and images are decoded in background threads.
    """
    from PIL import Image

    bomb = Image.DecompressionBombWarning
    if not any(action == "error" and category is bomb for action, _, category, *_ in warnings.filters):
        warnings.filterwarnings("error", category=bomb)


def open_image(path: Path, max_pixels: int) -> PILImage.Image:
    """Open an image file lazily (its header only), refusing one of more than ``max_pixels`` pixels.

    The declared size (read from the header, before any decoding) is checked here, so the
    limit holds whatever Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is. That global is
    never lowered (a lowered limit would break every later Pillow user in the process, the
    report's own PNG checks included); it is raised to ``max_pixels`` when a job allows
    larger images than Pillow's default, whose warning is made an error. Raises
    :class:`ImageTooLargeError` naming the file and ``[data] max_image_pixels``.
    """
    from PIL import Image

    _refuse_decompression_bombs()
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        declared = re.search(r"\((\d+) pixels\)", str(error))  # Pillow's message: "Image size (N pixels) exceeds ..."
        raise _too_large(path, max_pixels, f"{int(declared.group(1)):,} pixels" if declared else str(error)) from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_large(path, max_pixels, f"{width}×{height} = {width * height:,} pixels")
    return image


def _too_large(path: Path, max_pixels: int, size: str) -> ImageTooLargeError:
    """The error for an image above the limit (``size`` says how large it declares itself)."""
    return ImageTooLargeError(
        f"{path}: the image declares more pixels than [data] max_image_pixels = {max_pixels:,} allows ({size}); "
        "decoding it could exhaust memory (a decompression bomb). If it is a real image, raise max_image_pixels "
        "in the job spec; otherwise remove the file."
    )


class FolderSource:
    """An image folder with one sub-folder per class; sample ids are paths relative to the root.

    Unreadable or corrupt image files are skipped and listed in ``skipped`` (or raise when
    ``strict``), so one broken file does not stop an audit of a million. An image above
    ``max_pixels`` (``[data] max_image_pixels``) is not skipped but refused, strict or not:
    it is readable, and the fix is a setting.
    """

    def __init__(
        self,
        root: Path,
        preprocessing: ImagePreprocessing = ImagePreprocessing(),
        strict: bool = False,
        class_names: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
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
                    with open_image(path, max_pixels) as image:
                        image.verify()
                except ImageTooLargeError:
                    raise
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

        with open_image(path, self.max_pixels) as image:
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
        """Scan the same folder again (absolute path) with the same preprocessing, strictness, class names and pixel limit."""
        args = (self.root.resolve(), self.preprocessing, self.strict, tuple(self.class_names), self.max_pixels)
        return SourceRecipe(type(self), args, source_identity(self))

    def fingerprint(self) -> str:
        """Hash of every image file's bytes, with the sample ids, labels, class names, the resize
        and crop, and Pillow's version: everything the decoded pixels depend on.

        The files' bytes rather than the decoded pixels: decoding is most of what reading a
        folder costs, and the fingerprint is taken on every run, also the ones that reuse every
        stage; the bytes, the decoder and the preprocessing determine the pixels.
        """
        import PIL

        digest = hashlib.sha256(source_identity(self).encode())
        digest.update(json.dumps({"preprocessing": asdict(self.preprocessing), "pillow": PIL.__version__}).encode())
        for path in self.files:
            hash_file_into(digest, path)
        return digest.hexdigest()[:16]
