"""Choosing the LRP engine and where it runs.

The fast engine is used where it supports the model, zennit's hooks otherwise. Both engines
give the same heatmaps and concept relevances (``tests/attribution/test_fast_*``) and share
one API: a context manager with ``explain(images, targets) -> Explanation``.

``PlacedExplainer`` runs either engine on a device (the CPU or CUDA) and, on CUDA, optionally
under float16 autocast (``precision="amp"``); it takes and returns CPU tensors, so the
dataset pass does not depend on where the arithmetic happens.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from spray.attribution.fast import FastExplainer, UnsupportedModel
from spray.attribution.lrp import AttributionConfigError, Explainer, Explanation, make_composite

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "zennit")
#: ``[attribution] device``: ``auto`` is CUDA when available, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: ``[attribution] precision``: ``float32`` (IEEE float32, also on CUDA: no TF32) or ``amp``
#: (float16 autocast, CUDA only).
PRECISIONS = ("float32", "amp")


def make_explainer(
    model: nn.Module,
    composite: str = "epsilon_plus_flat",
    canonizers: Sequence[str] = ("merge_batchnorm",),
    layers: Sequence[str] = (),
    *,
    low: float | None = None,
    high: float | None = None,
    engine: str = "auto",
    memory_format: str = "auto",
    forward: str = "zennit",
) -> FastExplainer | Explainer:
    """An explainer for ``model`` with the named composite, canonizers and concept layers.

    ``engine``: ``"auto"`` (the fast engine, or zennit's hooks with one warning in the log when
    the model has a part the fast engine does not support), ``"fast"`` (raise
    ``AttributionConfigError`` instead of falling back) or ``"zennit"``. ``low`` and ``high``
    are the input range, needed by ``epsilon_gamma_box``. ``memory_format`` and
    ``forward`` are passed to the fast engine (see ``FastExplainer``).
    """
    if engine not in ENGINES:
        raise AttributionConfigError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")
    bounds = {} if low is None and high is None else {"low": low, "high": high}
    zennit_composite = make_composite(composite, canonizers, **bounds)  # also validates the names
    if engine != "zennit":
        try:
            return FastExplainer(
                model, composite, canonizers, layers, memory_format=memory_format, forward=forward, **bounds
            )
        except UnsupportedModel as error:
            if engine == "fast":
                raise AttributionConfigError(f"the fast LRP engine cannot explain this model: {error}") from error
            log.warning(
                "fast LRP engine not used for %s: %s; falling back to zennit's hooks (same results, slower).",
                type(model).__name__, error,
            )
    return Explainer(model, zennit_composite, layers)


def engine_name(explainer: FastExplainer | Explainer | PlacedExplainer) -> str:
    """``"fast"`` or ``"zennit"``: which engine an explainer from ``make_explainer`` or ``placed_explainer`` uses."""
    if isinstance(explainer, PlacedExplainer):
        explainer = explainer.explainer
    return "fast" if isinstance(explainer, FastExplainer) else "zennit"



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


class _IEEEFloat32:
    """The process-wide "no TF32" state, shared by all threads that explain on CUDA.

    The torch flags are global, so overlapping blocks (several Dask worker threads, each
    explaining a chunk) must not restore them while another block still runs: the first
    block to enter saves and sets them, the last to leave restores them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple = ()

    @staticmethod
    def _flags() -> tuple[list, tuple]:
        """The (object, attribute) pairs to set, and the value that means IEEE float32 for each."""
        conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
        if conv is not None and hasattr(conv, "fp32_precision"):
            return [(conv, "fp32_precision"), (matmul, "fp32_precision")], ("ieee", "ieee")
        return [(torch.backends.cudnn, "allow_tf32"), (matmul, "allow_tf32")], (False, False)  # older torch

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                flags, values = self._flags()
                self._saved = tuple(getattr(owner, name) for owner, name in flags)
                for (owner, name), value in zip(flags, values):
                    setattr(owner, name, value)
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                flags, _ = self._flags()
                for (owner, name), value in zip(flags, self._saved):
                    setattr(owner, name, value)


_IEEE_FLOAT32 = _IEEEFloat32()


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 CUDA convolutions and matrix products (no TF32) inside the block.

    TF32 (cuDNN's default for convolutions on recent GPUs) keeps 10 mantissa bits, and LRP
    divides by sums that can nearly cancel, so heatmaps would drift far from float32 ones.
    The flags are process-wide: they are set while at least one such block runs, in any
    thread, and restored when the last one ends.
    """
    _IEEE_FLOAT32.enter()
    try:
        yield
    finally:
        _IEEE_FLOAT32.exit()


class PlacedExplainer:
    """An explainer (either engine) whose model runs on ``device``, optionally under autocast.

    Takes CPU (or any-device) tensors and returns an ``Explanation`` of float32 CPU tensors.
    ``dtype`` is the autocast dtype (None: none); on CUDA without autocast, TF32 is switched
    off while explaining (``ieee_float32``). Use as a context manager, like the explainer.
    """

    def __init__(self, explainer: FastExplainer | Explainer, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.explainer = explainer
        self.device = device
        self.dtype = dtype

    @property
    def model(self) -> nn.Module:
        """The explained model (on ``device``)."""
        return self.explainer.model

    def __enter__(self) -> PlacedExplainer:
        self.explainer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.explainer.__exit__(*exc)

    def _arithmetic(self) -> Any:
        """The autocast or IEEE-float32 context the model runs in."""
        if self.dtype is not None:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return ieee_float32() if self.device.type == "cuda" else nullcontext()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The model's predicted classes (CPU, int64) for a batch."""
        with torch.no_grad(), self._arithmetic():
            return self.model(images.to(self.device)).argmax(1).cpu()

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """Heatmaps (B, H, W), logits (B, K) and concept relevances, as float32 CPU tensors."""
        with self._arithmetic():
            result = self.explainer.explain(images.to(self.device), targets.to(self.device))
        return Explanation(
            heatmaps=_cpu32(result.heatmaps),
            logits=_cpu32(result.logits),
            concepts={name: _cpu32(value) for name, value in result.concepts.items()},
        )


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when its parameters are on ``device``, else a copy moved there (the original stays put)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def placed_explainer(
    model: nn.Module,
    composite: str = "epsilon_plus_flat",
    canonizers: Sequence[str] = ("merge_batchnorm",),
    layers: Sequence[str] = (),
    *,
    device: str = "cpu",
    precision: str = "float32",
    **options: Any,
) -> PlacedExplainer:
    """``make_explainer`` on the named device (``DEVICES``) and precision (``PRECISIONS``).

    The model is copied to the device when it is not there already. Raises
    ``AttributionConfigError`` for ``device="cuda"`` without CUDA and for ``amp`` off CUDA.
    ``options`` are ``make_explainer``'s keyword arguments.
    """
    target = resolve_device(device)
    dtype = autocast_dtype(precision, target)
    explainer = make_explainer(_on_device(model, target), composite, canonizers, layers, **options)
    return PlacedExplainer(explainer, target, dtype)
