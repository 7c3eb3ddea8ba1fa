"""Concept Relevance Propagation (CRP): heatmaps conditioned on channels of one layer.

A concept is a channel of a layer (``features.conv4`` channel 12). Its *conditional
heatmap* for a class answers "where in the input is the evidence that flows through this
channel?": the LRP backward pass of the class logit is run as usual, but at the layer's
output every channel outside the condition gets zero relevance.

How it is done with zennit: under a composite, the gradient arriving at a layer's output
*is* that output's relevance (zennit's rule hooks store it and map it to the layer's
input). A tensor hook on the output, registered after the composite's hooks, scales that
gradient by a 0/1 channel mask before zennit's rule reads it, so the rest of the backward
pass propagates the masked relevance only. Every zennit rule is linear in the relevance
it receives (the forward activations are fixed), so masks that partition the channels
give conditional heatmaps that sum to the full heatmap exactly (up to rounding).

Several conditions on one sample share a forward pass: ``explain(images, targets, masks,
picks)`` takes one mask per condition and, in ``picks``, the image row each condition
explains. zennit's ``ConditionalExplainer`` repeats the picked rows along the batch axis (a
forward and a full backward per condition); ``FastConditionalExplainer`` (spray's fast LRP
engine, ``spray.attribution.fast``) runs the forward pass and the backward sweep above the
layer once per image and only the part below the layer once per condition, with the same
heatmaps. ``make_conditional_explainer`` picks the fast one where the model is supported.

Reference samples (relevance maximisation): the samples of the dataset on which a concept
carries the most relevance. The attribution pass collects the top rows of every channel
while it writes (``references/<layer>`` in ``attributions.h5``, read by
``collected_top_rows``); for files without them ``top_rows_by_concept`` scans the stored
relevances ``concepts/<layer>``. Neither needs another pass over the images. Their conditional heatmaps point at the part of each image the
concept responds to; ``relevance_box`` finds that part so the picture can be cropped to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from zennit.core import Composite

from spray.attribution.fast import FastExplainer, UnsupportedModel
from spray.attribution.lrp import AttributionConfigError, ConditionalExplanation, make_composite, resolve_layers

log = logging.getLogger(__name__)

#: Rows of a concept matrix read at once by ``top_rows_by_concept``.
READ_CHUNK = 4096


def channel_masks(
    n_channels: int,
    channel_sets: Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """0/1 masks (len(channel_sets), n_channels), one row per condition.

    Raises:
        ValueError: a channel index outside ``0..n_channels-1``.
    """
    masks = torch.zeros(len(channel_sets), int(n_channels), dtype=dtype)
    for row, channels in enumerate(channel_sets):
        picked = [int(channel) for channel in channels]
        bad = [channel for channel in picked if not 0 <= channel < n_channels]
        if bad:
            raise ValueError(f"channel(s) {bad} outside 0..{n_channels - 1} of the concept layer.")
        masks[row, picked] = 1
    return masks


class _ChannelSets:
    """``explain_channels`` for explainers with ``n_channels`` and ``explain(images, targets, masks, picks)``."""

    def n_channels(self, sample: torch.Tensor) -> int:
        raise NotImplementedError

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, picks: torch.Tensor | None = None
    ) -> ConditionalExplanation:
        raise NotImplementedError

    def explain_channels(
        self, image: torch.Tensor, target: int, channel_sets: Sequence[Sequence[int]]
    ) -> ConditionalExplanation:
        """Conditional heatmaps of one image (C, H, W) for several channel sets, one forward pass."""
        n_channels = self.n_channels(image[None])
        masks = channel_masks(n_channels, channel_sets, dtype=image.dtype)
        picks = torch.zeros(len(channel_sets), dtype=torch.long)
        return self.explain(image[None], torch.tensor([int(target)]), masks, picks)


def _check_lengths(images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, picks: torch.Tensor | None) -> None:
    if picks is None and not (len(images) == len(targets) == len(masks)):
        raise ValueError(
            f"images, targets and masks need the same length, got {len(images)}, {len(targets)} and {len(masks)}."
        )
    if picks is not None and not (len(images) == len(targets) and len(masks) == len(picks)):
        raise ValueError(
            f"images and targets need the same length ({len(images)}, {len(targets)}), and masks one row per pick "
            f"({len(masks)}, {len(picks)})."
        )


class ConditionalExplainer(_ChannelSets):
    """LRP heatmaps whose relevance is restricted to chosen channels of one layer (zennit's hooks).

    Use as a context manager (like ``spray.attribution.lrp.Explainer``): the composite
    is registered on entry and removed on exit; parameters are frozen meanwhile.

    Args:
        model: the classifier (put in eval mode).
        composite: the zennit composite, the same one the attribution stage used, so
            conditional heatmaps add up to the stored heatmaps.
        layer: name of the concept layer (as in ``model.named_modules()``).
    """

    def __init__(self, model: nn.Module, composite: Composite, layer: str) -> None:
        self.model = model.eval()
        self.composite = composite
        self.layer_name = layer
        self.layer = resolve_layers(model, [layer])[layer]
        self._mask: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._requires_grad: list[bool] = []

    def __enter__(self) -> ConditionalExplainer:
        parameters = list(self.model.parameters())
        self._requires_grad = [p.requires_grad for p in parameters]
        for parameter in parameters:
            parameter.requires_grad_(False)
        self.composite.register(self.model)
        # After the composite's hooks: the mask acts on the gradient zennit's rule receives.
        self._handle = self.layer.register_forward_hook(self._attach_mask)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.composite.remove()
        for parameter, flag in zip(self.model.parameters(), self._requires_grad):
            parameter.requires_grad_(flag)

    def _attach_mask(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            raise AttributionConfigError(
                f"layer {self.layer_name!r} returns {type(output).__name__}; a concept layer must "
                "return one tensor (batch, channels, ...)."
            )
        mask = self._mask
        if mask is None or not output.requires_grad:
            return
        if self._output is not None:
            raise AttributionConfigError(
                f"layer {self.layer_name!r} runs more than once per forward pass (a shared "
                "module); choose a layer that runs once, e.g. a convolution or a block."
            )
        if mask.shape != output.shape[:2]:
            raise ValueError(
                f"masks have shape {tuple(mask.shape)} but layer {self.layer_name!r} has output "
                f"{tuple(output.shape)}; give one mask of {output.shape[1]} channels per row."
            )
        shaped = mask.to(output.device, output.dtype).reshape(*mask.shape, *([1] * (output.ndim - 2)))
        self._output = output
        output.register_hook(lambda grad: grad * shaped)

    def n_channels(self, sample: torch.Tensor) -> int:
        """Channels of the concept layer, from one forward pass of ``sample`` (1, C, H, W)."""
        seen: list[int] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: seen.append(int(out.shape[1])))
        try:
            with torch.no_grad():
                self.model(sample)
        finally:
            handle.remove()
        return seen[0]

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, picks: torch.Tensor | None = None
    ) -> ConditionalExplanation:
        """Conditional heatmaps: condition ``k`` explains ``targets[picks[k]]`` of ``images[picks[k]]``
        through ``masks[k]``.

        Args:
            images: (B, C, H, W) model inputs.
            targets: (B,) class whose logit is explained; its value is the initial relevance.
            masks: (N, n_channels) weights on the layer's output channels (0/1 for a
                condition; all ones gives the ordinary heatmap).
            picks: (N,) image row of each condition; default ``0..B-1`` (N = B). The picked
                rows are repeated along the batch axis: one forward and backward row per condition.
        """
        _check_lengths(images, targets, masks, picks)
        if picks is not None:
            images, targets = images[picks], targets[picks]
        x = images.detach().clone().requires_grad_(True)
        self._mask = masks.detach()
        self._output = None
        try:
            with torch.enable_grad():
                logits = self.model(x)
                if logits.ndim != 2:
                    raise AttributionConfigError(
                        f"the model must return (batch, classes) logits, got {tuple(logits.shape)}."
                    )
                rows = torch.arange(len(targets), device=logits.device)
                targets = targets.to(logits.device)
                seed = torch.zeros_like(logits)
                seed[rows, targets] = logits[rows, targets].detach()
                output = self._output
                if output is None:
                    raise AttributionConfigError(
                        f"layer {self.layer_name!r} was not reached in the forward pass."
                    )
                output.retain_grad()
                logits.backward(seed)
        finally:
            self._mask = None
            self._output = None
        relevance = output.grad.reshape(len(x), -1).sum(dim=1)
        return ConditionalExplanation(
            heatmaps=x.grad.sum(dim=1).detach(),
            relevance=relevance.detach(),
            logits=logits.detach(),
        )


class FastConditionalExplainer(_ChannelSets):
    """``ConditionalExplainer``'s heatmaps from spray's fast LRP engine, with the forward pass shared.

    The forward pass and the backward sweep above ``layer`` run once per explained image; the
    sweep below it runs once per condition (``FastExplainer.explain_conditional``). Same API
    as ``ConditionalExplainer``; raises ``UnsupportedModel`` where the fast engine cannot
    compile the model.

    Args:
        model: the classifier (put in eval mode; left unchanged).
        composite: a composite name of ``spray.attribution.lrp.COMPOSITES``.
        canonizers: canonizer names, as for the attribution stage.
        layer: name of the concept layer (as in ``model.named_modules()``).
        low, high: the input range, for ``epsilon_gamma_box``.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: str = "epsilon_plus_flat",
        canonizers: Sequence[str] = ("merge_batchnorm",),
        layer: str = "",
        low: float | None = None,
        high: float | None = None,
    ) -> None:
        self.model = model.eval()
        self.layer_name = layer
        self.explainer = FastExplainer(model, composite, canonizers, [layer], low=low, high=high)

    def __enter__(self) -> FastConditionalExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def n_channels(self, sample: torch.Tensor) -> int:
        """Channels of the concept layer, from one forward pass of ``sample`` (1, C, H, W)."""
        return int(self.explainer.concept_shapes(sample)[self.layer_name][1])

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, picks: torch.Tensor | None = None
    ) -> ConditionalExplanation:
        """As ``ConditionalExplainer.explain``; each image row is run forward once, whatever its conditions."""
        _check_lengths(images, targets, masks, picks)
        return self.explainer.explain_conditional(images, targets, self.layer_name, masks, picks)


def make_conditional_explainer(
    model: nn.Module,
    composite: str = "epsilon_plus_flat",
    canonizers: Sequence[str] = ("merge_batchnorm",),
    layer: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    engine: str = "auto",
) -> ConditionalExplainer | FastConditionalExplainer:
    """A conditional explainer for ``layer``: the fast engine where it supports the model, else zennit's hooks.

    ``engine`` as in ``spray.attribution.select.make_explainer``: ``auto`` (fall back with one
    warning in the log), ``fast`` (raise ``AttributionConfigError`` instead) or ``zennit``.
    """
    bounds = {} if low is None and high is None else {"low": low, "high": high}
    zennit_composite = make_composite(composite, canonizers, **bounds)  # also validates the names
    resolve_layers(model, [layer])
    if engine not in ("auto", "fast", "zennit"):
        raise AttributionConfigError(f"unknown engine {engine!r}; choose one of ['auto', 'fast', 'zennit'].")
    if engine != "zennit":
        try:
            return FastConditionalExplainer(model, composite, canonizers, layer, **bounds)
        except UnsupportedModel as error:
            if engine == "fast":
                raise AttributionConfigError(f"the fast LRP engine cannot explain this model: {error}") from error
            log.warning("fast LRP engine not used for conditional heatmaps of %s: %s; using zennit's hooks.", type(model).__name__, error)
    return ConditionalExplainer(model, zennit_composite, layer)


def top_rows_by_concept(
    concepts: Any,
    channels: Sequence[int],
    k: int,
    rows: np.ndarray | None = None,
    chunk: int = READ_CHUNK,
) -> dict[int, np.ndarray]:
    """The ``k`` rows with the highest stored relevance of each channel (relevance maximisation).

    Args:
        concepts: (N, C) concept relevances, a NumPy array or the ``h5py`` dataset
            ``concepts/<layer>`` of ``attributions.h5``; read in row chunks of ``chunk``.
        channels: the channels to rank rows for.
        k: rows per channel.
        rows: optional ascending candidate rows (e.g. one class); default all rows.

    Returns:
        ``{channel: rows}``, highest relevance first; ties go to the lower row, so the
        result is deterministic.
    """
    channels = [int(channel) for channel in channels]
    candidates = np.arange(concepts.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    best_rows = {channel: np.empty(0, dtype=np.int64) for channel in channels}
    best_values = {channel: np.empty(0, dtype=np.float64) for channel in channels}
    for start in range(0, candidates.size, chunk):
        block_rows = candidates[start : start + chunk]
        block = _read_rows(concepts, block_rows)
        for channel in channels:
            values = np.concatenate([best_values[channel], block[:, channel].astype(np.float64)])
            keys = np.concatenate([best_rows[channel], block_rows])
            values = np.nan_to_num(values, nan=-np.inf)
            order = np.lexsort((keys, -values))[:k]
            best_rows[channel], best_values[channel] = keys[order], values[order]
    return best_rows


def collected_top_rows(
    collected: tuple[np.ndarray, np.ndarray] | None, channels: Sequence[int], k: int
) -> dict[int, np.ndarray] | None:
    """:func:`top_rows_by_concept` over the whole dataset, read from the reference rows the
    attribution pass collected (``Attributions.references[layer]``: rows and values, K×C).

    Returns ``None`` when nothing was collected or fewer than ``k`` rows per channel were
    kept: then scan the stored relevances with :func:`top_rows_by_concept`.
    """
    if collected is None or len(collected[0]) < k:
        return None
    rows = collected[0]
    return {int(channel): rows[:k, int(channel)][rows[:k, int(channel)] >= 0] for channel in channels}


def _read_rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for ascending rows; one slice read when they are consecutive."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return np.asarray(array[int(rows[0]) : int(rows[-1]) + 1])
    return np.asarray(array[rows])


def relevance_box(
    heatmap: np.ndarray, mass: float = 0.6, pad: float = 0.15, min_fraction: float = 0.25
) -> tuple[int, int, int, int]:
    """The part of an image a conditional heatmap points at, as ``(top, bottom, left, right)``.

    The box bounds the fewest pixels that together hold ``mass`` of the heatmap's positive
    relevance (the evidence *for* the class), padded by ``pad`` of the image side on every
    edge and grown to at least ``min_fraction`` of each side, so a one-pixel concept still
    shows some context. A map without positive relevance gives the whole image.
    Bottom and right are exclusive, ready for slicing.
    """
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    height, width = values.shape
    positive = np.clip(values, 0.0, None).reshape(-1)
    total = positive.sum()
    if total <= 0:
        return 0, height, 0, width
    order = np.argsort(-positive, kind="stable")
    needed = int(np.searchsorted(np.cumsum(positive[order]), mass * total)) + 1
    ys, xs = np.unravel_index(order[:needed], (height, width))
    top, bottom = _padded(int(ys.min()), int(ys.max()) + 1, height, pad, min_fraction)
    left, right = _padded(int(xs.min()), int(xs.max()) + 1, width, pad, min_fraction)
    return top, bottom, left, right


def _padded(start: int, stop: int, side: int, pad: float, min_fraction: float) -> tuple[int, int]:
    """Grow ``[start, stop)`` by ``pad * side`` each way and to ``min_fraction * side``, inside ``[0, side)``."""
    margin = int(round(pad * side))
    start, stop = max(0, start - margin), min(side, stop + margin)
    minimum = min(side, max(1, int(np.ceil(min_fraction * side))))
    missing = minimum - (stop - start)
    if missing > 0:
        start = max(0, start - missing // 2)
        stop = min(side, start + minimum)
        start = max(0, stop - minimum)
    return start, stop


def iter_conditional_heatmaps(
    explainer: ConditionalExplainer | FastConditionalExplainer,
    read: Callable[[np.ndarray], np.ndarray],
    requests: Sequence[tuple[int, int, int]],
    batch_size: int = 32,
    model_input: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Conditional heatmaps for many ``(row, target, channel)`` requests, batched.

    Requests are de-duplicated and explained ``batch_size`` at a time, one channel each,
    in row order; only one batch of images is in memory at a time. Requests of the same row
    and target share one image row (one forward pass with the fast engine).

    Args:
        explainer: an entered ``ConditionalExplainer`` or ``FastConditionalExplainer``.
        read: images (n, C, H, W) of ascending unique rows (as stored: display pixels).
        requests: ``(row, target class, channel)`` triples.
        model_input: maps ``read``'s images to the model's input (e.g. normalisation);
            default: unchanged.

    Yields:
        ``(row, channel, heatmap (H, W) float64, image as read (C, H, W))``.
    """
    unique = sorted({(int(row), int(target), int(channel)) for row, target, channel in requests})
    n_channels: int | None = None
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        rows = np.array(sorted({row for row, _, _ in batch}), dtype=np.int64)
        images = np.asarray(read(rows))
        inputs = images if model_input is None else model_input(images)
        tensor = inputs if isinstance(inputs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(inputs))
        if n_channels is None:
            n_channels = explainer.n_channels(tensor[:1])
        position = {int(row): index for index, row in enumerate(rows.tolist())}
        pairs = sorted({(row, target) for row, target, _ in batch})
        pair_index = {pair: index for index, pair in enumerate(pairs)}
        images_in = tensor[torch.tensor([position[row] for row, _ in pairs], dtype=torch.long)]
        targets = torch.tensor([target for _, target in pairs], dtype=torch.long)
        picks = torch.tensor([pair_index[(row, target)] for row, target, _ in batch], dtype=torch.long)
        masks = channel_masks(n_channels, [[channel] for _, _, channel in batch], tensor.dtype)
        explained = explainer.explain(images_in, targets, masks, picks)
        for (row, _, channel), heatmap in zip(batch, explained.heatmaps):
            yield row, channel, heatmap.double().numpy(), images[position[row]]


def conditional_heatmaps_for_rows(
    explainer: ConditionalExplainer | FastConditionalExplainer,
    read: Callable[[np.ndarray], np.ndarray],
    requests: Sequence[tuple[int, int, int]],
    batch_size: int = 32,
) -> dict[tuple[int, int], np.ndarray]:
    """``{(row, channel): heatmap}`` for ``requests`` (see ``iter_conditional_heatmaps``)."""
    return {
        (row, channel): heatmap
        for row, channel, heatmap, _ in iter_conditional_heatmaps(explainer, read, requests, batch_size)
    }
