"""The fast LRP engine: a model compiled into a list of steps with explicit relevance rules.

``FastExplainer`` gives the heatmaps of zennit's composites (see ``fast_rules``) without
autograd hooks. At construction the model is canonized with zennit's own canonizers
(BatchNorm merging, the ResNet and VGG canonizers), traced with ``torch.fx``, and turned into
steps whose parameters are snapshots of the canonized weights; then the canonizers are
reverted, so the model is left as it was. Each batch then costs

- one forward pass without autograd, by default with zennit's arithmetic (the model's own
  NCHW convolutions, each BatchNorm applied after its layer), so the forward values are
  zennit's bit for bit; ``forward="fast"`` instead folds merged BatchNorms into the
  convolution before them and runs channels-last convolutions;
- one backward sweep in which every layer applies its rule as a modified linear map and its
  adjoint (channels-last convolutions for float32 and lower precision); the relevance at each
  named layer is summed over space on the way (the concept relevance vector).

Why the forward follows zennit: the epsilon and norm rules divide by a layer's output plus a
small stabiliser, R / (z + ε·sign z), and R is itself proportional to z; where z is a sum of
large terms that nearly cancels, so that it is as small as its own rounding error and as ε,
the quotient z / (z + ε) depends on z's last bits. A forward pass that rounds differently
from zennit's (folded weights, another convolution algorithm) therefore moves 224-pixel
float32 heatmaps by up to a few 1e-3 relative, while rounding in the backward sweep is not
amplified that way: with zennit's forward, float32 heatmaps equal zennit's to about 1e-6.

Models the engine cannot compile raise ``UnsupportedModel`` with the reason;
``spray.attribution.select.make_explainer`` then falls back to the zennit-based ``Explainer``.

Supported: ``nn.Conv1d/2d/3d`` (zero padding) and ``nn.Linear`` with the rules of
``fast_rules``; BatchNorm (eval); zennit's activations (Pass rule); max, average and adaptive
pooling modules; ``nn.Flatten``, dropout, ``nn.Identity``; ``torch.flatten``, ``view``,
``reshape``, ``size``, ``torch.cat``, tensor additions, functional ``relu``, pooling, dropout
and ``mean`` (the plain gradient, as zennit hooks only modules); zennit's ``Sum`` after
``torch.stack`` (the residual additions made explicit by the ResNet canonizer). Not supported
(the fallback takes over): other modules and functions (e.g. ``nn.Mish``, products of tensors,
slicing), parameters used outside their modules, models that fail to trace, several inputs or
outputs, and a module with a rule that is called more than once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from zennit.layer import Sum
from zennit.types import Activation

from spray.attribution import fast_rules as fr
from spray.attribution.lrp import CANONIZERS, AttributionConfigError, ConditionalExplanation, Explanation, resolve_layers


class UnsupportedModel(Exception):
    """The fast engine cannot explain this model (the message says which part and why)."""


# ----------------------------------------------------------------------------------------------
# Steps: one per traced node. ``forward`` computes the node's value; ``relevance`` maps the
# relevance at the node's output to its tensor inputs (``None`` where an input gets none).
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx tracer that keeps zennit's ``Sum`` as a leaf and records each module call's output node."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Sum) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            try:
                self.module_outputs[self.path_of_module(m)] = out.node
            except NameError:
                pass
        return out


@contextmanager
def canonized(model: nn.Module, canonizers: Sequence[str]) -> Iterator[None]:
    """Apply zennit's canonizers (by name, see ``lrp.CANONIZERS``) and revert them afterwards."""
    unknown = [c for c in canonizers if c not in CANONIZERS]
    if unknown:
        raise AttributionConfigError(f"unknown canonizer(s) {unknown}; choose from {sorted(CANONIZERS)}.")
    handles = []
    try:
        for name in canonizers:
            handles += CANONIZERS[name]().apply(model)
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_POOL = (
    nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_GRAD_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.mean,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_VALUE_METHODS = {"size", "dim"}
#: How the forward pass is computed: as zennit's hooked model does, or folded and channels-last.
FORWARDS = ("zennit", "fast")


@dataclass
class Plan:
    """A compiled model: steps in execution order and where the input, output and concept layers are."""

    steps: list[Step | None]
    input_index: int
    output_index: int
    concept_nodes: dict[str, int]
    channels_last: bool  # whether the forward pass (and so its input) runs channels-last
    backward_channels_last: bool = False  # whether the backward sweep's convolutions run channels-last
    last_forward_use: list[int] = field(default_factory=list)
    last_backward_use: list[int] = field(default_factory=list)
    kept: frozenset[int] = frozenset()


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"{node.op} {target!r} (node {node.name!r})"


def compile_model(
    model: nn.Module,
    composite: str | fr.CompositeSpec = "epsilon_plus_flat",
    canonizers: Sequence[str] = ("merge_batchnorm",),
    layers: Sequence[str] = (),
    low: float | torch.Tensor | None = None,
    high: float | torch.Tensor | None = None,
    memory_format: str = "auto",
    forward: str = "zennit",
) -> Plan:
    """Trace ``model`` under its canonizers and build the step list (raises ``UnsupportedModel``).

    ``composite`` is a composite name (``fast_rules.composite_spec``) or a ``CompositeSpec``;
    ``memory_format`` and ``forward`` as in ``FastExplainer``.
    """
    if isinstance(composite, fr.CompositeSpec):
        spec = composite
    else:
        try:
            spec = fr.composite_spec(composite, low=low, high=high)
        except KeyError:
            raise UnsupportedModel(f"composite {composite!r} has no fast rule map") from None
        except ValueError as error:
            raise AttributionConfigError(str(error)) from error
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise AttributionConfigError(f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {memory_format!r}.")
    if forward not in FORWARDS:
        raise AttributionConfigError(f"forward must be one of {list(FORWARDS)}, got {forward!r}.")
    resolve_layers(model, layers)
    model.eval()
    with canonized(model, canonizers):
        rules = fr.rule_map(model, spec)
        tracer = _Tracer()
        try:
            graph = tracer.trace(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure means "not compilable"
            raise UnsupportedModel(f"torch.fx cannot trace the model: {type(error).__name__}: {error}") from error
        modules = dict(model.named_modules())
        plan = _build(graph, modules, rules, tracer.module_outputs, layers)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if memory_format == "channels_last" or (memory_format == "auto" and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        plan.channels_last = forward == "fast"
        plan.backward_channels_last = True
        for step in plan.steps:
            if isinstance(step, LinearStep) and step.lmap.dims == 2:
                step.params = step.params.to(torch.channels_last)
                if plan.channels_last:
                    step.forward_weight = step.forward_weight.contiguous(memory_format=torch.channels_last)
    if forward == "fast":
        _fold_batchnorms(plan)
    _plan_memory(plan)
    return plan


def _build(graph: fx.Graph, modules: dict[str, nn.Module], rules: dict, module_outputs: dict, layers: Sequence[str]) -> Plan:
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    steps: list[Step | None] = [None] * len(nodes)
    nonneg = [False] * len(nodes)
    value_nodes: set[int] = set()
    placeholders = [i for i, n in enumerate(nodes) if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModel(f"the model's forward takes {len(placeholders)} inputs; the fast engine needs exactly one")
    input_index = placeholders[0]
    output_index = -1
    calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for target, count in calls.items():
        if count > 1 and not isinstance(rules.get(modules[target]), (fr.Pass, type(None))):
            # zennit's rule hooks keep one input per module, so a second call changes the first one's relevance.
            raise UnsupportedModel(f"module {target!r} has a rule and is called {count} times")

    def ref(arg: object) -> object:
        return fx.node.map_arg(arg, lambda n: Ref(index[n]))

    def tensor_inputs(node: fx.Node) -> tuple[int, ...]:
        return tuple(index[n] for n in node.all_input_nodes if index[n] not in value_nodes)

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise UnsupportedModel("the model must return a single logits tensor")
            output_index = index[node.args[0]]
            continue
        inputs = tensor_inputs(node)
        if node.op == "call_module":
            module = modules[node.target]
            step = _module_step(node, module, rules.get(module), inputs, nonneg, nodes, index)
        elif node.op == "call_method":
            step = _method_step(node, inputs, tuple(index[n] for n in node.all_input_nodes), ref)
            if isinstance(step, ValueStep):
                value_nodes.add(i)
        elif node.op == "call_function":
            step = _function_step(node, inputs, ref, value_nodes, index, modules, rules)
            if isinstance(step, ValueStep):
                value_nodes.add(i)
        else:
            raise UnsupportedModel(f"{_describe(node)} is not supported (parameters used outside modules)")
        if step is None:
            continue  # consumed by a fused step
        steps[i] = step
        nonneg[i] = step.output_nonneg(nonneg)
        if isinstance(step, (LinearStep, PoolStep)):
            step.nonneg_input = nonneg[step.inputs[0]]
        if isinstance(step, NormSumStep):
            step.nonneg_inputs = all(nonneg[j] for j in step.inputs)
    if output_index < 0 or output_index in value_nodes:
        raise UnsupportedModel("the model must return a single logits tensor")
    concept_nodes = {}
    for name in layers:
        if name == "":
            concept_nodes[name] = output_index
        elif name in module_outputs:
            concept_nodes[name] = index[module_outputs[name]]
        else:
            raise AttributionConfigError(f"layer {name!r} is not called in the model's forward pass.")
    return Plan(steps, input_index, output_index, concept_nodes, channels_last=False)


def _snapshot(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _module_step(node, module, rule, inputs, nonneg, nodes, index) -> Step | None:
    where = f"module {node.target!r} ({type(module).__name__})"
    if len(inputs) != 1 or node.kwargs:
        raise UnsupportedModel(f"{where} is called with {len(inputs)} tensor inputs; one is supported")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        if not isinstance(rule, fr.LINEAR_RULES):
            raise UnsupportedModel(f"{where} has no linear LRP rule in this composite (got {rule!r})")
        if isinstance(module, nn.Linear):
            lmap = fr.LinearMap()
        else:
            if module.padding_mode != "zeros" or not fr.symmetric_same(module):
                raise UnsupportedModel(f"{where}: only symmetric zero padding is supported")
            lmap = fr.conv_map(module)
        weight, bias = _snapshot(module.weight), _snapshot(module.bias)
        return LinearStep(
            inputs, name=node.target, rule=rule, lmap=lmap,
            params=fr.LinearParams.prepare(weight, bias, rule), forward_weight=weight, forward_bias=bias,
        )
    if isinstance(module, _BATCHNORM):
        if not isinstance(rule, fr.Pass):
            raise UnsupportedModel(f"{where} has rule {rule!r}; only Pass is supported")
        if not module.track_running_stats or module.running_var is None:
            raise UnsupportedModel(f"{where} has no running statistics")
        scale = (module.running_var + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        return AffineStep(inputs, scale=_snapshot(scale), shift=_snapshot(shift))
    if isinstance(module, Activation) and not isinstance(module, nn.MultiheadAttention):
        if not isinstance(rule, fr.Pass):
            raise UnsupportedModel(f"{where} has rule {rule!r}; only Pass is supported for activations")
        return ActivationStep(inputs, module=module, relu=type(module) is nn.ReLU)
    if isinstance(module, Sum):
        source = nodes[inputs[0]]
        stacked = source.op == "call_function" and source.target is torch.stack and len(source.users) == 1
        dim = source.kwargs.get("dim", source.args[1] if len(source.args) > 1 else 0) if stacked else None
        if not stacked or dim != -1 or module.dim != -1 or not isinstance(rule, fr.Norm):
            raise UnsupportedModel(f"{where} is supported only as Sum(dim=-1) over torch.stack(..., dim=-1) with the Norm rule")
        return NormSumStep(tuple(index[n] for n in source.args[0]), rule=rule)
    if isinstance(module, _DROPOUT):
        return IdentityStep(inputs)
    if isinstance(module, nn.Flatten):
        return ReshapeStep(inputs, fn=module, args=(Ref(inputs[0]),))
    if isinstance(module, nn.MaxPool2d) and rule is None and not module.return_indices:
        return MaxPoolStep(inputs, module=module)
    if isinstance(module, _POOL) and not getattr(module, "return_indices", False):
        if rule is not None and not isinstance(rule, fr.Norm):
            raise UnsupportedModel(f"{where} has rule {rule!r}; only Norm is supported for pools")
        return PoolStep(inputs, module=module, rule=rule)
    raise UnsupportedModel(f"{where} has no fast relevance rule")


def _method_step(node: fx.Node, inputs, sources, ref) -> Step:
    if node.target in _VALUE_METHODS:
        return ValueStep(sources, fn=getattr(torch.Tensor, node.target), args=ref(node.args), kwargs=ref(node.kwargs))
    if node.target in _RESHAPE_METHODS and len(inputs) == 1:
        return ReshapeStep(inputs, fn=getattr(torch.Tensor, node.target), args=ref(node.args), kwargs=ref(node.kwargs))
    if node.target == "contiguous" and len(inputs) == 1:
        return IdentityStep(inputs)
    if node.target == "relu" and len(inputs) == 1:
        return ReluGradStep(inputs)
    if node.target == "mean" and len(inputs) == 1:
        return _grad_step(node, inputs, ref, torch.Tensor.mean)
    raise UnsupportedModel(f"{_describe(node)} has no fast relevance rule")


def _function_step(node: fx.Node, inputs, ref, value_nodes, index, modules, rules) -> Step | None:
    target = node.target
    sources = [index[n] for n in node.all_input_nodes]
    if target in (getattr, operator.getitem) and sources and all(s in value_nodes for s in sources):
        return ValueStep(tuple(sources), fn=target, args=ref(node.args), kwargs=ref(node.kwargs))
    if target is getattr and node.args[1] in ("shape",):
        return ValueStep(tuple(sources), fn=target, args=ref(node.args))
    if target in _RESHAPE_FUNCTIONS and len(inputs) == 1:
        return ReshapeStep(inputs, fn=target, args=ref(node.args), kwargs=ref(node.kwargs))
    if target in (F.relu, torch.relu) and len(inputs) == 1:
        return ReluGradStep(inputs)  # computed out of place, also where the model asks for inplace=True
    if target in _GRAD_FUNCTIONS and len(inputs) == 1 and not node.kwargs.get("return_indices", False):
        return _grad_step(node, inputs, ref, target)
    if target in (operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        tensors = tuple(index[arg] for arg in (a, b) if isinstance(arg, fx.Node) and index[arg] not in value_nodes)
        constants_ok = all(isinstance(arg, (fx.Node, int, float)) for arg in (a, b))
        if tensors and constants_ok and not any(isinstance(arg, fx.Node) and index[arg] in value_nodes for arg in (a, b)):
            return AddStep(tensors, args=ref(node.args))
    if target is torch.cat and len(node.args) >= 1 and not isinstance(node.args[0], fx.Node):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return CatStep(tuple(index[n] for n in node.args[0]), dim=dim)
    if target is torch.stack:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), Sum):
            return None  # fused into the NormSumStep of its Sum
    raise UnsupportedModel(f"{_describe(node)} has no fast relevance rule")


def _grad_step(node: fx.Node, inputs, ref, fn: Callable) -> Step:
    args = ref(node.args)
    positions = [k for k, a in enumerate(args) if a == Ref(inputs[0])]
    if len(positions) != 1 or (fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d) and _training(node)):
        raise UnsupportedModel(f"{_describe(node)} has no fast relevance rule")
    return GradStep(inputs, fn=fn, args=args, kwargs=ref(node.kwargs), position=positions[0])


def _training(node: fx.Node) -> bool:
    flag = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return flag is not False


def _fold_batchnorms(plan: Plan) -> None:
    """Fold a BatchNorm into the linear layer before it when nothing else reads that layer's output.

    Only the forward weights change: the rules keep using the (canonized) layer weights, as
    zennit does, and the BatchNorm step becomes the identity (its rule is Pass).
    """
    users: dict[int, int] = {}
    for step in plan.steps:
        for i in step.inputs if step is not None else ():
            users[i] = users.get(i, 0) + 1
    for step in plan.steps:
        if not isinstance(step, AffineStep):
            continue
        source = step.inputs[0]
        producer = plan.steps[source]
        if not isinstance(producer, LinearStep) or producer.saves_output or users.get(source) != 1:
            continue
        weight, bias = producer.forward_weight, producer.forward_bias
        shape = (-1,) + (1,) * (weight.ndim - 1)
        channels_last = weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        producer.forward_weight = (weight * step.scale.view(shape)).contiguous(memory_format=fmt)
        producer.forward_bias = step.shift if bias is None else torch.addcmul(step.shift, bias, step.scale)
        step.folded = True
        step.aliases_input = True


def _plan_memory(plan: Plan) -> None:
    """Which values the backward sweep needs, when forward values can be freed, and in-place ReLUs."""
    n = len(plan.steps)
    plan.last_forward_use = [-1] * n
    plan.last_backward_use = [n] * n
    needed = [False] * n
    for i, step in enumerate(plan.steps):
        if step is None:
            continue
        for j in step.inputs:
            plan.last_forward_use[j] = i
        for j in set(step.inputs) if step.saves_inputs else ():
            needed[j] = True
            plan.last_backward_use[j] = min(plan.last_backward_use[j], i)
        if step.saves_output:
            needed[i] = True
            plan.last_backward_use[i] = min(plan.last_backward_use[i], i)
    # Alias groups: steps whose output is their input tensor itself share one buffer.
    root = list(range(n))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for i, step in enumerate(plan.steps):
        if step is None:
            continue
        if isinstance(step, ActivationStep) and step.relu:
            group = members[root[step.inputs[0]]]
            readers = {k for j in group for k in _readers(plan, j)} - set(group)
            if readers == {i} and not any(needed[j] for j in group) and plan.input_index not in group:
                step.inplace = True
        if step.aliases_input or (isinstance(step, ActivationStep) and step.inplace):
            r = root[step.inputs[0]]
            root[i] = r
            members[r].append(i)
    for r, group in members.items():
        if len(group) > 1:  # keep the buffer alive while any member is needed
            last = max(plan.last_forward_use[j] for j in group)
            for j in group:
                plan.last_forward_use[j] = max(plan.last_forward_use[j], last)
    plan.kept = frozenset(i for i in range(n) if needed[i]) | {plan.output_index}


def _readers(plan: Plan, j: int) -> list[int]:
    return [i for i, step in enumerate(plan.steps) if step is not None and j in step.inputs]


# ----------------------------------------------------------------------------------------------
# The explainer
# ----------------------------------------------------------------------------------------------


class FastExplainer:
    """One-pass LRP heatmaps and concept relevances, equal to zennit's for the supported composites.

    Same API as ``spray.attribution.lrp.Explainer``: use it as a context manager and call
    ``explain(images, targets)``. ``composite`` is a name of ``lrp.COMPOSITES`` or a
    ``fast_rules.CompositeSpec``; ``low``/``high`` bound the input for ``epsilon_gamma_box``.

    ``memory_format`` is the layout of the backward sweep's convolutions: "auto"
    (channels-last for float32 and lower precision), "channels_last" or "contiguous".
    ``forward="zennit"`` (the default) computes the forward pass as zennit's hooked model
    does (NCHW, each BatchNorm after its layer), so float32 heatmaps equal zennit's to about
    1e-6 relative and are as close to float64 ones as zennit's; ``forward="fast"`` also runs
    the forward pass in ``memory_format`` and folds merged BatchNorms into the layer before
    them: 10-15% faster on a CPU, but float32 heatmaps then differ from zennit's by up to a
    few 1e-3 relative on 224-pixel networks, and their per-sample error against float64 is
    several times zennit's (``bench/attribution.py`` measures both). The model's canonized
    weights are snapshotted at construction: build a new explainer after changing the model.
    """

    engine = "fast"

    def __init__(
        self,
        model: nn.Module,
        composite: str | fr.CompositeSpec = "epsilon_plus_flat",
        canonizers: Sequence[str] = ("merge_batchnorm",),
        concept_layers: Sequence[str] = (),
        low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None,
        memory_format: str = "auto",
        forward: str = "zennit",
    ) -> None:
        self.model = model.eval()
        self.layers = tuple(concept_layers)
        self.plan = compile_model(model, composite, canonizers, self.layers, low, high, memory_format, forward)

    def __enter__(self) -> FastExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """Heatmaps (B, H, W), logits (B, K) and concept relevances (B, C) per layer for one batch."""
        with torch.no_grad():
            return self._explain(images.detach(), targets)

    def concept_shapes(self, images: torch.Tensor) -> dict[str, torch.Size]:
        """The output shape of every concept layer for ``images``, from one forward pass."""
        with torch.no_grad():
            _, _, shapes = self._forward(images.detach())
        return {name: shapes[i] for name, i in self.plan.concept_nodes.items() if i in shapes}

    def explain_conditional(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        layer: str,
        masks: torch.Tensor,
        picks: torch.Tensor | None = None,
    ) -> ConditionalExplanation:
        """CRP conditional heatmaps: row ``k`` explains ``targets[picks[k]]`` of ``images[picks[k]]``
        with the relevance at ``layer``'s output multiplied by ``masks[k]`` (one weight per channel).

        Equal to zennit's heatmaps with the other channels' relevance masked at that output
        (``spray.attribution.crp.ConditionalExplainer``). The forward pass and the backward
        sweep above ``layer`` run once per image; only the part below ``layer`` runs once per
        condition, in rounds of at most one condition per image (a round with every image runs
        on the forward values as they are, other rounds copy the rows they need, so memory stays
        near that of an ordinary ``explain`` of the batch). Relevance that bypasses ``layer`` (a skip
        connection around a block's inner layer) is not masked, as with zennit. ``layer`` must
        be one of the explainer's concept layers; ``picks`` defaults to ``0..B-1``.
        """
        if layer not in self.plan.concept_nodes:
            raise AttributionConfigError(f"layer {layer!r} is not a concept layer of this explainer; give it in concept_layers.")
        if picks is None:
            picks = torch.arange(len(images))
        if masks.ndim != 2 or len(masks) != len(picks):
            raise ValueError(f"masks must be (conditions, channels) with one row per pick, got {tuple(masks.shape)} for {len(picks)} picks.")
        with torch.no_grad():
            return self._explain_conditional(images.detach(), targets, self.plan.concept_nodes[layer], masks, picks)

    def _forward(self, images: torch.Tensor) -> tuple[list, list[dict], dict[int, torch.Size]]:
        """Run the forward steps; returns the values the backward sweep needs, the steps' states,
        and the shapes at the concept nodes."""
        plan = self.plan
        steps = plan.steps
        if plan.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        values: list = [None] * len(steps)
        states: list[dict] = [{} for _ in steps]
        values[plan.input_index] = images
        wanted = set(plan.concept_nodes.values())
        shapes = {}
        for i, step in enumerate(steps):
            if step is None:
                continue
            values[i] = step.forward(values, states[i])
            if i in wanted:
                shapes[i] = values[i].shape
            for j in step.inputs:
                if plan.last_forward_use[j] == i and j not in plan.kept:
                    values[j] = None
        logits = values[plan.output_index]
        if logits.ndim != 2:
            raise AttributionConfigError(f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}.")
        return values, states, shapes

    def _seeded(self, values: list, targets: torch.Tensor) -> list:
        """The relevance list with the target logits as the initial relevance at the output."""
        logits = values[self.plan.output_index]
        rows = torch.arange(len(targets), device=logits.device)
        targets = targets.to(logits.device)
        seed = torch.zeros_like(logits)
        seed[rows, targets] = logits[rows, targets]
        relevance: list = [None] * len(values)
        relevance[self.plan.output_index] = seed
        return relevance

    def _sweep(self, values: list, states: list[dict], relevance: list, stop: int, free: bool, concepts: dict | None = None) -> None:
        """The backward sweep over steps ``n-1 .. stop``: relevance moves from each step's output
        to its inputs (in place in ``relevance``); relevance at concept nodes is summed over space
        into ``concepts``. ``free`` drops forward values after their last use."""
        plan = self.plan
        wanted = set(plan.concept_nodes.values()) if concepts is not None else set()
        for i in range(len(plan.steps) - 1, stop - 1, -1):
            r = relevance[i]
            if r is None:
                continue
            if i in wanted:
                concepts[i] = r.sum(dim=tuple(range(2, r.ndim))) if r.ndim > 2 else r.clone()
            step = plan.steps[i]
            if step is None:
                continue
            relevance[i] = None
            if plan.backward_channels_last and not plan.channels_last:
                _to_channels_last(values, (*(step.inputs if step.saves_inputs else ()), *((i,) if step.saves_output else ())))
            xs = [values[j] if step.saves_inputs else None for j in step.inputs]
            out = values[i] if step.saves_output else None
            for j, contribution in zip(step.inputs, step.relevance(r, xs, out, states[i])):
                if contribution is not None:
                    relevance[j] = contribution if relevance[j] is None else relevance[j] + contribution
            if free:
                for j in (*step.inputs, i):
                    if plan.last_backward_use[j] == i and j != plan.output_index:
                        values[j] = None

    def _heatmaps(self, relevance: list, images: torch.Tensor, rows: int) -> torch.Tensor:
        """The input relevance summed over channels (zeros where no relevance reached the input)."""
        heat = relevance[self.plan.input_index]
        if heat is None:
            return torch.zeros((rows, *images.shape[2:]), dtype=images.dtype, device=images.device)
        return heat.sum(dim=1).contiguous()

    def _explain(self, images: torch.Tensor, targets: torch.Tensor) -> Explanation:
        plan = self.plan
        values, states, shapes = self._forward(images)
        logits = values[plan.output_index]
        relevance = self._seeded(values, targets)
        concepts: dict[int, torch.Tensor] = {}
        self._sweep(values, states, relevance, 0, free=True, concepts=concepts)
        result = {}
        for name, i in plan.concept_nodes.items():
            if i in concepts:
                result[name] = concepts[i]
            else:
                shape = shapes.get(i, logits.shape)
                result[name] = torch.zeros(shape[:2], dtype=logits.dtype, device=logits.device)
        return Explanation(heatmaps=self._heatmaps(relevance, images, len(images)), logits=logits, concepts=result)

    def _explain_conditional(
        self, images: torch.Tensor, targets: torch.Tensor, layer: int, masks: torch.Tensor, picks: torch.Tensor
    ) -> ConditionalExplanation:
        values, states, _ = self._forward(images)
        logits = values[self.plan.output_index]
        relevance = self._seeded(values, targets)
        self._sweep(values, states, relevance, layer + 1, free=True)  # above the layer: once per image
        r_layer = relevance[layer]
        if r_layer is None:
            r_layer = torch.zeros(values[layer].shape, dtype=logits.dtype, device=logits.device)
        picks = picks.to(logits.device)
        masks = masks.to(logits.device, r_layer.dtype)
        if self.plan.backward_channels_last and not self.plan.channels_last:
            _to_channels_last(values, range(layer + 1))  # once here, not once per round
        batch = len(images)
        heatmaps = torch.zeros((len(picks), *images.shape[2:]), dtype=logits.dtype, device=logits.device)
        totals = torch.zeros(len(picks), dtype=logits.dtype, device=logits.device)
        for rows in _rounds(picks):
            part = picks[rows]
            whole = len(part) == batch and bool((part == torch.arange(batch, device=part.device)).all())
            mask = masks[rows].reshape(len(part), -1, *([1] * (r_layer.ndim - 2)))
            masked = (r_layer if whole else _pick_rows(r_layer, part)) * mask
            totals[rows] = masked.reshape(len(part), -1).sum(dim=1)
            below = [None if r is None or whole else _pick_rows(r, part) for r in relevance[:layer]]
            if whole:
                below = list(relevance[:layer])
            below += [masked] + [None] * (len(relevance) - layer - 1)
            round_values = values if whole else _expanded(values, part, batch)
            round_states = states if whole else _expanded_states(states, part, batch)
            self._sweep(round_values, round_states, below, 0, free=False)
            heatmaps[rows] = self._heatmaps(below, images, len(part)).to(heatmaps.dtype)
        return ConditionalExplanation(heatmaps=heatmaps, relevance=totals, logits=logits[picks])


def _rounds(picks: torch.Tensor) -> list[torch.Tensor]:
    """The conditions in rounds in which each image occurs at most once, in ascending image order:
    round ``r`` holds every image's ``r``-th condition. A round of all images (the top-k case) then
    runs on the forward values as they are, without copying rows."""
    order = torch.argsort(picks, stable=True)
    ordered = picks[order]
    occurrence = torch.arange(len(picks), device=picks.device) - torch.searchsorted(ordered, ordered)
    return [order[occurrence == r] for r in range(int(occurrence.max()) + 1 if len(picks) else 0)]


def _to_channels_last(values: list, indices: Sequence[int]) -> None:
    """Store the 4-d forward values at ``indices`` channels-last, once, for the backward sweep's
    channels-last convolutions and the elementwise products with their results."""
    for j in indices:
        v = values[j]
        if isinstance(v, torch.Tensor) and v.ndim == 4 and not v.is_contiguous(memory_format=torch.channels_last):
            values[j] = v.contiguous(memory_format=torch.channels_last)


def _pick_rows(t: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The rows ``picks`` of ``t``, in ``t``'s memory format. Advanced indexing rather than
    ``index_select``, which is several times slower on large CPU tensors (and slower still on
    channels-last ones)."""
    return t[picks]


def _expanded(values: list, picks: torch.Tensor, batch: int) -> list:
    """Forward values with the batch axis re-indexed by ``picks`` (one row per condition)."""
    return [
        _pick_rows(v, picks) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
        for v in values
    ]


def _expanded_states(states: list[dict], picks: torch.Tensor, batch: int) -> list[dict]:
    """Step states for the re-indexed batch: input shapes and max-pool indices follow ``picks``."""
    expanded = []
    for state in states:
        if "in_shape" in state or "indices" in state:
            state = dict(state)
            shape = state.get("in_shape")
            if shape is not None and shape and shape[0] == batch:
                state["in_shape"] = (len(picks), *shape[1:])
            if "indices" in state:
                state["indices"] = _pick_rows(state["indices"], picks)
        expanded.append(state)
    return expanded
