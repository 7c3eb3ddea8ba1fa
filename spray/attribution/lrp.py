"""LRP explainers: the interface both engines share, the composites by name, and zennit's hooks.

Two engines explain a model: :class:`Explainer` here (zennit's rule hooks on the model) and
``spray.attribution.fast.FastExplainer`` (the model compiled into explicit relevance
steps). Both are :class:`LRPExplainer`\\ s, with the same heatmaps and concept relevances
(``tests/attribution/test_fast_*``): ``explain(images, targets)`` explains a batch and
``explain_conditional(...)`` gives CRP conditional heatmaps at a concept layer. Both run
the model on a device, optionally under autocast. ``spray.attribution.select.make_explainer``
builds the one a job's ``[attribution]`` settings ask for.

:data:`COMPOSITES` is the one table of composites by name: each names zennit's class and
the rule maps of the fast engine (``fast_rules``), which mirror it.

One backward pass through a zennit-modified model yields both the input heatmap and, at any
set of named layers, the relevance of every channel summed over space (the CRP concept
relevance vector). zennit's rules make the gradient at each intermediate tensor equal to its
relevance, so the concept relevance of a layer is the gradient at its output, summed over
the spatial axes.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import zennit.composites as zc
from torch import nn
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution
from zennit.types import Linear as AnyLinear

from spray.attribution import fast_rules as fr


class AttributionConfigError(ValueError):
    """A composite, canonizer or layer name that does not exist for this model."""


# ----------------------------------------------------------------------------------------------
# Composites and canonizers by name
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompositeRules:
    """One named composite: zennit's class, and the rule maps the fast engine gives the same assignment with.

    As in ``zennit.composites``, every composite gives activations and batch norms the Pass
    rule, sums and average pools the Norm rule, fully connected layers the Epsilon rule and
    convolutions ``convolution`` (a rule of the stabiliser). ``first`` replaces the rule of the
    first matching module in ``named_modules()`` order: ``"flat"`` the Flat rule on the first
    convolution or fully connected layer, ``"box"`` the ZBox rule on the first convolution
    (which needs the input range), ``""`` nothing.
    """

    zennit: type[Composite]
    convolution: Callable[[float], fr.Rule]
    first: str = ""

    @property
    def needs_range(self) -> bool:
        """Whether the composite needs the input range (``low`` and ``high``)."""
        return self.first == "box"

    def zennit_composite(self, canonizers: list[Canonizer], low: float | None, high: float | None) -> Composite:
        """A fresh instance of zennit's composite with ``canonizers``."""
        if self.needs_range:
            return self.zennit(low=float(low), high=float(high), canonizers=canonizers)
        return self.zennit(canonizers=canonizers)

    def fast_spec(
        self,
        low: float | torch.Tensor | None,
        high: float | torch.Tensor | None,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
    ) -> fr.CompositeSpec:
        """The fast engine's rule maps of this composite (zennit's default epsilon and stabiliser)."""
        layer_map = [*fr.base_map(stabilizer), (Convolution, self.convolution(stabilizer)), (nn.Linear, fr.Epsilon(epsilon))]
        if self.first == "flat":
            return fr.CompositeSpec(layer_map, ((AnyLinear, fr.Flat(stabilizer)),))
        if self.first == "box":
            return fr.CompositeSpec(layer_map, ((Convolution, fr.ZBox(low, high, stabilizer)),))
        return fr.CompositeSpec(layer_map)


#: Composite names accepted in job specs (``spray.attribution.settings.COMPOSITE_NAMES``).
COMPOSITES: dict[str, CompositeRules] = {
    "epsilon_plus_flat": CompositeRules(zc.EpsilonPlusFlat, fr.ZPlus, first="flat"),
    "epsilon_plus": CompositeRules(zc.EpsilonPlus, fr.ZPlus),
    "epsilon_gamma_box": CompositeRules(zc.EpsilonGammaBox, lambda stabilizer: fr.Gamma(0.25, stabilizer), first="box"),
    "epsilon_alpha2_beta1": CompositeRules(zc.EpsilonAlpha2Beta1, lambda stabilizer: fr.AlphaBeta(2.0, 1.0, stabilizer)),
    "epsilon_alpha2_beta1_flat": CompositeRules(
        zc.EpsilonAlpha2Beta1Flat, lambda stabilizer: fr.AlphaBeta(2.0, 1.0, stabilizer), first="flat"
    ),
}

#: Canonizer names accepted in job specs.
CANONIZERS: dict[str, Callable[[], Canonizer]] = {
    "merge_batchnorm": SequentialMergeBatchNorm,
    "resnet": ResNetCanonizer,
    "vgg": VGGCanonizer,
}


def composite_rules(name: str, low: object = None, high: object = None) -> CompositeRules:
    """The :data:`COMPOSITES` entry of ``name``, checked: the name exists, and ``low`` and ``high``
    (the input range) are given where the composite needs them."""
    if name not in COMPOSITES:
        raise AttributionConfigError(f"unknown composite {name!r}; choose one of {sorted(COMPOSITES)}.")
    rules = COMPOSITES[name]
    if rules.needs_range and (low is None or high is None):
        raise AttributionConfigError(f"composite {name!r} needs 'low' and 'high' (the input range).")
    return rules


def make_canonizers(names: Sequence[str]) -> list[Canonizer]:
    """Fresh instances of the named canonizers (:data:`CANONIZERS`)."""
    unknown = [c for c in names if c not in CANONIZERS]
    if unknown:
        raise AttributionConfigError(f"unknown canonizer(s) {unknown}; choose from {sorted(CANONIZERS)}.")
    return [CANONIZERS[c]() for c in names]


def make_composite(
    name: str, canonizers: Sequence[str] = ("merge_batchnorm",), low: float | None = None, high: float | None = None
) -> Composite:
    """Build the zennit composite ``name`` with the named canonizers.

    ``epsilon_gamma_box`` needs the input range: ``low`` and ``high``, the smallest and
    largest possible input value; the other composites ignore them.
    """
    rules = composite_rules(name, low, high)
    return rules.zennit_composite(make_canonizers(canonizers), low, high)


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names (as in ``model.named_modules()``) to modules, with a clear error listing valid names."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        valid = [n for n, m in modules.items() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
        raise AttributionConfigError(f"layer(s) {missing} not found in the model; valid layers: {valid}.")
    return {n: modules[n] for n in names}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Where the arithmetic happens
# ----------------------------------------------------------------------------------------------


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


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when its parameters are on ``device``, else a copy moved there (the original stays put)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) is; the CPU for a model without either."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return torch.device("cpu") if first is None else first.device


def _host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached, on the CPU, as ``dtype``."""
    return t.detach().to("cpu", dtype)


def check_mask_channels(layer: str, masks: torch.Tensor, output_shape: Sequence[int]) -> None:
    """Masks must weigh every channel of ``layer``'s output (shape ``output_shape``), one row per condition."""
    if masks.shape[1] != output_shape[1]:
        raise ValueError(
            f"masks have shape {tuple(masks.shape)} but layer {layer!r} has output {tuple(output_shape)}; "
            f"give one mask of {output_shape[1]} channels per row."
        )


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------

_Self = TypeVar("_Self", bound="LRPExplainer")


class _TracingGate:
    """Keeps torch.fx tracing and model runs of other threads apart.

    While torch.fx traces a model it patches ``torch.nn.Module.__call__`` for the whole
    process, so a model run in another thread during a trace goes through the tracer and
    fails (seen with Dask worker threads: one compiles the fast engine while a neighbour
    explains a chunk). A trace takes the gate alone (:meth:`tracing`); explaining shares it
    (:meth:`running`), so runs never wait for each other, only for a trace.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0
        self._tracing = False

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._tracing)
            self._running += 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    @contextmanager
    def tracing(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._tracing and self._running == 0)
            self._tracing = True
        try:
            yield
        finally:
            with self._condition:
                self._tracing = False
                self._condition.notify_all()


#: The process's gate between torch.fx traces and explaining (see :class:`_TracingGate`).
TRACING_GATE = _TracingGate()


class LRPExplainer(ABC):
    """The interface of both LRP engines: explain a batch, or its CRP conditional heatmaps, on a device.

    ``model`` runs on ``device`` (default: where its parameters are; a model elsewhere is
    copied there, the original stays put). With ``autocast`` (a dtype: float16 for
    ``precision = "amp"``) it runs under ``torch.autocast``; on CUDA without autocast, TF32
    is switched off (:func:`ieee_float32`). Inputs may be on any device; results come back
    as CPU tensors in the images' dtype, so the dataset pass does not depend on where the
    arithmetic happens. ``concept_layers`` (names of ``model.named_modules()``) are the
    layers whose concept relevances ``explain`` returns and at which ``explain_conditional``
    conditions.

    Use as a context manager around a pass: zennit's engine registers its hooks there (the
    fast engine needs nothing). The explained output is the logit of ``targets`` (one class
    per sample); the initial relevance is that logit's value, so the heatmap of a
    conservative rule sums to it.
    """

    #: ``"fast"`` or ``"zennit"``: which engine this is.
    engine: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        concept_layers: Sequence[str] = (),
        *,
        device: torch.device | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.device = _device_of(model) if device is None else torch.device(device)
        self.model = on_device(model, self.device).eval()
        self.autocast = autocast
        self.layers: tuple[str, ...] = tuple(concept_layers)
        self.layer_modules = resolve_layers(self.model, self.layers)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _arithmetic(self) -> AbstractContextManager:
        """The autocast or IEEE-float32 context the model runs in, inside the tracing gate."""
        stack = ExitStack()
        stack.enter_context(TRACING_GATE.running())
        if self.autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
        elif self.device.type == "cuda":
            stack.enter_context(ieee_float32())
        return stack

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The model's predicted classes (CPU, int64) for a batch."""
        with torch.no_grad(), self._arithmetic():
            return self.model(images.to(self.device)).argmax(1).cpu()

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """Heatmaps (B, H, W), logits (B, K) and concept relevances (B, C) per concept layer of a
        batch ``images`` (B, C, H, W), explaining the logits of ``targets`` (B,)."""
        with self._arithmetic():
            result = self._explain(images.to(self.device), targets.to(self.device))
        return Explanation(
            heatmaps=_host(result.heatmaps, images.dtype),
            logits=_host(result.logits, images.dtype),
            concepts={name: _host(value, images.dtype) for name, value in result.concepts.items()},
        )

    def explain_conditional(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        layer: str,
        masks: torch.Tensor,
        picks: torch.Tensor | None = None,
    ) -> ConditionalExplanation:
        """CRP conditional heatmaps: condition ``k`` explains ``targets[picks[k]]`` of ``images[picks[k]]``
        with the relevance at ``layer``'s output multiplied by ``masks[k]`` (one weight per channel).

        Args:
            images: (B, C, H, W) model inputs.
            targets: (B,) class whose logit is explained; its value is the initial relevance.
            layer: one of the explainer's concept layers.
            masks: (N, channels of ``layer``) weights on the layer's output channels (0/1 for
                a condition; all ones gives the ordinary heatmap).
            picks: (N,) image row of each condition; default ``0..B-1`` (N = B).

        Every rule is linear in the relevance it receives, so masks that partition the
        channels give heatmaps that sum to the full heatmap. Relevance that bypasses
        ``layer`` (a skip connection around a block's inner layer) is not masked.
        """
        self._check_concept_layer(layer)
        if picks is None:
            picks = torch.arange(len(images))
        if len(images) != len(targets) or masks.ndim != 2 or len(masks) != len(picks):
            raise ValueError(
                f"images and targets need the same length ({len(images)}, {len(targets)}), and masks must be "
                f"(conditions, channels) with one row per pick, got {tuple(masks.shape)} for {len(picks)} picks."
            )
        device = self.device
        with self._arithmetic():
            result = self._explain_conditional(
                images.to(device), targets.to(device), layer, masks.to(device), picks.to(device)
            )
        return ConditionalExplanation(
            heatmaps=_host(result.heatmaps, images.dtype),
            relevance=_host(result.relevance, images.dtype),
            logits=_host(result.logits, images.dtype),
        )

    def concept_shapes(self, images: torch.Tensor) -> dict[str, torch.Size]:
        """The output shape of every concept layer for ``images``, from one forward pass."""
        with torch.no_grad(), self._arithmetic():
            return self._concept_shapes(images.to(self.device))

    def n_channels(self, layer: str, sample: torch.Tensor) -> int:
        """Channels of concept layer ``layer``, from one forward pass of ``sample`` (1, C, H, W)."""
        self._check_concept_layer(layer)
        return int(self.concept_shapes(sample)[layer][1])

    def _check_concept_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise AttributionConfigError(f"layer {layer!r} is not a concept layer of this explainer; give it in concept_layers.")

    @abstractmethod
    def _explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """``explain`` on the device, results where the engine computed them."""

    @abstractmethod
    def _explain_conditional(
        self, images: torch.Tensor, targets: torch.Tensor, layer: str, masks: torch.Tensor, picks: torch.Tensor
    ) -> ConditionalExplanation:
        """``explain_conditional`` on the device, arguments checked, results where the engine computed them."""

    @abstractmethod
    def _concept_shapes(self, images: torch.Tensor) -> dict[str, torch.Size]:
        """``concept_shapes`` on the device, without gradients."""


# ----------------------------------------------------------------------------------------------
# The zennit engine
# ----------------------------------------------------------------------------------------------


class Explainer(LRPExplainer):
    """The zennit engine: LRP through zennit's rule hooks, concept relevances collected in the same pass.

    ``composite`` is a zennit composite (``make_composite``). On entering, the parameters are
    frozen and the composite's hooks are registered for the whole pass instead of being
    attached and removed for every batch; on leaving, both are undone.

    Conditional heatmaps: under a composite, the gradient arriving at a layer's output *is*
    that output's relevance (zennit's rule hooks store it and map it to the layer's input).
    A tensor hook on the output, registered after the composite's hooks, scales that
    gradient by the condition's channel mask before zennit's rule reads it, so the rest of
    the backward pass propagates the masked relevance only. The picked image rows are
    repeated along the batch axis: one forward and one backward row per condition.
    """

    engine = "zennit"

    def __init__(
        self,
        model: nn.Module,
        composite: Composite,
        concept_layers: Sequence[str] = (),
        *,
        device: torch.device | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, concept_layers, device=device, autocast=autocast)
        self.composite = composite
        self._outputs: dict[str, torch.Tensor] = {}
        self._condition: tuple[str, torch.Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._requires_grad: list[bool] = []

    def __enter__(self) -> Explainer:
        parameters = list(self.model.parameters())
        self._requires_grad = [p.requires_grad for p in parameters]
        for parameter in parameters:
            parameter.requires_grad_(False)
        self.composite.register(self.model)
        # Registered after the composite's hooks, so they see the tensor whose gradient is the relevance.
        for name, module in self.layer_modules.items():
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
        """The forward hook of concept layer ``name``: keeps its output (whose gradient is the
        relevance) and, in a conditional pass at this layer, masks that relevance."""

        def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                raise AttributionConfigError(
                    f"layer {name!r} returns {type(output).__name__}; a concept layer must "
                    "return one tensor (batch, channels, ...)."
                )
            if not output.requires_grad:  # a pass without gradient (e.g. a gate) is not the explained one
                return
            if self._condition is not None:
                layer, masks = self._condition
                if name != layer:
                    return
                if name in self._outputs:
                    raise AttributionConfigError(
                        f"layer {name!r} runs more than once per forward pass (a shared module); "
                        "choose a layer that runs once, e.g. a convolution or a block."
                    )
                check_mask_channels(name, masks, output.shape)
                shaped = masks.to(output.device, output.dtype).reshape(*masks.shape, *([1] * (output.ndim - 2)))
                output.register_hook(lambda grad: grad * shaped)
            output.retain_grad()
            self._outputs[name] = output

        return keep

    def _seeded_backward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Run the model on ``x`` and the backward pass from the target logits; returns the logits."""
        logits = self.model(x)
        if logits.ndim != 2:
            raise AttributionConfigError(f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}.")
        seed = torch.zeros_like(logits)
        rows = torch.arange(len(targets), device=logits.device)
        targets = targets.to(logits.device)
        seed[rows, targets] = logits[rows, targets].detach()
        if self._condition is not None and self._condition[0] not in self._outputs:
            raise AttributionConfigError(f"layer {self._condition[0]!r} was not reached in the forward pass.")
        logits.backward(seed)
        return logits

    def _explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        self._outputs.clear()
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self._seeded_backward(x, targets)
        heatmaps = x.grad.sum(dim=1)
        concepts = {}
        for name in self.layers:
            grad = self._outputs[name].grad
            concepts[name] = grad.sum(dim=tuple(range(2, grad.ndim))) if grad.ndim > 2 else grad
        self._outputs.clear()
        return Explanation(heatmaps=heatmaps.detach(), logits=logits.detach(), concepts={k: v.detach() for k, v in concepts.items()})

    def _explain_conditional(
        self, images: torch.Tensor, targets: torch.Tensor, layer: str, masks: torch.Tensor, picks: torch.Tensor
    ) -> ConditionalExplanation:
        x = images[picks].detach().clone().requires_grad_(True)
        self._outputs.clear()
        self._condition = (layer, masks.detach())
        try:
            with torch.enable_grad():
                logits = self._seeded_backward(x, targets[picks])
            output = self._outputs[layer]
        finally:
            self._condition = None
            self._outputs.clear()
        relevance = output.grad.reshape(len(x), -1).sum(dim=1)
        return ConditionalExplanation(heatmaps=x.grad.sum(dim=1).detach(), relevance=relevance.detach(), logits=logits.detach())

    def _concept_shapes(self, images: torch.Tensor) -> dict[str, torch.Size]:
        shapes: dict[str, torch.Size] = {}

        def seen(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
            def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
                shapes.setdefault(name, output.shape)  # a layer run twice: its first output

            return hook

        handles = [module.register_forward_hook(seen(name)) for name, module in self.layer_modules.items()]
        try:
            self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        return shapes
