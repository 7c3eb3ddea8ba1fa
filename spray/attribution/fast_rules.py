"""LRP rules as modified linear maps, evaluated directly instead of through autograd hooks.

Each rule here computes the same relevance as the zennit rule of the same name
(``zennit.rules``), written out for a layer that is a linear map ``L(x; W, b)``
(a convolution or a fully connected layer) and its adjoint ``L^T(g; W)`` (the transposed
convolution, or ``g @ W``). One relevance step costs the modified forward maps the rule
needs plus one adjoint per map, and no autograd graph.

Where a layer's input is known to be non-negative (it comes from a ReLU, possibly through
pooling or reshaping), the terms of the negative input part vanish exactly and are skipped:
z+ then costs one extra forward map and one adjoint.

The rule assignment of a composite (``rule_map`` of a ``CompositeSpec``; the named ones are
built by ``spray.attribution.lrp.COMPOSITES``) mirrors ``zennit.composites``: the same module
types get the same rules, and the "first layer" is the first matching module in
``named_modules()`` order, as in zennit's ``SpecialFirstLayerMapComposite``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm

# ----------------------------------------------------------------------------------------------
# Rules (parameters only; the arithmetic is in the functions below)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Epsilon:
    """R_in = x ⊙ L^T(R / stab(z); W), with z the layer output (zennit ``Epsilon``)."""

    epsilon: float = 1e-6


@dataclass(frozen=True)
class ZPlus:
    """z+ rule: positive weights for positive inputs, negative weights for negative inputs (zennit ``ZPlus``)."""

    stabilizer: float = 1e-6


@dataclass(frozen=True)
class AlphaBeta:
    """alpha-beta rule: alpha × positive contributions − beta × negative ones (zennit ``AlphaBeta``)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6


@dataclass(frozen=True)
class Gamma:
    """Generalized gamma rule, weights W + gamma·W± chosen by the sign of the output (zennit ``Gamma``)."""

    gamma: float = 0.25
    stabilizer: float = 1e-6


@dataclass(frozen=True)
class ZBox:
    """z^B rule for inputs bounded by ``low`` and ``high`` (floats or broadcastable tensors) (zennit ``ZBox``)."""

    low: float | torch.Tensor
    high: float | torch.Tensor
    stabilizer: float = 1e-6


@dataclass(frozen=True)
class Flat:
    """Flat rule: relevance spread uniformly over the receptive field (zennit ``Flat``)."""

    stabilizer: float = 1e-6


@dataclass(frozen=True)
class Norm:
    """Relevance split in proportion to the summands, for sums and average pools (zennit ``Norm``)."""

    stabilizer: float = 1e-6


@dataclass(frozen=True)
class Pass:
    """Relevance passed through unchanged (zennit ``Pass``; activations, batch norms)."""


Rule = Epsilon | ZPlus | AlphaBeta | Gamma | ZBox | Flat | Norm | Pass

#: Rules applicable to a linear map (convolution or fully connected layer).
LINEAR_RULES = (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, Flat)

# ----------------------------------------------------------------------------------------------
# Composites: rule maps by module type (the named ones are ``spray.attribution.lrp.COMPOSITES``)
# ----------------------------------------------------------------------------------------------

TypeMap = Sequence[tuple[type | tuple[type, ...], Rule]]


def base_map(stabilizer: float) -> list[tuple[type, Rule]]:
    """The rules every composite shares: Pass for activations and batch norms, Norm for sums and average pools."""
    return [(Activation, Pass()), (Sum, Norm(stabilizer)), (AvgPool, Norm(stabilizer)), (BatchNorm, Pass())]


@dataclass(frozen=True)
class CompositeSpec:
    """Module type -> rule, with a separate map for the first matching module (as zennit's composites)."""

    layer_map: TypeMap
    first_map: TypeMap = ()


def rule_map(model: nn.Module, spec: CompositeSpec) -> dict[nn.Module, Rule]:
    """The rule of every module of ``model`` that gets one, walking ``named_modules()`` as zennit does."""
    rules: dict[nn.Module, Rule] = {}
    first_visited = False
    for _name, module in model.named_modules():
        rule = None
        if not first_visited:
            rule = next((r for types, r in spec.first_map if isinstance(module, types)), None)
            first_visited = rule is not None
        if rule is None:
            rule = next((r for types, r in spec.layer_map if isinstance(module, types)), None)
        if rule is not None:
            rules[module] = rule
    return rules


# ----------------------------------------------------------------------------------------------
# Linear maps and their adjoints
# ----------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class LinearMap:
    """The geometry of a convolution (``dims`` spatial axes) or, with ``dims == 0``, a fully connected layer."""

    dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """L(x; W, b)."""
        if self.dims == 0:
            return F.linear(x, weight, bias)
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def adjoint(self, g: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """L^T(g; W): the gradient of ``<g, L(x; W)>`` with respect to x, of shape ``in_shape``."""
        if self.dims == 0:
            return g @ weight
        k = weight.shape[2:]
        out = g.shape[2:]
        extra = tuple(
            in_shape[2 + i] - ((out[i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (k[i] - 1) + 1)
            for i in range(self.dims)
        )
        return _CONV_T[self.dims](g, weight, None, self.stride, self.padding, extra, self.groups, self.dilation)


def conv_map(module: nn.Module) -> LinearMap:
    """The ``LinearMap`` of a ``nn.Conv1d/2d/3d`` (zero padding; 'same' only where it is symmetric)."""
    dims = module.weight.ndim - 2
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * dims
        else:  # 'same': symmetric for odd effective kernels (checked by the caller via ``symmetric_same``)
            padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return LinearMap(dims, tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups)


def symmetric_same(module: nn.Module) -> bool:
    """Whether a conv's padding is representable as symmetric integer padding."""
    if module.padding != "same":
        return True
    return all(d * (k - 1) % 2 == 0 for d, k in zip(module.dilation, module.kernel_size))


# ----------------------------------------------------------------------------------------------
# Arithmetic of the rules
# ----------------------------------------------------------------------------------------------


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + epsilon·sign(z), with sign(0) = +1 (zennit's default stabilizer), bit for bit.

    sign(sign(z) + 1/2) is +1 for z >= 0 (also for -0.0) and -1 below, as zennit's
    ``(z == 0) + sign(z)``, in fewer passes over memory.
    """
    return torch.add(z, z.sign().add_(0.5).sign_(), alpha=epsilon)


@dataclass
class LinearParams:
    """A linear layer's parameters after canonization, and the modified copies its rule needs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    pos: torch.Tensor | None = None
    neg: torch.Tensor | None = None
    bias_pos: torch.Tensor | None = None
    bias_neg: torch.Tensor | None = None
    bias_pos_stable: torch.Tensor | None = None

    @classmethod
    def prepare(cls, weight: torch.Tensor, bias: torch.Tensor | None, rule: Rule) -> LinearParams:
        """Precompute W+, W- (and for gamma W + gamma·W±) once instead of for every batch."""
        params = cls(weight, bias)
        if isinstance(rule, (ZPlus, AlphaBeta, ZBox)):
            params.pos, params.neg = weight.clamp(min=0), weight.clamp(max=0)
            if bias is not None:
                params.bias_pos, params.bias_neg = bias.clamp(min=0), bias.clamp(max=0)
            if isinstance(rule, ZPlus):
                # For non-negative inputs z+ >= 0, so its stabilizer is + epsilon: folded into the bias.
                zero = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                params.bias_pos_stable = (zero if bias is None else params.bias_pos) + rule.stabilizer
        elif isinstance(rule, Gamma):
            params.pos = weight + rule.gamma * weight.clamp(min=0)
            params.neg = weight + rule.gamma * weight.clamp(max=0)
            if bias is not None:
                params.bias_pos = bias + rule.gamma * bias.clamp(min=0)
                params.bias_neg = bias + rule.gamma * bias.clamp(max=0)
        return params

    def to(self, memory_format: torch.memory_format) -> LinearParams:
        """The same parameters with weight tensors in ``memory_format`` (channels-last convolutions)."""

        def convert(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.ndim != 4 else t.contiguous(memory_format=memory_format)

        return LinearParams(
            convert(self.weight), self.bias, convert(self.pos), convert(self.neg),
            self.bias_pos, self.bias_neg, self.bias_pos_stable,
        )


def linear_relevance(
    rule: Rule,
    lmap: LinearMap,
    params: LinearParams,
    x: torch.Tensor | None,
    z: torch.Tensor | None,
    r: torch.Tensor,
    in_shape: Sequence[int],
    nonneg: bool,
    flat_cache: dict,
) -> torch.Tensor:
    """Relevance at the input of a linear layer for relevance ``r`` at its output.

    ``x`` is the layer input, ``z`` its (unmodified) output where the rule needs it, ``nonneg``
    whether x is known to be >= 0. ``r`` is not modified (it may be shared with other nodes).
    """
    if isinstance(rule, Epsilon):
        g = r / stabilize(z, rule.epsilon)
        return x * lmap.adjoint(g, params.weight, in_shape)
    if isinstance(rule, ZPlus):
        return _zplus(rule, lmap, params, x, r, in_shape, nonneg)
    if isinstance(rule, AlphaBeta):
        return _alpha_beta(rule, lmap, params, x, r, in_shape, nonneg)
    if isinstance(rule, Gamma):
        return _gamma(rule, lmap, params, x, z, r, in_shape, nonneg)
    if isinstance(rule, ZBox):
        return _zbox(rule, lmap, params, x, z, r, in_shape)
    if isinstance(rule, Flat):
        return _flat(rule, lmap, params, r, in_shape, flat_cache)
    raise TypeError(f"no linear relevance for rule {rule!r}")


def _zplus(rule, lmap, p, x, r, in_shape, nonneg):
    if nonneg:
        z = lmap.apply(x, p.pos, p.bias_pos_stable)
        g = torch.div(r, z, out=z) if z.dtype == torch.promote_types(r.dtype, z.dtype) else r / z
        return lmap.adjoint(g, p.pos, in_shape).mul_(x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = lmap.apply(xp, p.pos, p.bias_pos) + lmap.apply(xn, p.neg, None)
    g = r / stabilize(z, rule.stabilizer)
    return xp * lmap.adjoint(g, p.pos, in_shape) + xn * lmap.adjoint(g, p.neg, in_shape)


def _alpha_beta(rule, lmap, p, x, r, in_shape, nonneg):
    if nonneg:
        z_pos = lmap.apply(x, p.pos, p.bias_pos)
        z_neg = lmap.apply(x, p.neg, p.bias_neg)
        g_pos = r / stabilize(z_pos, rule.stabilizer)
        g_neg = r / stabilize(z_neg, rule.stabilizer)
        up = lmap.adjoint(g_pos, p.pos, in_shape).mul_(rule.alpha)
        down = lmap.adjoint(g_neg, p.neg, in_shape).mul_(rule.beta)
        return up.sub_(down).mul_(x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z_pos = lmap.apply(xp, p.pos, p.bias_pos) + lmap.apply(xn, p.neg, None)
    z_neg = lmap.apply(xp, p.neg, p.bias_neg) + lmap.apply(xn, p.pos, None)
    g_pos = r / stabilize(z_pos, rule.stabilizer)
    g_neg = r / stabilize(z_neg, rule.stabilizer)
    up = xp * lmap.adjoint(g_pos, p.pos, in_shape) + xn * lmap.adjoint(g_pos, p.neg, in_shape)
    down = xp * lmap.adjoint(g_neg, p.neg, in_shape) + xn * lmap.adjoint(g_neg, p.pos, in_shape)
    return rule.alpha * up - rule.beta * down


def _gamma(rule, lmap, p, x, z, r, in_shape, nonneg):
    # p.pos = W + gamma W+ (bias b + gamma b+), p.neg = W + gamma W- (bias b + gamma b-).
    if nonneg:
        z_up = lmap.apply(x, p.pos, p.bias_pos)
        z_down = lmap.apply(x, p.neg, p.bias_neg)
        g_up = (z > 0).to(r) * r / stabilize(z_up, rule.stabilizer)
        g_down = (z < 0).to(r) * r / stabilize(z_down, rule.stabilizer)
        return lmap.adjoint(g_up, p.pos, in_shape).add_(lmap.adjoint(g_down, p.neg, in_shape)).mul_(x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z_up = lmap.apply(xp, p.pos, p.bias_pos) + lmap.apply(xn, p.neg, None)
    z_down = lmap.apply(xp, p.neg, p.bias_neg) + lmap.apply(xn, p.pos, None)
    g_up = (z > 0).to(r) * r / stabilize(z_up, rule.stabilizer)
    g_down = (z < 0).to(r) * r / stabilize(z_down, rule.stabilizer)
    return (
        xp * lmap.adjoint(g_up, p.pos, in_shape)
        + xn * lmap.adjoint(g_up, p.neg, in_shape)
        + xp * lmap.adjoint(g_down, p.neg, in_shape)
        + xn * lmap.adjoint(g_down, p.pos, in_shape)
    )


def _bound(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    bound = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bound.ndim == like.ndim and bound.shape[0] > like.shape[0]:
        bound = bound[: like.shape[0]]
    return bound.expand_as(like)


def _zbox(rule, lmap, p, x, z, r, in_shape):
    low, high = _bound(rule.low, x), _bound(rule.high, x)
    z_low = lmap.apply(low, p.pos, p.bias_pos)
    z_high = lmap.apply(high, p.neg, p.bias_neg)
    g = r / stabilize(z - (z_low + z_high), rule.stabilizer)
    return x * lmap.adjoint(g, p.weight, in_shape) - (
        low * lmap.adjoint(g, p.pos, in_shape) + high * lmap.adjoint(g, p.neg, in_shape)
    )


def _flat(rule, lmap, p, r, in_shape, cache):
    # All weights one, input one, no bias: the output is the (integer) receptive-field size,
    # equal for all output channels, so it is computed once per input shape.
    key = ("flat", tuple(in_shape[1:]), r.dtype, r.device)
    if key not in cache:
        ones_in = torch.ones((1, *in_shape[1:]), dtype=r.dtype, device=r.device)
        ones_w = torch.ones_like(p.weight, memory_format=torch.contiguous_format)
        cache[key] = (lmap.apply(ones_in, ones_w, None).add_(rule.stabilizer), ones_w)
    denominator, ones_w = cache[key]
    if lmap.groups != 1:
        return lmap.adjoint(r / denominator, ones_w, in_shape)
    # With equal weights and a denominator equal over output channels, sum(R / d) over channels
    # is sum(R) / d: one pass over R instead of a full-size division (on the first layer of a
    # 224-pixel network the division alone cost as much as a small convolution), and the adjoint
    # is that of a single-channel kernel.
    summed = r.sum(dim=1, keepdim=True).div_(denominator[:, :1])
    if lmap.dims == 0:
        return summed.expand(*in_shape)
    single = ones_w[:1, :1]
    return lmap.adjoint(summed, single, (in_shape[0], 1, *in_shape[2:])).expand(*in_shape)


def norm_relevance(rule: Norm, inputs: Sequence[torch.Tensor], output: torch.Tensor, r: torch.Tensor, nonneg: bool):
    """g = R / stab(output); the relevance of each summand x_i is x_i ⊙ g (``Norm`` on a sum)."""
    if nonneg:
        g = r / output.add(rule.stabilizer)
    else:
        g = r / stabilize(output, rule.stabilizer)
    return [x * g for x in inputs]


def vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The plain gradient of ``fn`` at ``x`` applied to ``g`` (used for pooling adjoints)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf), leaf, g)
    return grad
