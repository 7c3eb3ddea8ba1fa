"""Open the model a job's ``[model]`` section names (the demo model is trained once and cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from spray.data.open import AuditData
from spray.models.config import ModelConfig
from spray.models.demo import TrainConfig, evaluate_accuracy, load_or_train_demo_model
from spray.models.sources import entry_point_model, load_state_dict, pickled_model, torchvision_model


def held_out_accuracy(model: nn.Module, data: AuditData) -> float | None:
    """Top-1 accuracy of ``model`` on the held-out test split of the artifact planted in ``data``
    (the demo's); None for data without one, whose every sample is audited."""
    if data.planted is None:
        return None
    return evaluate_accuracy(model, data.planted.test.images, data.planted.test.labels)


def open_model(config: ModelConfig, data: AuditData, base_dir: Path, seed: int, model_cache: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode, and headline facts about it (weights file, demo test accuracy).

    Paths are relative to ``base_dir``; the demo model is trained with ``seed`` on the
    audited data and cached in ``model_cache``.
    """
    n_classes = len(data.source.class_names)
    if config.source == "demo":
        train = data.source
        images, labels = train.read(np.arange(len(train))), train.labels
        model, weights, trained = load_or_train_demo_model(
            images, labels, n_classes, TrainConfig(epochs=config.epochs, seed=seed), model_cache
        )
        return model, {"test_accuracy": held_out_accuracy(model, data), "model_weights": weights.name, "model_trained_now": trained}
    if config.source == "pickle":
        model = pickled_model((base_dir / config.weights).resolve(), config.trust_pickle)
    else:
        if config.source == "torchvision":
            model = torchvision_model(config.architecture, n_classes)
        else:
            model = entry_point_model(config.entrypoint, base_dir, n_classes)
        if config.weights:
            load_state_dict(model, (base_dir / config.weights).resolve())
    return model.eval(), {"model_weights": config.weights or "(entry point)"}
