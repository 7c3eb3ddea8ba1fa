"""Where a member's distinguishing evidence is: the pixels it looks at and its class does not.

A cluster member's relevance map says where the model looked for *this* sample; the rest
of its class says where the model usually looks for the class. The member's evidence is
the part of its relevance in excess of the rest's, on the member's own image: a corner
tag, a frame, a mark wherever it sits in this image, a watermark over the object. It is
localised per member, not per cluster, so evidence that moves from image to image (a mark
at a random place, a sticker) is still found.

For each member, with ``s`` its positive relevance smoothed and scaled to sum 1 and ``r``
the rest's mean of the same:

1. ``excess = s - r``; only pixels with a positive excess are candidates;
2. the largest excesses are taken until they cover ``mass`` of the member's total positive
   excess, but at most ``area`` of the image's pixels (evidence must be small enough that
   pasting it is not pasting the whole image);
3. the mask is brought to the image's resolution (heatmaps may be pooled) and grown by one
   pixel, because LRP relevance sits on edges and a stamp's interior carries little.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

#: Gaussian smoothing of relevance maps, in heatmap pixels, before excesses are compared:
#: single-pixel LRP noise must not win over a coherent region.
SMOOTHING_SIGMA = 1.0
#: Excesses below this (shares sum to 1) are rounding, not evidence.
EXCESS_TOLERANCE = 1e-9


def relevance_shares(maps: np.ndarray, sigma: float = SMOOTHING_SIGMA) -> np.ndarray:
    """(n, h, w) positive relevance, smoothed, each map scaled to sum 1 (all-zero maps stay 0)."""
    positive = np.maximum(np.asarray(maps, dtype=np.float64), 0.0)
    if sigma > 0:
        positive = gaussian_filter(positive, sigma=(0, sigma, sigma), mode="nearest")
    total = positive.reshape(len(positive), -1).sum(axis=1)
    return positive / np.where(total > 0, total, 1.0)[:, None, None]


def rest_share(maps: np.ndarray, sigma: float = SMOOTHING_SIGMA) -> np.ndarray:
    """(h, w) where a group looks on average: the mean of its :func:`relevance_shares`."""
    if len(maps) == 0:
        return np.zeros(np.asarray(maps).shape[1:])
    return relevance_shares(maps, sigma).mean(axis=0)


def resize_mask(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) boolean masks brought to (n, H, W) by nearest-neighbour sampling."""
    n, h, w = masks.shape
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return masks[:, rows[:, None], cols[None, :]]


def excess_masks(member_maps: np.ndarray, rest: np.ndarray, area: float, mass: float) -> np.ndarray:
    """(m, h, w) boolean evidence masks of ``m`` members at the heatmaps' resolution.

    Args:
        member_maps: (m, h, w) signed relevance maps of the members.
        rest: (h, w) the rest of the class's :func:`rest_share`.
        area: largest share of the heatmap's pixels one mask may take.
        mass: share of the member's positive excess the mask covers.

    A member without positive excess (it looks exactly where its class looks) gets an
    empty mask.
    """
    shares = relevance_shares(member_maps)
    m, h, w = shares.shape
    excess = (shares - rest[None]).reshape(m, -1)
    limit = max(1, int(np.floor(area * h * w)))
    masks = np.zeros((m, h * w), dtype=bool)
    for i in range(m):
        positive = np.where(excess[i] > EXCESS_TOLERANCE, excess[i], 0.0)
        total = positive.sum()
        if total <= 0:
            continue
        order = np.argsort(-positive, kind="stable")[:limit]
        covered = np.cumsum(positive[order])
        count = min(len(order), int(np.searchsorted(covered, mass * total)) + 1)
        chosen = order[:count]
        masks[i, chosen[positive[chosen] > 0]] = True
    return masks.reshape(m, h, w)


def image_masks(masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Heatmap-resolution masks at the images' (H, W), each grown by one pixel."""
    full = resize_mask(masks, image_size)
    return np.stack([binary_dilation(mask) if mask.any() else mask for mask in full]) if len(full) else full


#: The control's donor is drawn among this share of the rest that looks most under the mask.
MATCHED_SHARE = 0.05


def matched_donors(masks: np.ndarray, rest_maps: np.ndarray, rng: np.random.Generator, share: float = MATCHED_SHARE) -> np.ndarray:
    """For each mask, a rest-of-class sample that looks there: the control's donor.

    Index into ``rest_maps`` (n, h, w), drawn among the ``share`` of rest samples with the
    largest share of their relevance under the mask. The control then copies the same
    region from a sample of the class whose *object* is there, so a region that is simply
    part of the object (wherever objects sit) moves hosts about as much from either donor,
    while an artifact, absent from the rest, does not. Drawing from a quarter rather than
    the very best match keeps the few artifact carriers that the clustering left in the
    rest from becoming every control donor.
    """
    shares = relevance_shares(rest_maps).reshape(len(rest_maps), -1)
    under = masks.reshape(len(masks), -1).astype(np.float64) @ shares.T  # (m, n)
    choices = max(1, int(np.ceil(share * under.shape[1])))
    top = np.argsort(-under, axis=1, kind="stable")[:, :choices]
    return top[np.arange(len(masks)), rng.integers(0, top.shape[1], size=len(masks))]
