"""The data stage's settings (``[data]``), declared once (:mod:`spray.config`).

Torch- and numpy-free, so a job spec validates instantly. The demo's own parameters
(:class:`spray.data.demo.DemoConfig`) use the same declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spray.config import ENTRY_POINT, Choice, ConfigError, Each, Length, Range, setting, validate

#: ``source``: generated demo, image folder, ViRelAy-layout HDF5, numpy archive, or a Python entry point.
DATA_SOURCES: tuple[str, ...] = ("demo", "folder", "h5", "npz", "entrypoint")
#: The demo's classes (index = label).
DEMO_CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
#: ``resize``/``crop``: [], [side] or [height, width] of positive sizes.
IMAGE_SIZE_CONSTRAINTS = (Length((0, 1, 2)), Each(Range(1)))
#: The sources whose images are decoded, and so can be resized and cropped on the way.
RESIZING_SOURCES: tuple[str, ...] = ("folder",)
#: ``max_image_pixels``'s default: 50 million pixels (height × width) per image, about a
#: 7000×7000 photograph, 600 MB as float32 RGB. Above it an image is refused before it is
#: decoded or read, so a 300-byte PNG declaring 12000×12000 cannot take 4.8 GB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def n_per_class_setting() -> Any:
    """The demo's training images per class (the test split has a quarter of it)."""
    return setting(600, Range(10), doc="demo: training images per class")


def artifact_class_setting() -> Any:
    """The demo class whose images carry the tag."""
    return setting(1, Range(0, len(DEMO_CLASS_NAMES) - 1), doc="demo: class whose images carry the tag")


def artifact_fraction_setting() -> Any:
    """The share of the artifact class that carries the tag (0: a clean dataset)."""
    return setting(0.3, Range(0.0, 1.0), doc="demo: share of that class carrying the tag")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the samples come from and how they are preprocessed.

    ``source``: ``demo`` (generated), ``folder`` (one sub-folder per class), ``h5`` (ViRelAy
    input layout), ``npz`` or ``entrypoint`` (``module:function`` returning a torch Dataset).
    ``mean``/``std`` normalise the model's input; images are shown and explained in [0, 1].
    """

    source: str = setting("demo", Choice(DATA_SOURCES), doc="where the samples come from")
    path: str = setting("", doc="folder, .h5 or .npz file (relative to the job file)")
    entrypoint: str = setting("", ENTRY_POINT, doc="module:function or file.py:function returning a Dataset")
    class_names: tuple[str, ...] = setting((), doc="class names by label (default: from the data)")
    resize: tuple[int, ...] = setting((), *IMAGE_SIZE_CONSTRAINTS, doc="folder: resize to [side] (shorter side) or [height, width]")
    crop: tuple[int, ...] = setting((), *IMAGE_SIZE_CONSTRAINTS, doc="folder: centre crop to [side] or [height, width]")
    mean: tuple[float, ...] = setting((), Each(Range()), doc="per-channel mean of the model's input normalisation")
    std: tuple[float, ...] = setting((), Each(Range(0.0, low_open=True)), doc="per-channel std of the model's input normalisation")
    strict: bool = setting(False, doc="folder: stop at an unreadable image instead of skipping it")
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS, Range(1), doc="largest image (height × width) decoded or read; a larger one is an error"
    )
    n_per_class: int = n_per_class_setting()
    artifact_class: int = artifact_class_setting()
    artifact_fraction: float = artifact_fraction_setting()

    def __post_init__(self) -> None:
        validate(self)
        if len(self.mean) != len(self.std):
            raise ConfigError("std", "needs as many values as mean (one per channel)")
        for key in ("resize", "crop"):
            if getattr(self, key) and self.source not in RESIZING_SOURCES:
                raise ConfigError(
                    key,
                    f"applies to source = 'folder' only, but source = {self.source!r} gives its images at their stored size "
                    "and would ignore it; remove the key (resize the images where the file or dataset is made)",
                )
        if self.source == "entrypoint" and not self.entrypoint:
            raise ConfigError("entrypoint", "must be set when source = 'entrypoint' ('package.module:function' or 'file.py:function')")
