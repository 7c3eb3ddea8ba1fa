"""The one way to build an LRP explainer: engine, fallback, device and precision from ``[attribution]``.

``make_explainer(model, settings)`` returns an ``LRPExplainer`` (``spray.attribution.lrp``):
the fast engine where it supports the model, zennit's hooks otherwise, on the settings'
device and in their precision. Both engines give the same heatmaps and concept relevances
(``tests/attribution/test_fast_*``), and take and return CPU tensors, so the dataset pass,
the concept atlas and the correction's measurements do not depend on where the arithmetic
happens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from spray.attribution.fast import FastExplainer, UnsupportedModel
from spray.attribution.lrp import TRACING_GATE, AttributionConfigError, Explainer, LRPExplainer, make_composite, on_device
from spray.attribution.settings import DEVICES, PRECISIONS, AttributionSettings

log = logging.getLogger(__name__)


def make_explainer(
    model: nn.Module,
    settings: AttributionSettings,
    *,
    memory_format: str = "auto",
    forward: str = "zennit",
) -> LRPExplainer:
    """The explainer of ``model`` that ``settings`` ask for (``"auto"`` choices resolved with ``settings.for_model``).

    Engine (``settings.engine``): ``"auto"`` is the fast engine, or zennit's hooks with one
    warning in the log when the model has a part the fast engine does not support (e.g. the
    gate of a ClArC model's explainable view); ``"fast"`` raises ``AttributionConfigError``
    instead of falling back; ``"zennit"`` always takes zennit's hooks. The model runs on
    ``settings.device`` (copied there when it is elsewhere; the original stays put) in
    ``settings.precision``; ``epsilon_gamma_box`` gets ``settings.input_range`` as its input
    bounds. Raises ``AttributionConfigError`` for unknown composite, canonizer or layer
    names, for ``device="cuda"`` without CUDA and for amp off CUDA.

    ``memory_format`` and ``forward`` are low-level options of the fast engine (see
    ``FastExplainer``; for benchmarks and tests).
    """
    settings = settings.for_model(model)
    device = resolve_device(settings.device)
    autocast = autocast_dtype(settings.precision, device)
    low, high = settings.input_range
    composite = make_composite(settings.composite, settings.canonizers, low=low, high=high)  # also validates the names
    placed = on_device(model, device)
    if settings.engine != "zennit":
        try:
            with TRACING_GATE.tracing():  # compiling traces the model with torch.fx
                return FastExplainer(
                    placed, settings.composite, settings.canonizers, settings.layers, low=low, high=high,
                    memory_format=memory_format, forward=forward, device=device, autocast=autocast,
                )
        except UnsupportedModel as error:
            if settings.engine == "fast":
                raise AttributionConfigError(f"the fast LRP engine cannot explain this model: {error}") from error
            log.warning(
                "fast LRP engine not used for %s: %s; falling back to zennit's hooks (same results, slower).",
                type(model).__name__, error,
            )
    return Explainer(placed, composite, settings.layers, device=device, autocast=autocast)


def resolve_device(device: str) -> torch.device:
    """The torch device of a ``DEVICES`` name: ``auto`` is CUDA when available, else the CPU.

    ``cuda`` on a machine without CUDA raises ``AttributionConfigError`` instead of silently
    running (far slower) on the CPU.
    """
    if device not in DEVICES:
        raise AttributionConfigError(f"unknown device {device!r}; choose one of {list(DEVICES)}.")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise AttributionConfigError(
            "[attribution] device = 'cuda' but CUDA is not available here (no GPU, or torch built without "
            "CUDA); use device = 'auto' (CUDA when available, else the CPU) or 'cpu'."
        )
    return torch.device("cuda" if device == "cuda" or (device == "auto" and available) else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``PRECISIONS`` name on ``device``: None for float32, float16 for amp.

    amp is refused off CUDA (``AttributionConfigError``): CPU autocast would run bfloat16,
    slower than float32 on most CPUs and far less accurate.
    """
    if precision not in PRECISIONS:
        raise AttributionConfigError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}.")
    if precision == "float32":
        return None
    if device.type != "cuda":
        raise AttributionConfigError(
            f"[attribution] precision = 'amp' (float16 autocast) needs CUDA, but the attribution runs on {device.type}; "
            "use precision = 'float32' or run on a GPU (device = 'cuda' or 'auto')."
        )
    return torch.float16
