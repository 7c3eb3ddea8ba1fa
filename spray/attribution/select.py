"""Choosing the LRP engine: the fast engine where it supports the model, zennit's hooks otherwise.

Both engines give the same heatmaps and concept relevances (``tests/attribution/test_fast_*``)
and share one API: a context manager with ``explain(images, targets) -> Explanation``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from spray.attribution.fast import FastExplainer, UnsupportedModel
from spray.attribution.lrp import AttributionConfigError, Explainer, make_composite

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "zennit")


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
    fold_batchnorm: bool = True,
) -> FastExplainer | Explainer:
    """An explainer for ``model`` with the named composite, canonizers and concept layers.

    ``engine``: ``"auto"`` (the fast engine, or zennit's hooks with one warning in the log when
    the model has a part the fast engine does not support), ``"fast"`` (raise
    ``AttributionConfigError`` instead of falling back) or ``"zennit"``. ``low`` and ``high``
    are the input range, needed by ``epsilon_gamma_box``. ``memory_format`` and
    ``fold_batchnorm`` are passed to the fast engine (see ``FastExplainer``).
    """
    if engine not in ENGINES:
        raise AttributionConfigError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")
    bounds = {} if low is None and high is None else {"low": low, "high": high}
    zennit_composite = make_composite(composite, canonizers, **bounds)  # also validates the names
    if engine != "zennit":
        try:
            return FastExplainer(
                model, composite, canonizers, layers, memory_format=memory_format, fold_batchnorm=fold_batchnorm, **bounds
            )
        except UnsupportedModel as error:
            if engine == "fast":
                raise AttributionConfigError(f"the fast LRP engine cannot explain this model: {error}") from error
            log.warning(
                "fast LRP engine not used for %s: %s; falling back to zennit's hooks (same results, slower).",
                type(model).__name__, error,
            )
    return Explainer(model, zennit_composite, layers)


def engine_name(explainer: FastExplainer | Explainer) -> str:
    """``"fast"`` or ``"zennit"``: which engine an explainer from ``make_explainer`` uses."""
    return "fast" if isinstance(explainer, FastExplainer) else "zennit"

