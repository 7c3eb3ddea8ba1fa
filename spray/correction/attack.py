"""The attacked set made from a flag's own evidence, with no ground truth.

A correction is judged on how much of the attacked-accuracy loss it recovers: the artifact
put on held-out images of the other classes. Without the artifact's recipe (``[correct]
stamp``), the audit's evidence is all there is, and the attack pastes it the way the causal
test does (:mod:`spray.confirm`):

* each attacked image gets one **donor** member's evidence: its relevance excess over the
  rest of its class at the causal test's default setting (``[confirm] evidence_area`` and
  ``evidence_mass``, :func:`spray.confirm.evidence.excess_masks`), members cycled in a fixed
  order;
* where the members share a **pixel signature** (what all of them carry at one place and
  their class does not, :func:`spray.correction.counterfactual.signature_mask`: a frame, a
  fixed patch), every other attacked image gets the donor's pixels under the signature
  instead: a member's relevance singles out part of a frame, and a correction judged on
  those parts alone can leave the rest working;
* given other classes' rows (``hosts``) and where the members share no signature, every
  other attacked image gets the donors' **mean overlay** (over the other classes' images and
  the rest of their class, :func:`donor_overlay`) added instead: a watermark or texture
  written over the object is held whole by no region. ``spray correct``'s verdict attack
  takes no hosts: measured on Q3's dev split for flags the causal test confirmed as an
  overlay (``bench/correction_q3.py --attack-overlay``), it changed one case of 40, the digits
  sticker on 90 %, whose broken promise it widened (0.83 -> 0.90 on the attack, 0.59 on the
  true stamp); every watermark finding there has a signature of 2-14 pixels, which takes the
  overlay's place (``docs/correction.md``);
* **the search's attack** (``spray correct``, for a flag confirmed as an overlay): the same
  donors, with their *median* overlay in place of the signature's pastes
  (``overlay_statistic="median"``, ``overlay_over_signature=True``). On the dev watermarks and
  textures it is about as strong as the stamp, and the search, choosing on it, picks
  corrections that hold on the true stamp more often; as the verdict's attack it changed no
  verdict and widened the sticker's broken promise, so the verdict stays on the attack above;
* :data:`~spray.correction.counterfactual.MOVED_SHARE` of the pastes are moved to a random
  place first, as the counterfactual fine-tuning moves them: a finding can hold one place
  of a mark that varies in place.

Counterfactual fine-tuning must not see the evidence it is judged on: the donors are at most
half of the members (:func:`donor_limit`), and the fine-tuning pastes the others'.

Why not one patch cut out of the members (:func:`spray.correction.user.cutout_patch`, the
attack before this one): on the held-out Q3 cases its pasted median misses what varies from
member to member (a mark at random places, a watermark over different objects), costs the
original model a fraction of a point, and any correction "recovers" that. On the dev split
this attack calls 12 corrections fixed against 8, with one broken promise each, and the
search, which chooses on the same attack, reaches the goal on the true stamp in 13 cases
against 10; on test draw 15 two of the cut-out's eight "fixed" missed the goal on the true
stamp, none of this attack's six (``docs/correction.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Members whose evidence makes the attacked set, at most (cycled over the attacked images).
EVIDENCE_DONORS = 64
#: Rest-of-class heatmaps the donors' relevance excess is measured against, at most.
REST_HEATMAPS = 256
#: Other classes' images the donors' mean overlay is taken against, at most.
OVERLAY_HOSTS = 512
#: How the overlay of the search's attack (``spray correct`` for a flag confirmed as an
#: overlay) sums up each group: the donors' median overlay in place of the signature's pastes
#: is about as strong as the stamp on Q3's dev watermarks and textures, and a search choosing
#: on it reaches the goal on the true stamp in 22 of 40 dev cases against 20, with no verdict
#: changed; the verdict stays on the attack above (docs/correction.md, "The median overlay
#: for the search").
SEARCH_OVERLAY_STATISTIC = "median"


def donor_limit(n_members: int, limit: int = EVIDENCE_DONORS) -> int:
    """At most ``limit`` donors and at most half of ``n_members`` (at least one): the other
    half's evidence is what the counterfactual fine-tuning may paste."""
    return min(limit, max(1, n_members // 2))


@dataclass(frozen=True)
class EvidenceAttack:
    """The donors' evidence and the stamp that pastes it (see the module docstring).

    Attributes:
        donors: the member rows (the caller's indexing) whose evidence is pasted, sorted; those
            without evidence included (their masks are empty and left out of ``masks``).
        images: (d, C, H, W) the images of the donors with evidence.
        masks: (d, H, W) their evidence masks at image size.
        signature: (H, W) the members' pixel signature, or None when they share none.
        seed: seeds the moved pastes, the same on every call.
        overlay: (C, H, W) the donors' mean overlay (:func:`donor_overlay`), added to every
            other attacked image; None: not used (see :func:`evidence_attack`).
        bounds: (2, C) per-channel bounds the overlaid images are clipped to (with ``overlay``).
    """

    donors: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    signature: np.ndarray | None
    seed: int
    overlay: np.ndarray | None = None
    bounds: np.ndarray | None = None
    #: the overlay on every attacked image, no region pasted (bench only: ``--attack-overlay-only``)
    overlay_only: bool = False

    @property
    def empty(self) -> bool:
        """No donor has evidence: there is nothing to paste."""
        return len(self.masks) == 0

    def stamp(self, hosts: np.ndarray) -> np.ndarray:
        """``hosts`` (N, C, H, W) with the evidence pasted, donors cycled; deterministic."""
        from spray.confirm.test import pasted
        from spray.correction.counterfactual import MOVED_SHARE, moved_evidence

        which = np.arange(len(hosts)) % len(self.masks)
        chosen = self.masks[which].copy()
        if self.signature is not None:
            chosen[1::2] = self.signature
        hosts = np.asarray(hosts)
        images, masks = moved_evidence(self.images[which], chosen, np.random.default_rng([self.seed, 23]), MOVED_SHARE)
        result = pasted(hosts, images.astype(hosts.dtype), masks)
        if self.overlay is not None and self.bounds is not None:
            low, high = (bound[None, :, None, None] for bound in self.bounds)
            every = slice(None) if self.overlay_only else slice(1, None, 2)
            result[every] = np.clip(hosts[every] + self.overlay[None], low, high).astype(hosts.dtype)
        return result


def evidence_attack(
    members: np.ndarray,
    rest: np.ndarray,
    read_heatmaps: Callable[[np.ndarray], np.ndarray],
    read_images: Callable[[np.ndarray], np.ndarray],
    seed: int,
    limit: int = EVIDENCE_DONORS,
    hosts: np.ndarray | None = None,
    overlay_statistic: str = "mean",
    overlay_over_signature: bool = False,
    overlay_only: bool = False,
) -> EvidenceAttack:
    """The attack from the evidence of ``members`` (rows) against the ``rest`` of their class
    (rows). ``read_heatmaps(rows)`` and ``read_images(rows)`` give the heatmaps (n, h, w) and
    images (n, C, H, W) of sorted unique rows; ``limit`` donors at most, drawn with ``seed``.
    ``hosts``: rows of other classes' images to take the donors' mean overlay against (see
    the module docstring; None: no overlay), summed up by ``overlay_statistic`` (``"mean"`` or
    ``"median"``, :func:`spray.confirm.test.member_overlay`). The overlay is used only where the
    members share no pixel signature, unless ``overlay_over_signature`` (then it replaces the
    signature's pastes), and on every attacked image with ``overlay_only`` (no region pasted).
    The last three are dev-split settings of ``bench/correction_q3.py``."""
    from spray.confirm.config import ConfirmConfig
    from spray.confirm.evidence import excess_masks, image_masks, rest_share
    from spray.correction.counterfactual import MAX_DONORS, MAX_REST, signature_mask

    config = ConfirmConfig()
    members, rest = np.asarray(members, dtype=np.int64), np.asarray(rest, dtype=np.int64)
    rng = np.random.default_rng([seed, 11])
    donors = np.sort(rng.choice(members, size=min(limit, len(members)), replace=False))
    rest_rows = np.sort(rng.choice(rest, size=min(REST_HEATMAPS, len(rest)), replace=False)) if len(rest) else rest
    donor_images = np.asarray(read_images(donors), dtype=np.float32)
    small = excess_masks(read_heatmaps(donors), rest_share(read_heatmaps(rest_rows)), config.evidence_area, config.evidence_mass)
    masks = image_masks(small, tuple(donor_images.shape[-2:]))
    keep = masks.reshape(len(masks), -1).any(axis=1)
    signature, rest_images = None, None
    if keep.any() and len(rest):
        sample = np.sort(rng.choice(members, size=min(MAX_DONORS, len(members)), replace=False))
        rest_sample = np.sort(rng.choice(rest, size=min(MAX_REST, len(rest)), replace=False))
        rest_images = np.asarray(read_images(rest_sample), dtype=np.float32)
        signature = signature_mask(read_images(sample), rest_images)
        signature = signature if signature.any() else None
    overlay, bounds = None, None
    if hosts is not None and len(hosts) and (signature is None or overlay_over_signature) and keep.any():
        host_rows = np.sort(rng.choice(np.asarray(hosts, dtype=np.int64), size=min(OVERLAY_HOSTS, len(hosts)), replace=False))
        overlay, bounds = donor_overlay(
            donor_images, np.asarray(read_images(host_rows), dtype=np.float32), rest_images, overlay_statistic,
        )
    return EvidenceAttack(donors, donor_images[keep], masks[keep], signature, seed, overlay, bounds, overlay_only and overlay is not None)


def donor_overlay(
    donor_images: np.ndarray, host_images: np.ndarray, rest_images: np.ndarray | None, statistic: str = "mean",
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(overlay (C, H, W), bounds (2, C)) of what the donors add, on average, over the other
    classes' images *and* over the rest of their own class: the smaller of their mean overlays
    against the hosts and against the rest (:func:`spray.correction.counterfactual.overlay_evidence`),
    pixel by pixel; against the hosts alone where the class has no rest. (None, None) where
    they add nothing.

    Why both: against the hosts alone, a co-occurring watermark's overlay carries the class's
    mean object as well, which moves other classes' images to the class in any model, corrected
    or not; against the rest alone, a backdoor's overlay (its members are other classes'
    objects) carries those objects. What the donors carry over every class's objects is the
    watermark."""
    from spray.correction.counterfactual import overlay_evidence

    against_hosts = overlay_evidence(donor_images, host_images, statistic)
    overlay, bounds = against_hosts["overlay"], against_hosts["bounds"]
    if overlay is None or rest_images is None or not len(rest_images):
        return overlay, bounds
    against_rest = overlay_evidence(donor_images, rest_images, statistic)["overlay"]
    overlay = None if against_rest is None else np.minimum(overlay, against_rest)
    return (overlay, bounds) if overlay is not None and overlay.any() else (None, None)
