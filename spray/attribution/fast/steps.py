"""Steps of a compiled model, one per traced node.

``forward`` computes the node's value; ``relevance`` maps the relevance at the node's output
to its tensor inputs (``None`` where an input gets none), with the rules of
``spray.attribution.fast_rules``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spray.attribution import fast_rules as fr


@dataclass(frozen=True)
class Ref:
    """A reference to the value of node ``index`` inside a step's argument template."""

    index: int


def _resolve(template: object, values: list) -> object:
    if isinstance(template, Ref):
        return values[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(_resolve(t, values) for t in template)
    if isinstance(template, dict):
        return {k: _resolve(v, values) for k, v in template.items()}
    return template


@dataclass(eq=False)
class Step:
    """Base step: ``inputs`` are the node indices of the tensor inputs."""

    inputs: tuple[int, ...]
    saves_inputs: bool = field(default=False, init=False)
    saves_output: bool = field(default=False, init=False)
    aliases_input: bool = field(default=False, init=False)

    def forward(self, values: list, state: dict) -> object:
        raise NotImplementedError

    def relevance(self, r: torch.Tensor, xs: list, out: torch.Tensor | None, state: dict) -> list:
        raise NotImplementedError

    def output_nonneg(self, nonneg: list[bool]) -> bool:
        return False


@dataclass(eq=False)
class LinearStep(Step):
    """A convolution or fully connected layer with its LRP rule."""

    name: str = ""
    rule: fr.Rule = field(default_factory=fr.Pass)
    lmap: fr.LinearMap = field(default_factory=fr.LinearMap)
    params: fr.LinearParams | None = None
    forward_weight: torch.Tensor | None = None
    forward_bias: torch.Tensor | None = None
    nonneg_input: bool = False
    flat_cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.saves_inputs = not isinstance(self.rule, fr.Flat)
        self.saves_output = isinstance(self.rule, (fr.Epsilon, fr.Gamma, fr.ZBox))

    def forward(self, values, state):
        x = values[self.inputs[0]]
        state["in_shape"] = tuple(x.shape)
        return self.lmap.apply(x, self.forward_weight, self.forward_bias)

    def relevance(self, r, xs, out, state):
        return [
            fr.linear_relevance(
                self.rule, self.lmap, self.params, xs[0], out, r, state["in_shape"], self.nonneg_input, self.flat_cache
            )
        ]


@dataclass(eq=False)
class AffineStep(Step):
    """An eval-mode BatchNorm (Pass rule): y = x·scale + shift per channel, or nothing once folded."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    folded: bool = False

    def forward(self, values, state):
        x = values[self.inputs[0]]
        if self.folded:
            return x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))

    def relevance(self, r, xs, out, state):
        return [r]


@dataclass(eq=False)
class ActivationStep(Step):
    """An activation module with zennit's Pass rule: relevance passes unchanged."""

    module: nn.Module | None = None
    relu: bool = False
    inplace: bool = False

    def forward(self, values, state):
        x = values[self.inputs[0]]
        if self.relu:
            return torch.relu_(x) if self.inplace else torch.relu(x)
        if getattr(self.module, "inplace", False):
            x = x.clone()
        return self.module(x)

    def relevance(self, r, xs, out, state):
        return [r]

    def output_nonneg(self, nonneg):
        return self.relu


@dataclass(eq=False)
class ReluGradStep(Step):
    """A functional relu (not hooked by zennit): the plain gradient, relevance masked by output > 0."""

    def __post_init__(self) -> None:
        self.saves_output = True

    def forward(self, values, state):
        return torch.relu(values[self.inputs[0]])

    def relevance(self, r, xs, out, state):
        return [r * (out > 0).to(r)]

    def output_nonneg(self, nonneg):
        return True


@dataclass(eq=False)
class IdentityStep(Step):
    """Dropout in eval mode, ``nn.Identity``, ``contiguous``: the value and the relevance pass."""

    def __post_init__(self) -> None:
        self.aliases_input = True

    def forward(self, values, state):
        return values[self.inputs[0]]

    def relevance(self, r, xs, out, state):
        return [r]

    def output_nonneg(self, nonneg):
        return nonneg[self.inputs[0]]


@dataclass(eq=False)
class ReshapeStep(Step):
    """flatten / view / reshape: relevance reshaped back to the input's shape."""

    fn: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def forward(self, values, state):
        state["in_shape"] = tuple(values[self.inputs[0]].shape)
        return self.fn(*_resolve(self.args, values), **_resolve(self.kwargs, values))

    def relevance(self, r, xs, out, state):
        return [r.reshape(state["in_shape"])]

    def output_nonneg(self, nonneg):
        return nonneg[self.inputs[0]]


@dataclass(eq=False)
class ValueStep(Step):
    """A non-tensor value (``x.size(0)``, ``x.shape``): computed, carries no relevance."""

    fn: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def forward(self, values, state):
        return self.fn(*_resolve(self.args, values), **_resolve(self.kwargs, values))

    def relevance(self, r, xs, out, state):
        return []


@dataclass(eq=False)
class MaxPoolStep(Step):
    """2-d max pooling (no zennit rule): relevance routed to the maxima, as the gradient does.

    The backward needs the input's shape only (the indices say where the maxima were), so the
    input is not kept: an uninitialised tensor of its shape stands in, which costs neither a
    copy nor, never being written, memory.
    """

    module: nn.MaxPool2d | None = None

    def forward(self, values, state):
        m = self.module
        x = values[self.inputs[0]]
        state["in_shape"] = tuple(x.shape)
        out, state["indices"] = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        return out

    def relevance(self, r, xs, out, state):
        m = self.module
        pair = torch.nn.modules.utils._pair
        stride = m.stride if m.stride is not None else m.kernel_size
        channels_last = r.ndim == 4 and not r.is_contiguous() and r.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        shape = torch.empty(state["in_shape"], dtype=r.dtype, device=r.device, memory_format=fmt)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            r, shape, pair(m.kernel_size), pair(stride), pair(m.padding), pair(m.dilation), m.ceil_mode, state["indices"]
        )
        return [grad]

    def output_nonneg(self, nonneg):
        return nonneg[self.inputs[0]]


@dataclass(eq=False)
class PoolStep(Step):
    """A pooling module: with a ``Norm`` rule (average pools in zennit's composites) relevance is
    x ⊙ pool^T(R / stab(pool(x))); without a rule it is the plain gradient."""

    module: nn.Module | None = None
    rule: fr.Norm | None = None
    nonneg_input: bool = False

    def __post_init__(self) -> None:
        self.saves_inputs = True
        self.saves_output = self.rule is not None

    def forward(self, values, state):
        return self.module(values[self.inputs[0]])

    def relevance(self, r, xs, out, state):
        x = xs[0]
        if self.rule is None:
            return [fr.vjp(self.module, x, r)]
        eps = self.rule.stabilizer
        g = r / (out + eps if self.nonneg_input else fr.stabilize(out, eps))
        return [x * fr.vjp(self.module, x, g)]

    def output_nonneg(self, nonneg):
        return nonneg[self.inputs[0]]


@dataclass(eq=False)
class GradStep(Step):
    """A functional pooling, mean or dropout call (never hooked by zennit): the plain gradient."""

    fn: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    position: int = 0

    def __post_init__(self) -> None:
        self.saves_inputs = True

    def forward(self, values, state):
        args, kwargs = _resolve(self.args, values), _resolve(self.kwargs, values)
        state["call"] = (args[: self.position], args[self.position + 1 :], kwargs)
        return self.fn(*args, **kwargs)

    def relevance(self, r, xs, out, state):
        before, after, kwargs = state["call"]
        return [fr.vjp(lambda x: self.fn(*before, x, *after, **kwargs), xs[0], r)]

    def output_nonneg(self, nonneg):
        return nonneg[self.inputs[0]]


@dataclass(eq=False)
class NormSumStep(Step):
    """``Sum(stack([a, b, ...]))`` from the ResNet canonizer: Norm rule, R_i = x_i ⊙ R / stab(Σ x)."""

    rule: fr.Norm = field(default_factory=fr.Norm)

    def __post_init__(self) -> None:
        self.saves_inputs = True
        self.saves_output = True
        self.nonneg_inputs = False

    def forward(self, values, state):
        xs = [values[i] for i in self.inputs]
        out = xs[0] + xs[1]
        for x in xs[2:]:
            out = out + x
        return out

    def relevance(self, r, xs, out, state):
        return fr.norm_relevance(self.rule, xs, out, r, self.nonneg_inputs)

    def output_nonneg(self, nonneg):
        return all(nonneg[i] for i in self.inputs)


@dataclass(eq=False)
class AddStep(Step):
    """``a + b`` or ``a + constant`` without a rule: the gradient gives each tensor summand all of R."""

    args: tuple = ()

    def forward(self, values, state):
        a, b = _resolve(self.args, values)
        return a + b

    def relevance(self, r, xs, out, state):
        return [r for _ in self.inputs]

    def output_nonneg(self, nonneg):
        return all(nonneg[i] for i in self.inputs) and all(
            isinstance(a, Ref) or (isinstance(a, (int, float)) and a >= 0) for a in self.args
        )


@dataclass(eq=False)
class CatStep(Step):
    """``torch.cat`` along ``dim``: relevance split back into the parts."""

    dim: int = 0

    def forward(self, values, state):
        xs = [values[i] for i in self.inputs]
        state["sizes"] = [x.shape[self.dim] for x in xs]
        return torch.cat(xs, self.dim)

    def relevance(self, r, xs, out, state):
        return list(torch.split(r, state["sizes"], dim=self.dim))

    def output_nonneg(self, nonneg):
        return all(nonneg[i] for i in self.inputs)
