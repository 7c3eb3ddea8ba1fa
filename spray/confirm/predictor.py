"""The model as the causal test sees it: display images in, class probabilities out."""

from __future__ import annotations

import numpy as np
import torch

from spray.attribution.lrp import on_device
from spray.attribution.select import resolve_device
from spray.attribution.settings import AttributionSettings
from spray.confirm.test import Predict


def model_predictor(model: torch.nn.Module, settings: AttributionSettings, batch_size: int) -> Predict:
    """Softmax probabilities (n, classes) of ``model`` for display images (n, C, H, W) in [0, 1].

    Images go through ``settings.model_input`` (the job's normalisation), on the
    attribution's device, ``batch_size`` at a time, in eval mode without gradients.
    """
    device = resolve_device(settings.device)
    placed = on_device(model, device).eval()

    def predict(images: np.ndarray) -> np.ndarray:
        outputs = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = settings.model_input(images[start : start + batch_size]).to(device)
                outputs.append(torch.softmax(placed(x).float(), dim=1).cpu().numpy())
        width = outputs[0].shape[1] if outputs else 0
        return np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32)

    return predict
