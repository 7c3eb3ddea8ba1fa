"""LRP with zennit: composites by name, canonizers per architecture, and one-pass explanations.

One backward pass through a zennit-modified model yields both the input heatmap and, at any
set of named layers, the relevance of every channel summed over space (the CRP concept
relevance vector). zennit's rules make the gradient at each intermediate tensor equal to its
relevance, so the concept relevance of a layer is the gradient at its output, summed over
the spatial axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import zennit.composites as zc
from torch import nn
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

#: Composite names accepted in job specs, mapped to zennit classes.
COMPOSITES: dict[str, type[Composite]] = {
    "epsilon_plus_flat": zc.EpsilonPlusFlat,
    "epsilon_plus": zc.EpsilonPlus,
    "epsilon_gamma_box": zc.EpsilonGammaBox,
    "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
    "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat,
}

#: Canonizer names accepted in job specs.
CANONIZERS: dict[str, Callable[[], Canonizer]] = {
    "merge_batchnorm": SequentialMergeBatchNorm,
    "resnet": ResNetCanonizer,
    "vgg": VGGCanonizer,
}


class AttributionConfigError(ValueError):
    """A composite, canonizer or layer name that does not exist for this model."""


def make_composite(name: str, canonizers: Sequence[str] = ("merge_batchnorm",), **kwargs: float) -> Composite:
    """Build the zennit composite ``name`` with the named canonizers.

    ``epsilon_gamma_box`` needs the input range: pass ``low`` and ``high`` (floats, the
    smallest and largest possible input value) in ``kwargs``.
    """
    if name not in COMPOSITES:
        raise AttributionConfigError(f"unknown composite {name!r}; choose one of {sorted(COMPOSITES)}.")
    unknown = [c for c in canonizers if c not in CANONIZERS]
    if unknown:
        raise AttributionConfigError(f"unknown canonizer(s) {unknown}; choose from {sorted(CANONIZERS)}.")
    instances = [CANONIZERS[c]() for c in canonizers]
    if name == "epsilon_gamma_box":
        if "low" not in kwargs or "high" not in kwargs:
            raise AttributionConfigError("composite 'epsilon_gamma_box' needs 'low' and 'high' (the input range).")
        return zc.EpsilonGammaBox(low=float(kwargs["low"]), high=float(kwargs["high"]), canonizers=instances)
    return COMPOSITES[name](canonizers=instances)


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names (as in ``model.named_modules()``) to modules, with a clear error listing valid names."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        valid = [n for n, m in modules.items() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
        raise AttributionConfigError(f"layer(s) {missing} not found in the model; valid layers: {valid}.")
    return {n: modules[n] for n in names}


@dataclass
class Explanation:
    """One batch explained: heatmaps (B, H, W), logits (B, K), concept relevances per layer (B, C)."""

    heatmaps: torch.Tensor
    logits: torch.Tensor
    concepts: dict[str, torch.Tensor]


@dataclass
class ConditionalExplanation:
    """Conditional (CRP) heatmaps: one row per condition (a set of channels at one layer).

    Attributes:
        heatmaps: (N, H, W) input relevance of each row's condition (channels summed).
        relevance: (N,) total relevance the condition carries at the layer (the masked
            output relevance, summed); equals the sum of the row's heatmap for a
            conservative composite.
        logits: (N, K) model outputs of each row's image.
    """

    heatmaps: torch.Tensor
    relevance: torch.Tensor
    logits: torch.Tensor


class Explainer:
    """Explains batches with LRP, collecting concept relevances at named layers in the same pass.

    Use as a context manager: the composite's hooks stay registered for the whole dataset pass
    instead of being attached and removed for every batch.

    The explained output is the logit of ``targets`` (one class per sample); the initial
    relevance is that logit's value, so the heatmap of a conservative rule sums to it.
    """

    def __init__(self, model: nn.Module, composite: Composite, concept_layers: Sequence[str] = ()) -> None:
        self.model = model.eval()
        self.composite = composite
        self.layers = resolve_layers(model, concept_layers)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._requires_grad: list[bool] = []

    def __enter__(self) -> Explainer:
        parameters = list(self.model.parameters())
        self._requires_grad = [p.requires_grad for p in parameters]
        for parameter in parameters:
            parameter.requires_grad_(False)
        self.composite.register(self.model)
        # Registered after the composite's hooks, so they see the tensor whose gradient is the relevance.
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.composite.remove()
        for parameter, flag in zip(self.model.parameters(), self._requires_grad):
            parameter.requires_grad_(flag)

    def _keeper(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if not output.requires_grad:  # a pass without gradient (e.g. a gate) is not the explained one
                return
            output.retain_grad()
            self._outputs[name] = output

        return keep

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """Heatmaps, logits and concept relevances for one batch (B, C, H, W) and targets (B,)."""
        self._outputs.clear()
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            if logits.ndim != 2:
                raise AttributionConfigError(f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}.")
            seed = torch.zeros_like(logits)
            rows = torch.arange(len(targets), device=logits.device)
            targets = targets.to(logits.device)
            seed[rows, targets] = logits[rows, targets].detach()
            logits.backward(seed)
        heatmaps = x.grad.sum(dim=1)
        concepts = {}
        for name in self.layers:
            grad = self._outputs[name].grad
            concepts[name] = grad.sum(dim=tuple(range(2, grad.ndim))) if grad.ndim > 2 else grad
        self._outputs.clear()
        return Explanation(heatmaps=heatmaps.detach(), logits=logits.detach(), concepts={k: v.detach() for k, v in concepts.items()})
