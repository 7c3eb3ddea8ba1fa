"""``FastExplainer``: the forward pass and the backward sweeps of a compiled model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spray.attribution import fast_rules as fr
from spray.attribution.fast.compiler import compile_model
from spray.attribution.lrp import (
    AttributionConfigError,
    ConditionalExplanation,
    Explanation,
    LRPExplainer,
    check_mask_channels,
)


class FastExplainer(LRPExplainer):
    """The fast engine: one-pass LRP heatmaps and concept relevances, equal to zennit's for the supported composites.

    An ``LRPExplainer`` (``spray.attribution.lrp``; ``device`` and ``autocast`` as there).
    ``composite`` is a name of ``lrp.COMPOSITES`` or a ``fast_rules.CompositeSpec``;
    ``low``/``high`` bound the input for ``epsilon_gamma_box``. Raises ``UnsupportedModel``
    for a model it cannot compile.

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

    Conditional heatmaps equal zennit's (the other channels' relevance masked at the layer's
    output), but the forward pass and the backward sweep above the layer run once per image;
    only the part below the layer runs once per condition, in rounds of at most one condition
    per image (a round with every image runs on the forward values as they are, other rounds
    copy the rows they need, so memory stays near that of an ordinary ``explain`` of the batch).
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
        *,
        device: torch.device | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, concept_layers, device=device, autocast=autocast)
        self.plan = compile_model(self.model, composite, canonizers, self.layers, low, high, memory_format, forward)

    @torch.no_grad()
    def _concept_shapes(self, images: torch.Tensor) -> dict[str, torch.Size]:
        _, _, shapes = self._forward(images)
        return {name: shapes[i] for name, i in self.plan.concept_nodes.items() if i in shapes}

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

    @torch.no_grad()
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

    @torch.no_grad()
    def _explain_conditional(
        self, images: torch.Tensor, targets: torch.Tensor, layer_name: str, masks: torch.Tensor, picks: torch.Tensor
    ) -> ConditionalExplanation:
        layer = self.plan.concept_nodes[layer_name]
        values, states, _ = self._forward(images)
        logits = values[self.plan.output_index]
        relevance = self._seeded(values, targets)
        self._sweep(values, states, relevance, layer + 1, free=True)  # above the layer: once per image
        r_layer = relevance[layer]
        if r_layer is None:
            r_layer = torch.zeros(values[layer].shape, dtype=logits.dtype, device=logits.device)
        check_mask_channels(layer_name, masks, r_layer.shape)
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
