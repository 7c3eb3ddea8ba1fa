"""Concept Relevance Propagation (CRP): heatmaps conditioned on channels of one layer.

A concept is a channel of a layer (``features.conv4`` channel 12). Its *conditional
heatmap* for a class answers "where in the input is the evidence that flows through this
channel?": the LRP backward pass of the class logit is run as usual, but at the layer's
output every channel outside the condition gets zero relevance. Every LRP rule is linear in
the relevance it receives (the forward activations are fixed), so masks that partition the
channels give conditional heatmaps that sum to the full heatmap exactly (up to rounding).

Both LRP engines compute them: ``explain_conditional(images, targets, layer, masks, picks)``
of an ``LRPExplainer`` (``spray.attribution.lrp``; built by
``spray.attribution.select.make_explainer``) takes one channel mask per condition and, in
``picks``, the image row each condition explains. zennit's engine repeats the picked rows
along the batch axis (a forward and a full backward per condition); the fast engine runs the
forward pass and the backward sweep above the layer once per image and only the part below
the layer once per condition, with the same heatmaps. This module turns channel sets into
masks (``channel_masks``, ``explain_channels``) and batches many ``(row, target, channel)``
requests (``iter_conditional_heatmaps``).

Reference samples (relevance maximisation): the samples of the dataset on which a concept
carries the most relevance. The attribution pass collects the top rows of every channel
while it writes (``references/<layer>`` in ``attributions.h5``, read by
``collected_top_rows``); for files without them ``top_rows_by_concept`` scans the stored
relevances ``concepts/<layer>``. Neither needs another pass over the images. Their conditional heatmaps point at the part of each image the
concept responds to; ``relevance_box`` finds that part so the picture can be cropped to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from spray.attribution.lrp import ConditionalExplanation, LRPExplainer

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


def explain_channels(
    explainer: LRPExplainer, image: torch.Tensor, target: int, layer: str, channel_sets: Sequence[Sequence[int]]
) -> ConditionalExplanation:
    """Conditional heatmaps of one image (C, H, W) at ``layer`` for several channel sets, one row each."""
    masks = channel_masks(explainer.n_channels(layer, image[None]), channel_sets, dtype=image.dtype)
    picks = torch.zeros(len(channel_sets), dtype=torch.long)
    return explainer.explain_conditional(image[None], torch.tensor([int(target)]), layer, masks, picks)


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
    explainer: LRPExplainer,
    layer: str,
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
        explainer: an entered explainer with ``layer`` among its concept layers.
        layer: the concept layer the channels belong to.
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
            n_channels = explainer.n_channels(layer, tensor[:1])
        position = {int(row): index for index, row in enumerate(rows.tolist())}
        pairs = sorted({(row, target) for row, target, _ in batch})
        pair_index = {pair: index for index, pair in enumerate(pairs)}
        images_in = tensor[torch.tensor([position[row] for row, _ in pairs], dtype=torch.long)]
        targets = torch.tensor([target for _, target in pairs], dtype=torch.long)
        picks = torch.tensor([pair_index[(row, target)] for row, target, _ in batch], dtype=torch.long)
        masks = channel_masks(n_channels, [[channel] for _, _, channel in batch], tensor.dtype)
        explained = explainer.explain_conditional(images_in, targets, layer, masks, picks)
        for (row, _, channel), heatmap in zip(batch, explained.heatmaps):
            yield row, channel, heatmap.double().numpy(), images[position[row]]


def conditional_heatmaps_for_rows(
    explainer: LRPExplainer,
    layer: str,
    read: Callable[[np.ndarray], np.ndarray],
    requests: Sequence[tuple[int, int, int]],
    batch_size: int = 32,
) -> dict[tuple[int, int], np.ndarray]:
    """``{(row, channel): heatmap}`` for ``requests`` (see ``iter_conditional_heatmaps``)."""
    return {
        (row, channel): heatmap
        for row, channel, heatmap, _ in iter_conditional_heatmaps(explainer, layer, read, requests, batch_size)
    }
