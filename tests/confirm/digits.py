"""Small Clever Hans cases on scikit-learn's 8x8 digits, for the causal-test tests.

``load_digits`` ships 1,797 handwritten digits, so every case trains offline in a couple
of seconds. Heatmaps come from LRP with ``epsilon_plus`` (on 8x8 inputs the flat rule
spreads the first layer's relevance over each 3x3 receptive field and smears a 2x2 patch
into the strokes next to it); concept relevances from the first convolution's ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_spaces
from spray.analysis.result import ClassAnalysis
from spray.attribution.lrp import Explainer, make_composite
from spray.attribution.settings import AttributionSettings
from spray.confirm.config import ConfirmConfig
from spray.confirm.predictor import model_predictor
from spray.confirm.run import confirm_analyses

TARGET = 3
CONCEPT_LAYER = "1"  # the first convolution's ReLU
PATCH = (slice(0, 2), slice(0, 2))


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def deeper_model() -> nn.Module:
    """Two convolutions before the pool: the second one's 16 channels are a richer concept layer ("3")."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def train(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 15, factory=model) -> nn.Module:
    """A small CNN trained with Adam, deterministically for ``seed``, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = factory()
        optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 64):
                batch = order[start : start + 64]
                optimiser.zero_grad()
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) int64."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


def patch(images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The 2x2 top-left patch at full brightness (a copy)."""
    stamped = images.copy()
    stamped[:, 0, PATCH[0], PATCH[1]] = 1.0
    return stamped


def random_mark(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 2x2 bright mark at a random place in the outer two-pixel ring of each image."""
    stamped = images.copy()
    spots = [(r, c) for r in range(7) for c in range(7) if min(r, c) == 0 or max(r, c) == 6]
    for i, where in enumerate(rng.integers(0, len(spots), size=len(images))):
        r, c = spots[where]
        stamped[i, 0, r : r + 2, c : c + 2] = 1.0
    return stamped


def texture(images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A checkerboard at 0.8 over the dark background of each image (a copy): evidence
    spread over half the image, which no small region carries."""
    stamped = images.copy()
    rows, cols = np.indices(stamped.shape[-2:])
    checker = (rows + cols) % 2 == 0
    background = stamped[:, 0] < 0.15
    stamped[:, 0][background & checker[None]] = 0.8
    return stamped


def watermark(images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Faint diagonal stripes (+0.35 on every third diagonal) added over the whole image,
    object included, and clipped (a copy): an overlay that no region holds whole."""
    rows, cols = np.indices(images.shape[-2:])
    stripes = ((rows + cols) % 3 == 0).astype(np.float32) * 0.35
    return np.clip(images + stripes[None, None], 0.0, 1.0).astype(images.dtype)


def plant(stamp, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits with ``stamp`` on ``fraction`` of the threes: (images, labels, stamped rows)."""
    images, labels = digits()
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels == TARGET)
    stamped = np.sort(rng.choice(candidates, int(round(fraction * len(candidates))), replace=False))
    images[stamped] = stamp(images[stamped], rng)
    return images, labels, stamped


def merged(first: int, second: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits with class ``second`` merged into ``first`` (labels renumbered 0..8): a
    legitimate two-mode class. Returns (images, labels, mode) with mode 1 for the merged-in
    digit, 0 for the others."""
    images, labels = digits()
    mode = (labels == second).astype(np.int64)
    labels = np.where(labels == second, first, labels)
    labels = np.where(labels > second, labels - 1, labels)
    return images, labels, mode


def predictor(net: nn.Module):
    """The audit's own predictor (``spray.confirm.predictor``) of ``net`` on the CPU."""
    return model_predictor(net, AttributionSettings(device="cpu"), batch_size=512)


@dataclass
class Audit:
    analyses: list[ClassAnalysis]
    heatmaps: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    net: nn.Module


def audit(
    images: np.ndarray, labels: np.ndarray, seed: int, confirm: bool = True, factory=model, layer: str = CONCEPT_LAYER,
    confirm_config: ConfirmConfig | None = None, **analysis_settings,
) -> Audit:
    """Train, explain, analyse every class in the heatmap space and ``layer``'s concept space,
    and (``confirm``) test the candidates."""
    net = train(images, labels, seed, factory=factory)
    n_classes = int(labels.max()) + 1
    with Explainer(net, make_composite("epsilon_plus"), [layer]) as explainer:
        explanation = explainer.explain(torch.from_numpy(images), torch.from_numpy(labels))
    heatmaps = explanation.heatmaps.numpy()
    concepts = {layer: explanation.concepts[layer].numpy()}
    spaces = ("heatmap", f"concept:{layer}")
    analyses = analyze_spaces(
        heatmaps, labels, [str(c) for c in range(n_classes)], SprayConfig(embedding="spectral", random_state=seed, **analysis_settings),
        concepts=concepts, spaces=spaces,
    )
    if confirm:
        config = confirm_config or ConfirmConfig(random_state=seed)
        confirm_analyses(analyses, heatmaps, labels, lambda rows: images[rows], predictor(net), config)
    return Audit(analyses, heatmaps, labels, images, net)


def precision_recall(members: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits = np.isin(members, truth).sum()
    return hits / max(len(members), 1), hits / max(len(truth), 1)


def backdoor(stamp, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits with ``count`` images of other classes stamped and relabelled as the target:
    (images, labels, stamped rows)."""
    images, labels = digits()
    rng = np.random.default_rng(seed)
    stamped = np.sort(rng.choice(np.flatnonzero(labels != TARGET), count, replace=False))
    images[stamped] = stamp(images[stamped], rng)
    labels[stamped] = TARGET
    return images, labels, stamped
