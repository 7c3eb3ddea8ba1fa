"""Synthetic heatmaps and point clouds with a known structure, for the analysis tests.

* A *clean* class: relevance is a Gaussian blob near the centre of a 16x16 map whose
  position and width vary from sample to sample (a continuum of object positions), plus
  pixel noise.
* An *artifact* class: the same, except that a fraction of the samples put their relevance
  on a 2x2 patch in the top-left corner instead (a watermark the model learned to use).
* Gaussian blobs in 64-d with well-separated centres.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

SIDE = 16


@pytest.fixture(autouse=True)
def single_threaded_blas():
    """Run each test with one BLAS/OpenMP thread.

    The test problems are small; on a machine busy with other work, multi-threaded BLAS
    spin-waits and makes them ten times slower, while the results do not depend on it.
    """
    with threadpool_limits(limits=1):
        yield


def gaussian_blob(side: int, centre_y: float, centre_x: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[:side, :side]
    return np.exp(-((y - centre_y) ** 2 + (x - centre_x) ** 2) / (2 * radius**2))


def clean_class(
    n: int, rng: np.random.Generator, noise: float = 0.05, jitter: float = 2.5
) -> np.ndarray:
    """(n, 16, 16) maps: a central blob at a jittered position, plus pixel noise."""
    maps = np.empty((n, SIDE, SIDE))
    for i in range(n):
        cy, cx = SIDE / 2 - 0.5 + rng.uniform(-jitter, jitter, size=2)
        maps[i] = gaussian_blob(SIDE, cy, cx, rng.uniform(1.5, 2.5))
    return maps + noise * rng.standard_normal(maps.shape)


def artifact_class(
    n: int, fraction: float, rng: np.random.Generator, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Clean maps where ``fraction`` of the samples look at a 2x2 corner patch instead.

    Returns the maps and a boolean mask of the artifact samples.
    """
    maps = clean_class(n, rng, noise=noise)
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    for i in chosen:
        maps[i] = noise * rng.standard_normal((SIDE, SIDE))
        maps[i, :2, :2] += 3.0 * rng.uniform(0.8, 1.2, size=(2, 2))
    truth = np.zeros(n, dtype=bool)
    truth[chosen] = True
    return maps, truth


def gaussian_blobs(
    sizes: list[int], rng: np.random.Generator, dim: int = 64, spread: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Points around ``len(sizes)`` random centres (unit variance), and their labels."""
    points, labels = [], []
    for label, size in enumerate(sizes):
        centre = rng.standard_normal(dim) * spread / np.sqrt(2)
        points.append(centre + rng.standard_normal((size, dim)))
        labels.extend([label] * size)
    return np.vstack(points), np.asarray(labels)


@pytest.fixture(scope="session")
def make_clean() -> Callable[..., np.ndarray]:
    return clean_class


@pytest.fixture(scope="session")
def make_artifact() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return artifact_class


@pytest.fixture(scope="session")
def make_blobs() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return gaussian_blobs
