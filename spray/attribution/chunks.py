"""One chunk of the attribution pass: checked, explained, and reduced to what is stored.

Shared by the pass in this process (``spray.attribution.engine``) and the Dask workers
(``spray.attribution.distributed``), so a chunk is explained the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spray.attribution.lrp import LRPExplainer
from spray.attribution.resolution import pool_heatmaps, stored_shape
from spray.attribution.settings import AttributionSettings


class BadInputError(ValueError):
    """A sample the model cannot be explained on (NaN/Inf pixels, wrong shape)."""


def check_batch(images: np.ndarray, rows: np.ndarray, sample_ids: Sequence[str], expected: tuple[int, ...]) -> None:
    """Reject a batch of another image shape than the dataset's, or with NaN/Inf pixels, naming the samples."""
    if images.shape[1:] != expected:
        raise BadInputError(
            f"sample {sample_ids[int(rows[0])]!r}: image shape {images.shape[1:]} differs from the dataset's "
            f"{expected}; resize it in the dataset's preprocessing."
        )
    bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if bad.any():
        names = [sample_ids[int(r)] for r in rows[bad]][:5]
        raise BadInputError(
            f"{int(bad.sum())} image(s) contain NaN or Inf, e.g. {names}; fix or remove them from the dataset."
        )


def explain_chunk(
    explainer: LRPExplainer, settings: AttributionSettings, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Heatmaps (pooled to ``settings.heatmap_size``), logits, explained targets and concept
    relevances of one chunk of display images, as the attribution file stores them."""
    x = settings.model_input(images)
    if settings.target == "label":
        targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    else:
        targets = explainer.predict(x)
    result = explainer.explain(x, targets)
    concepts = {name: value.numpy() for name, value in result.concepts.items()}
    heatmaps = pool_heatmaps(result.heatmaps.numpy(), stored_shape(images.shape[2:], settings.heatmap_size))
    return heatmaps, result.logits.numpy(), targets.numpy(), concepts
