"""The embedded Clever Hans demo dataset: coloured shapes, one class partly watermarked.

Each image is a 3×32×32 RGB picture of one shape (the class) in a random colour, size and
position on a noisy, textured background. A fraction of one class (the *artifact class*)
carries a small copyright-like tag in the bottom-right corner: a bright frame with a dark
"©"-like mark inside. A model trained on it can learn the tag as a shortcut for that class:
a Clever Hans strategy that an audit must find.

Everything is generated from a seed in a second or two, so the demo needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spray.config import Range, setting, validate
from spray.data.config import DEMO_CLASS_NAMES, artifact_class_setting, artifact_fraction_setting, n_per_class_setting

CLASS_NAMES: tuple[str, ...] = DEMO_CLASS_NAMES
IMAGE_SIZE = 32
TAG_SIZE = 7


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of the generated dataset (declared with ``[data]``'s demo keys).

    Attributes:
        n_per_class: training images per class (the test split has ``n_per_class // 4``).
        artifact_class: index of the class whose images carry the tag.
        artifact_fraction: share of that class's images that carry it (0 gives a clean set).
        seed: random seed; the same seed gives the same images bit for bit.
    """

    n_per_class: int = n_per_class_setting()
    artifact_class: int = artifact_class_setting()
    artifact_fraction: float = artifact_fraction_setting()
    seed: int = setting(0, Range(0, 2**32 - 1))
    class_names: tuple[str, ...] = setting(CLASS_NAMES)

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class DemoSplit:
    """One split of the demo: images (N, 3, 32, 32) float32 in [0, 1], labels, tag mask."""

    images: np.ndarray
    labels: np.ndarray
    stamped: np.ndarray
    sample_ids: list[str]


def _shape_mask(kind: int, size: float, cy: float, cx: float, angle: float) -> np.ndarray:
    """Boolean mask of one shape on the 32×32 grid, centred at (cy, cx)."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    ry, rx = cos * dy - sin * dx, sin * dy + cos * dx
    if kind == 0:  # disc
        return dy**2 + dx**2 <= size**2
    if kind == 1:  # square (rotated a little)
        return (np.abs(ry) <= size * 0.85) & (np.abs(rx) <= size * 0.85)
    if kind == 2:  # triangle pointing up (rotated a little)
        return (ry <= size * 0.8) & (ry >= -size) & (np.abs(rx) <= (ry + size) * 0.6)
    # cross
    arm = size * 0.35
    return ((np.abs(ry) <= arm) & (np.abs(rx) <= size)) | ((np.abs(rx) <= arm) & (np.abs(ry) <= size))


def tag_pattern() -> tuple[np.ndarray, np.ndarray]:
    """The copyright-like tag: (mask, rgb) of shape (TAG_SIZE, TAG_SIZE) and (3, TAG_SIZE, TAG_SIZE).

    A light frame with a dark ring and dot inside, so it is not a flat colour patch.
    """
    yy, xx = np.mgrid[0:TAG_SIZE, 0:TAG_SIZE]
    centre = (TAG_SIZE - 1) / 2
    radius = np.sqrt((yy - centre) ** 2 + (xx - centre) ** 2)
    dark = (np.abs(radius - 2.0) < 0.6) & ~((xx > centre + 0.5) & (np.abs(yy - centre) < 1.0))
    rgb = np.ones((3, TAG_SIZE, TAG_SIZE), dtype=np.float32) * np.array([1.0, 0.95, 0.3], dtype=np.float32)[:, None, None]
    rgb[:, dark] = 0.05
    return np.ones((TAG_SIZE, TAG_SIZE), dtype=bool), rgb


def stamp_tag(images: np.ndarray) -> np.ndarray:
    """Return a copy of ``images`` (N, 3, 32, 32) with the tag in the bottom-right corner."""
    _, rgb = tag_pattern()
    stamped = np.array(images, dtype=np.float32, copy=True)
    offset = IMAGE_SIZE - TAG_SIZE - 1
    stamped[:, :, offset : offset + TAG_SIZE, offset : offset + TAG_SIZE] = rgb
    return stamped


def tag_region() -> tuple[slice, slice]:
    """Rows and columns of the tag in a 32×32 image (for ground-truth relevance masks)."""
    offset = IMAGE_SIZE - TAG_SIZE - 1
    return slice(offset, offset + TAG_SIZE), slice(offset, offset + TAG_SIZE)


def _render(rng: np.random.Generator, label: int) -> np.ndarray:
    """One image of class ``label``: textured background, one shape, pixel noise."""
    background = rng.uniform(0.2, 0.6, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    freq, phase = rng.uniform(0.2, 0.6), rng.uniform(0, 2 * np.pi)
    texture = 0.08 * np.sin(freq * (xx + yy * rng.uniform(-1, 1)) + phase)
    image = background[:, None, None] + texture[None]
    size = rng.uniform(6.0, 9.0)
    cy, cx = rng.uniform(11.0, 19.0, size=2)
    mask = _shape_mask(label, size, cy, cx, rng.uniform(-0.35, 0.35))
    # The shape stands out from the background by at least 0.3 in mean brightness, so the
    # object itself is learnable and the tag is a shortcut, not the only visible cue.
    direction = 1.0 if background.mean() < 0.4 else -1.0
    colour = np.clip(background + direction * rng.uniform(0.3, 0.5) + rng.uniform(-0.25, 0.25, size=3), 0.0, 1.0).astype(np.float32)
    image[:, mask] = colour[:, None]
    image += rng.normal(0.0, 0.06, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _generate(config: DemoConfig, n_per_class: int, seed_offset: int, split: str) -> DemoSplit:
    rng = np.random.default_rng([config.seed, seed_offset])
    n_classes = len(config.class_names)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    labels = labels[rng.permutation(len(labels))]
    images = np.stack([_render(rng, int(label)) for label in labels])
    candidates = np.flatnonzero(labels == config.artifact_class)
    n_stamped = int(round(config.artifact_fraction * len(candidates)))
    chosen = np.sort(rng.choice(candidates, size=n_stamped, replace=False)) if n_stamped else np.array([], int)
    stamped = np.zeros(len(labels), dtype=bool)
    stamped[chosen] = True
    if n_stamped:
        images[chosen] = stamp_tag(images[chosen])
    ids = [f"{split}/{index:05d}_{config.class_names[label]}" for index, label in enumerate(labels)]
    return DemoSplit(images=images, labels=labels.astype(np.int64), stamped=stamped, sample_ids=ids)


def make_demo(config: DemoConfig) -> tuple[DemoSplit, DemoSplit]:
    """Generate the (train, test) splits; the tag is planted in both with the same fraction."""
    train = _generate(config, config.n_per_class, 0, "train")
    test = _generate(config, max(config.n_per_class // 4, 10), 1, "test")
    return train, test
