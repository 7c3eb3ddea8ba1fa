"""Shared fixtures: a small demo set and its model, trained once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from spray.correction.cav import CAV, fit_cav
from spray.data.demo import DemoConfig, DemoSplit, make_demo
from spray.models.demo import DemoNet, TrainConfig, load_or_train_demo_model

DEMO = DemoConfig(n_per_class=300)
TRAIN = TrainConfig(epochs=4, batch_size=64)
LAYER = "features.relu3"


@dataclass
class Demo:
    train: DemoSplit
    test: DemoSplit
    model: DemoNet
    weights: Path


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The demo set (300 images per class) and a DemoNet trained on it (4 epochs, batches of 64)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = make_demo(DEMO)
    model, weights, _ = load_or_train_demo_model(train.images, train.labels, 4, TRAIN, tmp_path_factory.mktemp("model"))
    return Demo(train=train, test=test, model=model, weights=weights)


@pytest.fixture(scope="session")
def demo_cav(demo: Demo) -> CAV:
    """Pattern CAV of the tag at features.relu3 (flattened), from the truly stamped training rows."""
    return fit_cav(demo.model, demo.train.images, demo.train.labels, np.flatnonzero(demo.train.stamped), LAYER, pooling="flatten")
