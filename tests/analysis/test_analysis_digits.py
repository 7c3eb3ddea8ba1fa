"""A planted artifact in real digits is found end to end: train, explain with LRP, analyse.

scikit-learn ships 1,797 8x8 handwritten digits (``load_digits``), so this runs offline in
about two seconds. A bright 2x2 patch is stamped in the top-left corner of 30 % of the
threes; a small CNN trained on them learns to use it (stamping the patch on other digits
raises their probability of being a three). Heatmaps come from LRP with the
``epsilon_plus`` composite: on 8x8 inputs the flat rule of ``epsilon_plus_flat`` spreads
the first layer's relevance evenly over each 3x3 receptive field, which smears a 2x2
patch into the strokes next to it (the MNIST benchmark, at 28x28, uses the flat rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_dataset
from spray.attribution.lrp import Explainer, make_composite

TARGET = 3
FRACTION = 0.3
PATCH = (slice(0, 2), slice(0, 2))


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _train(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 15) -> nn.Module:
    torch.manual_seed(seed)
    model = _model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


def _planted_digits(fraction: float, seed: int):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels == TARGET)
    stamped = np.sort(rng.choice(candidates, int(fraction * len(candidates)), replace=False))
    images[stamped, 0, PATCH[0], PATCH[1]] = 1.0
    return images, labels, stamped


@pytest.fixture(scope="module")
def audited():
    """(analyses, labels, stamped rows, probability shift) of the planted digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: more threads only add overhead
    try:
        images, labels, stamped = _planted_digits(FRACTION, seed=0)
        model = _train(images, labels, seed=0)
    finally:
        torch.set_num_threads(threads)
    others = images[labels != TARGET]
    marked = others.copy()
    marked[:, 0, PATCH[0], PATCH[1]] = 1.0
    with torch.no_grad():
        before = torch.softmax(model(torch.from_numpy(others)), 1)[:, TARGET].mean().item()
        after = torch.softmax(model(torch.from_numpy(marked)), 1)[:, TARGET].mean().item()
    with Explainer(model, make_composite("epsilon_plus")) as explainer:
        heatmaps = explainer.explain(torch.from_numpy(images), torch.from_numpy(labels)).heatmaps.numpy()
    analyses = analyze_dataset(heatmaps, labels, [str(d) for d in range(10)], SprayConfig(embedding="spectral"))
    return analyses, labels, stamped, after - before


def test_the_model_uses_the_patch(audited):
    *_, shift = audited
    assert shift > 0.1  # mean probability of "3" on other digits, with minus without patch


def test_the_stamped_threes_are_the_one_flagged_cluster(audited):
    analyses, labels, stamped, _ = audited
    flagged = [(a.class_index, c) for a in analyses for c in a.clusters if c.flagged]
    assert len(flagged) == 1
    class_index, cluster = flagged[0]
    assert class_index == TARGET
    hits = np.isin(cluster.member_rows, stamped).sum()
    precision, recall = hits / cluster.size, hits / len(stamped)
    # measured: precision 1.00, recall 1.00 (54 of 54 stamped threes), score 0.80
    assert precision >= 0.95 and recall >= 0.95
    assert cluster.artifact_score >= 0.75
