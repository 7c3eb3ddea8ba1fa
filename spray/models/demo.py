"""The demo classifier: a small CNN trained on the demo dataset, cached on disk.

Named layers (``features.conv1`` ... ``features.conv4``) let job specs pick concept
layers by name. Training is deterministic for a given seed and cached by a key derived
from the dataset and training parameters, so the second audit run skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class DemoNet(nn.Module):
    """Conv-BN-ReLU blocks with max pooling and a linear head (32×32 RGB input)."""

    def __init__(self, n_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, w, 3, padding=1)),
                    ("bn1", nn.BatchNorm2d(w)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(w, 2 * w, 3, padding=1)),
                    ("bn2", nn.BatchNorm2d(2 * w)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(2 * w, 2 * w, 3, padding=1)),
                    ("bn3", nn.BatchNorm2d(2 * w)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                    ("conv4", nn.Conv2d(2 * w, 4 * w, 3, padding=1)),
                    ("relu4", nn.ReLU()),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(4 * w * 4 * 4, 64)),
                    ("relu5", nn.ReLU()),
                    ("fc2", nn.Linear(64, n_classes)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


DEMO_CONCEPT_LAYERS: tuple[str, ...] = ("features.conv3", "features.conv4")
#: Where a correction removes the demo's tag best, and so what ``[correct] layer = "auto"`` means
#: for this net: the activations after its third convolution.
DEMO_CAV_LAYER = "features.relu3"


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters of the demo model (part of the cache key)."""

    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def _cache_key(images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    digest.update(json.dumps({"n_classes": n_classes, **asdict(config), "arch": "DemoNet-v1"}).encode())
    return digest.hexdigest()[:16]


def evaluate_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no grad) on numpy images and labels."""
    return float((predict(model, images, batch_size).argmax(1) == labels).mean())


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, n_classes) of ``model`` in eval mode for numpy images (N, C, H, W)."""
    model.eval()
    outputs = [model(torch.from_numpy(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs)


def softmax_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, n_classes) of :func:`predict`'s logits."""
    return torch.softmax(torch.from_numpy(np.asarray(logits)), 1).numpy()


def train_demo_model(
    images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig
) -> DemoNet:
    """Train a ``DemoNet`` with Adam and light augmentation-free minibatches, deterministically."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = DemoNet(n_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(x_all[index]), y_all[index])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        scheduler.step()
        log.info("demo model epoch %d/%d: loss %.4f", epoch + 1, config.epochs, total / len(order))
    model.eval()
    return model


def load_or_train_demo_model(
    images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig, cache_dir: Path
) -> tuple[DemoNet, Path, bool]:
    """Return (model, weights path, trained_now): the cached model if one matches, else train and cache.

    Weights are stored as a plain state dict and loaded with ``weights_only=True``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"demo_model_{_cache_key(images, labels, n_classes, config)}.pt"
    model = DemoNet(n_classes)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        return model, path, False
    model = train_demo_model(images, labels, n_classes, config)
    partial = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    return model, path, True
