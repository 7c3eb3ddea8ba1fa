"""Compiling a model into steps: canonize, trace with ``torch.fx``, assign the rules, plan memory.

``compile_model`` raises ``UnsupportedModel`` (with the reason) for a model it cannot
compile; the model itself is left as it was.
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
from spray.attribution.fast.steps import (
    ActivationStep,
    AddStep,
    AffineStep,
    CatStep,
    GradStep,
    IdentityStep,
    LinearStep,
    MaxPoolStep,
    NormSumStep,
    PoolStep,
    Ref,
    ReluGradStep,
    ReshapeStep,
    Step,
    ValueStep,
)
from spray.attribution.lrp import AttributionConfigError, composite_rules, make_canonizers, resolve_layers


class UnsupportedModel(Exception):
    """The fast engine cannot explain this model (the message says which part and why)."""


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
    instances = make_canonizers(canonizers)
    handles = []
    try:
        for canonizer in instances:
            handles += canonizer.apply(model)
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

    ``composite`` is a composite name (``lrp.COMPOSITES``; ``low``/``high`` bound the input for
    ``epsilon_gamma_box``) or a ``CompositeSpec``; ``memory_format`` and ``forward`` as in
    ``FastExplainer``.
    """
    if isinstance(composite, fr.CompositeSpec):
        spec = composite
    else:
        spec = composite_rules(composite, low, high).fast_spec(low, high)
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
