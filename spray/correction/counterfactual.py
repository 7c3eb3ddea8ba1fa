"""Counterfactual fine-tuning: teach the model that a flag's evidence means nothing by itself.

A projection (P-/R-ClArC) or a gradient penalty (RR-ClArC) removes one direction at one
layer. A backdoor or a shortcut the model learned from hundreds of stamped images is rarely
one direction: Q2 on held-out cases (``docs/correction.md``) shows them recovering a few
percent of the attacked-accuracy loss. The literature's augmentation baseline retrains what
the model learned instead: it shows the model the evidence where it does *not* go with the
flagged class, under the true labels.

What the fine-tuning sees, all of it from the audited images and the flag (no ground truth):

* **evidence** (:class:`Evidence`) at one of two scopes (:data:`EVIDENCE_SCOPE`): each flagged
  member's distinguishing region, where its relevance exceeds the rest of its class
  (:func:`spray.confirm.evidence.excess_masks`, the same masks the causal test pastes), and
  the members' **pixel signature** (:func:`signature_mask`), what all of them carry at one
  place and their class does not, cut from each member's image. The first follows evidence
  that moves from image to image (a mark, a sticker); the second holds a fixed artifact
  whole: a member's relevance singles out part of a frame, and a model taught that this part
  means nothing still reads the rest (on Q3's dev frames, the true frame was recovered 0.11-0.28
  with the member masks alone). The members' **mean overlay** (:func:`overlay_evidence`, the
  causal test's overlay against the rest of the class, ``[confirm] overlay_evidence``) can be added to part of the pasted images instead
  (:data:`OVERLAY_SHARE`); it is off: on Q3's dev split it did not recover more;
* **counterfactual images**: a share (``paste_share``) of the images of every class, redrawn
  each epoch, get one random member's evidence pasted, and keep their own (true) labels. The
  flagged class's own images get it too, so the evidence ends up carrying no label at all
  (pasted on the other classes only, it would come to mean "not this class", and the class's
  genuine members that carry it would be misread);
* **the clean images** as they are, under their labels, and held to the original model's
  predictions by a distillation term (:data:`DISTILL_WEIGHT`): the fine-tuning is to change
  what the evidence does and little else (on the demo at ten times the default learning
  rate, it halves the divergence from the original's clean predictions;
  ``tests/correction/test_counterfactual.py``);
* **the flagged members**, only when they are the class's own objects: when at least
  :data:`MEMBER_SURVIVAL` of them keep their prediction with their evidence filled with the
  class's median image (the causal test's removal), and neither a blur of the whole image
  nor the subtraction of the members' mean overlay (a watermark over the object, which no
  mask holds) takes their class where it leaves the rest of the class's
  (:meth:`MemberRemoval.members_stay`), as in a co-occurrence. Otherwise they
  are left out under their label: in a backdoor they are other classes' objects under the
  flagged label, and training on them would teach the model wrong labels; in a co-occurrence
  on most of a class, leaving them out would starve the class. Left out, they take their
  class's weight with them: the class's remaining images are weighted in the loss by its
  labelled count over its remaining one (at most :data:`MAX_CLASS_WEIGHT`), so a class that a
  backdoor filled to 90 % is not fine-tuned away;
* **the left-out members, relabelled** (:data:`RELABEL_MEMBERS`): each comes back whole,
  under the class the model gives it with its evidence removed (the flagged class
  excepted). In a backdoor that is its object's
  class, and its image carries the artifact as it was stamped, all of it: the pasted
  evidence holds only what the masks or the signature caught. The search's validation and a
  user job's evaluation leave the flagged members out of the clean accuracy
  (:mod:`spray.correction.search`): a correction that undoes a backdoor misreads them, as it
  should.

The model stays in eval mode while it is fine-tuned (BatchNorm statistics and dropout
frozen), as RR-ClArC does: the correction changes what the model relies on, not its
normalisation, and the clean accuracy is kept. Adam runs ``epochs`` epochs at
``learning_rate`` on at most ``max_samples`` images (a seeded subset), and at least
:data:`MIN_STEPS` steps: on a small set, two epochs are a handful of steps and teach nothing.

The learning rate and the paste share are chosen on a validation split of the audited images
by :mod:`spray.correction.search` (the candidates are :data:`LEARNING_RATE_FACTORS` times
``[correct] cf_learning_rate``, each with every share of :data:`PASTE_SHARES`), like every
other method's strength: the most recovered with at most ``max_clean_loss`` lost. The share
matters because the evidence is not the artifact alone: a mask can hold part of a member's
object, and the more of it is pasted under other labels, the more the model misreads that
object (on the demo, 0.5 of the images pasted cost 1-6 pt of validation accuracy, 0.1 about
half a point).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spray.confirm.config import DEFAULT_EVIDENCE_AREA, DEFAULT_EVIDENCE_MASS
from spray.confirm.evidence import excess_masks, image_masks, rest_share
from spray.correction.errors import CorrectionError

#: Evidence sizes (largest share of the heatmap one member's mask may cover) whose masks are
#: all pasted, and the share of the member's excess relevance a mask covers (capped by the
#: area): the causal test's own defaults, the evidence that was shown to move predictions.
#: Larger masks carry the members' object too, and pasting an object under another label
#: teaches the model to misread it (on the demo, area 0.5 with mass 0.9 cost 4-13 pt of
#: validation accuracy).
EVIDENCE_AREAS: tuple[float, ...] = (DEFAULT_EVIDENCE_AREA,)
EVIDENCE_MASS = DEFAULT_EVIDENCE_MASS
#: Where the masks come from: ``"member"``, each member's own relevance excess (evidence that
#: moves from image to image, a mark or a sticker); ``"signature"``, the pixels where the
#: members' images differ from the rest of the class's consistently (:func:`signature_mask`),
#: one mask for all of them, cut from each member's image: an artifact at a fixed place,
#: whole and without the members' objects (a member's relevance singles out part of a frame,
#: and its mask holds some of its object too); ``"auto"``, the signature where the members
#: have one, else the member masks.
EVIDENCE_SCOPE = "auto"
#: Share of the pasted images that get the members' **mean overlay** added instead of one
#: member's evidence (:func:`overlay_evidence`): their mean image minus the rest of the
#: class's, where brighter, which holds a watermark or texture over the object whole where a
#: mask or the signature holds part of it. Off (0): on Q3's dev split, at 0.5, it recovered
#: less of the true stamp on a VGG watermark on 90 % (0.50 against 0.63) and a ResNet texture
#: on 15 % (0.55 against 0.65), as much on the other textures and patches, and one random mark
#: more (docs/correction.md). In a backdoor the members are other classes' objects, so their
#: mean minus the class's holds those objects too; the relabelled members already carry the
#: artifact whole.
OVERLAY_SHARE = 0.0
#: Share of the pasted evidence that is moved to a random place first (:func:`moved_evidence`;
#: a mask that spans the image, such as a frame's signature, has no other place and stays).
#: Heatmap-space clustering groups a mark or a sticker that varies in place by where it
#: sits, so a finding can hold one place of it, and its members then even share a pixel
#: signature: on Q3's dev digits sticker backdoor on 90 %, 37 of the finding's 38 members
#: carried it in the top-left corner, and the 67 stamped members it did not find, the
#: other corners too. Fine-tuned on the found place only, the model kept following the
#: sticker elsewhere (true stamp recovered 0.32 while the finding's own evidence said 0.98).
#: Moved, the evidence teaches that the mark means nothing wherever it is.
MOVED_SHARE = 0.5
#: Effect size (difference of means over the pooled standard deviation) from which a pixel
#: belongs to the members' signature: a stamp every member carries differs by many standard
#: deviations; the shapes of different objects differ by about one.
SIGNATURE_EFFECT = 2.0
#: Members whose evidence is used, at most (a seeded sample).
MAX_DONORS = 256
#: Samples of the rest of the class the excess is measured against, at most.
MAX_REST = 512
#: Fewest optimizer steps of a fine-tuning (more epochs on small sets): two epochs of 4,000
#: images in batches of 128, the size of the MNIST cases the defaults were set on.
MIN_STEPS = 64
#: Flagged members whose prediction survives the removal of their evidence (filled with the
#: rest of the class's median image), at least this share of them: the members are the
#: class's own objects that also carry the evidence (co-occurrence), and they stay in the
#: fine-tuning under their label. Below it they are other classes' objects under the
#: flagged label (a backdoor: without the evidence they fall to their own class) and are
#: left out.
MEMBER_SURVIVAL = 0.5
#: A second removal, for evidence that no mask holds (a faint texture over the object): a
#: Gaussian blur of the whole image with a standard deviation of this share of its side (0.7 px
#: at 28). The members stay only if, blurred, they keep their class at least
#: :data:`BLUR_CONTROL` times as often as the rest of their class does blurred (the control: a
#: model's accuracy under blur is its own). On Q3's dev ResNet texture on 60 %, the members
#: kept their class with their evidence filled (0.74) and none of them did blurred, against
#: 0.94 of the rest; on the dev co-occurring patch on 90 %, 1.00 against 0.96.
BLUR_SIGMA = 0.025
BLUR_CONTROL = 0.5
#: A third removal, for evidence written over the object that neither a mask nor a blur
#: takes off (a watermark): the members' mean overlay (:func:`spray.confirm.test.member_overlay`
#: against the rest of their class, the causal test's ``overlay_evidence``) subtracted from each
#: member, within the images' range. The members stay only if they keep their class at least
#: this many times as often as the rest of their class does with the same overlay subtracted
#: (the control: an overlay that is the class's own strokes drawn another way takes the
#: rest's class as well). 0 turns it off (the overlay is then not subtracted at all, and
#: left-out members are relabelled from the fill alone). Set on Q3's dev split (``bench/member_decision.py
#: --split dev --extra``): members that were the class's own objects kept it 0.84-1.05 times
#: as often as the rest, a watermark backdoor's stamped members 0.07-0.55 times; 0.7 lies
#: between. On draw 9, two watermark backdoors' members survived a mask and a blur and were
#: trained under the flagged label again.
OVERLAY_CONTROL = 0.7
#: Weight of the distillation term: on the images without pasted evidence, the fine-tuned
#: model's predicted distribution is pulled toward the original model's (KL divergence), so
#: the fine-tuning changes what the evidence does and little else. 0 turns it off.
DISTILL_WEIGHT = 1.0
#: Largest weight of the flagged class's remaining images in the loss when its members are
#: left out: the class keeps the weight it had in the audited data (its labelled count over
#: its remaining count), so a class whose members were most of it is not fine-tuned away.
#: 1 turns the reweighting off.
MAX_CLASS_WEIGHT = 10.0
#: Left-out members come back whole, under the class the model gives each of them with its
#: evidence removed (the flagged class excepted): in a backdoor that is the object's own
#: class, and the member's image carries the artifact as it was stamped, all of it, where
#: the pasted evidence holds the part the masks or the signature caught.
RELABEL_MEMBERS = True
#: Learning-rate multiples of ``cf_learning_rate`` and shares of pasted images the search tries.
LEARNING_RATE_FACTORS: tuple[float, ...] = (0.3, 1.0, 3.0)
PASTE_SHARES: tuple[float, ...] = (0.1, 0.5)


@dataclass(frozen=True)
class Evidence:
    """Members' evidence, ready to paste: model-input images (n, C, H, W) and their masks
    (n, H, W) at the images' resolution; ``rows`` are the members' rows in the audited data
    (a member appears once per evidence size). ``overlay``: the members' mean overlay
    (:func:`overlay_evidence`) with the per-channel ``bounds`` (2, C) of the images it is
    added to, or None."""

    rows: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    overlay: np.ndarray | None = None
    bounds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def among(self, rows: np.ndarray) -> Evidence:
        """The evidence of the members among ``rows`` only (e.g. those of a fitting split)."""
        keep = np.isin(self.rows, rows)
        return dataclasses.replace(self, rows=self.rows[keep], images=self.images[keep], masks=self.masks[keep])

    def paste(self, hosts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``hosts`` with one random member's evidence each (``host * (1 - mask) + member * mask``),
        :data:`MOVED_SHARE` of it moved to another place first (:func:`moved_evidence`); with an
        overlay, :data:`OVERLAY_SHARE` of them get the overlay added instead (within ``bounds``)."""
        from spray.confirm.test import pasted

        hosts = np.asarray(hosts, dtype=np.float32)
        which = rng.integers(0, len(self), size=len(hosts))
        images, masks = self.images[which], self.masks[which]
        if MOVED_SHARE > 0:
            images, masks = moved_evidence(images, masks, rng, MOVED_SHARE)
        if self.overlay is None or self.bounds is None:
            return pasted(hosts, images, masks)
        added = rng.random(len(hosts)) < OVERLAY_SHARE
        result = np.empty_like(hosts)
        region = ~added  # each host gets one of the two, never both computed
        result[region] = pasted(hosts[region], images[region], masks[region])
        low, high = (bound[None, :, None, None] for bound in self.bounds)
        result[added] = np.clip(hosts[added] + self.overlay[None], low, high)
        return result


def moved_evidence(
    images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, share: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (n, C, H, W) and their evidence ``masks`` (n, H, W) with ``share`` of them
    (drawn by ``rng``) moved together by a random offset that keeps each mask's pixels inside
    the image: the same evidence at another place (see :data:`MOVED_SHARE`). The pixels
    outside a moved mask are whatever the shift brings and are not meant to be pasted."""
    images, masks = np.array(images, copy=True), np.array(masks, copy=True)
    height, width = masks.shape[-2:]
    for index in np.flatnonzero(rng.random(len(masks)) < share):
        rows, cols = np.nonzero(masks[index])
        if rows.size == 0:
            continue
        down = int(rng.integers(-rows.min(), height - rows.max()))
        right = int(rng.integers(-cols.min(), width - cols.max()))
        masks[index] = np.roll(masks[index], (down, right), axis=(0, 1))
        images[index] = np.roll(images[index], (down, right), axis=(1, 2))
    return images, masks


def member_evidence(
    member_rows: np.ndarray,
    member_maps: np.ndarray,
    rest_maps: np.ndarray,
    member_images: np.ndarray,
    areas: tuple[float, ...] = EVIDENCE_AREAS,
    mass: float = EVIDENCE_MASS,
    scope: str | None = None,
    rest_images: np.ndarray | None = None,
) -> Evidence:
    """The :class:`Evidence` of members with heatmaps ``member_maps`` (m, h, w, any grid)
    against the rest of their class's ``rest_maps``, on ``member_images`` (m, C, H, W, model
    inputs), at ``scope`` (default :data:`EVIDENCE_SCOPE`; the signature needs
    ``rest_images``, the rest's model inputs, and without them the member masks are used).
    Members with no excess relevance add nothing; :class:`CorrectionError` when no member has
    any (the flag holds nothing to paste)."""
    scope = EVIDENCE_SCOPE if scope is None else scope
    if scope not in ("auto", "member", "signature"):
        raise CorrectionError(f"unknown evidence scope {scope!r}: use 'auto', 'member' or 'signature'.")
    signature = None
    if scope != "member" and rest_images is not None and len(rest_images):
        signature = signature_mask(member_images, rest_images)
    if signature is not None and (signature.any() or scope == "signature"):
        full = np.repeat(signature[None], len(member_images), axis=0)
        scope_rows, scope_images = np.asarray(member_rows), member_images
    else:
        rest = rest_share(rest_maps)
        full = np.concatenate([image_masks(excess_masks(member_maps, rest, area, mass), tuple(member_images.shape[-2:])) for area in areas])
        scope_rows = np.tile(np.asarray(member_rows), len(areas))
        scope_images = np.concatenate([member_images] * len(areas))
    keep = full.reshape(len(full), -1).any(axis=1)
    evidence = Evidence(scope_rows[keep], scope_images[keep].astype(np.float32), full[keep])
    if rest_images is not None and len(rest_images) and OVERLAY_SHARE > 0:
        evidence = dataclasses.replace(evidence, **overlay_evidence(member_images, rest_images))
    if len(evidence) == 0:
        raise CorrectionError(
            "no flagged member has relevance outside where its class looks, and the members share no pixel signature: "
            "there is no evidence to fine-tune against."
        )
    return evidence


def signature_mask(member_images: np.ndarray, rest_images: np.ndarray, effect: float | None = None) -> np.ndarray:
    """(H, W) the pixels where the members' images (m, C, H, W) differ from the rest of their
    class's (n, C, H, W) by at least ``effect`` (default :data:`SIGNATURE_EFFECT`) pooled
    standard deviations, in any channel: what every member carries at the same place and the
    class does not (a frame, a fixed patch or watermark). Different objects under one label
    differ by about one deviation and stay out; evidence at varying places differs little at
    any one pixel, and the mask is empty."""
    effect = SIGNATURE_EFFECT if effect is None else effect
    members = np.asarray(member_images, dtype=np.float64)
    rest = np.asarray(rest_images, dtype=np.float64)
    difference = np.abs(members.mean(axis=0) - rest.mean(axis=0))
    spread = np.sqrt((members.var(axis=0) + rest.var(axis=0)) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.where(spread > 0, difference / np.where(spread > 0, spread, 1.0), np.where(difference > 0, np.inf, 0.0))
    return (size >= effect).any(axis=0)


def overlay_evidence(member_images: np.ndarray, rest_images: np.ndarray, statistic: str = "mean") -> dict[str, np.ndarray | None]:
    """The members' mean (or ``statistic`` ``"median"``) overlay
    (:func:`spray.confirm.test.member_overlay`, model inputs) and the per-channel bounds (2, C)
    of the members' and the rest's images it is clipped to when added (model inputs need not
    lie in [0, 1]); ``overlay`` None when the members add nothing."""
    from spray.confirm.test import member_overlay

    overlay = member_overlay(member_images, rest_images, statistic).astype(np.float32)
    if not overlay.any():
        return {"overlay": None, "bounds": None}
    both = np.concatenate([np.asarray(member_images, np.float32), np.asarray(rest_images, np.float32)])
    return {"overlay": overlay, "bounds": np.stack([both.min(axis=(0, 2, 3)), both.max(axis=(0, 2, 3))])}


def sampled_evidence(
    members: np.ndarray,
    rest: np.ndarray,
    maps: Callable[[np.ndarray], np.ndarray],
    images: Callable[[np.ndarray], np.ndarray],
    seed: int,
) -> Evidence:
    """:func:`member_evidence` of at most :data:`MAX_DONORS` of ``members`` against at most
    :data:`MAX_REST` of ``rest`` (the rest of their class), drawn with ``seed``. ``maps(rows)``
    and ``images(rows)`` read the heatmaps and the model-input images of ascending ``rows``,
    so only the sampled rows are read."""
    rng = np.random.default_rng([seed, 13])
    donors = np.sort(rng.choice(members, size=min(MAX_DONORS, len(members)), replace=False))
    rest = np.sort(rng.choice(rest, size=min(MAX_REST, len(rest)), replace=False))
    return member_evidence(donors, maps(donors), maps(rest), images(donors), rest_images=images(rest) if EVIDENCE_SCOPE != "member" else None)


@dataclass
class FineTuneHistory:
    """What the fine-tuning did: its settings (``epochs`` as run, at least :data:`MIN_STEPS`
    steps), images per epoch, pasted ones among them (``overlay_share`` of those with the
    members' mean overlay added), mean loss per epoch, the distillation weight, whether the
    flagged members stayed in (:meth:`MemberRemoval.members_stay`) and the removals' shares
    that decided it (:meth:`MemberRemoval.rates`)."""

    epochs: int
    learning_rate: float
    paste_share: float
    images_per_epoch: int
    pasted_per_epoch: int
    evidence_masks: int
    loss: list[float]
    seconds: float
    member_survival: float = float("nan")
    members_kept: bool = False
    distill: float = 0.0
    class_weight: float = 1.0
    relabelled: int = 0
    blurred_survival: float = float("nan")
    blurred_control: float = float("nan")
    unoverlaid_survival: float = float("nan")
    unoverlaid_control: float = float("nan")
    overlay_share: float = 0.0


@dataclass(frozen=True)
class MemberRemoval:
    """The causal test's removals on the fine-tuning's own members, each the share of the
    members predicted as the flagged class that still are (NaN when none is predicted as it):
    ``survival`` with their evidence filled, ``blurred`` with the whole image blurred
    (:func:`blurred_survival`), ``unoverlaid`` with the members' mean overlay subtracted; the
    ``*_control`` fields are the same removals on the rest of the class (NaN without it).
    ``images``: each member's image (its first mask's row); ``relabels``: the class the model
    gives each member without its evidence (the removal that leaves fewer of them in the
    flagged class), the flagged class excepted; ``lost``: for each member, whether the model
    gave it the flagged class and no longer does without its evidence (that same removal)."""

    survival: float
    blurred: float
    images: np.ndarray
    relabels: np.ndarray
    blurred_control: float = float("nan")
    unoverlaid: float = float("nan")
    unoverlaid_control: float = float("nan")
    lost: np.ndarray | None = None

    def rates(self) -> dict[str, float]:
        """The removals' shares as :class:`FineTuneHistory` records them."""
        return {
            "member_survival": self.survival, "blurred_survival": self.blurred, "blurred_control": self.blurred_control,
            "unoverlaid_survival": self.unoverlaid, "unoverlaid_control": self.unoverlaid_control,
        }

    def members_stay(self, overlay_control: float | None = None) -> bool:
        """Whether the members are the class's own objects: at least :data:`MEMBER_SURVIVAL`
        of them keep the class with their evidence filled, and neither the blur nor the
        overlay's subtraction takes the class from them where the rest of the class keeps it
        (:data:`BLUR_CONTROL`; ``overlay_control``, default :data:`OVERLAY_CONTROL`, 0 leaves
        the overlay out). A control that fails (NaN) decides nothing."""
        overlay_control = OVERLAY_CONTROL if overlay_control is None else overlay_control
        if not self.survival >= MEMBER_SURVIVAL:
            return False
        if self.blurred < BLUR_CONTROL * self.blurred_control:
            return False
        return not (overlay_control > 0 and self.unoverlaid < overlay_control * self.unoverlaid_control)


def member_removal(
    model: nn.Module, evidence: Evidence, fill: np.ndarray, class_id: int, batch_size: int = 128,
    rest_images: np.ndarray | None = None,
) -> MemberRemoval:
    """:class:`MemberRemoval` of ``evidence``'s members, their evidence filled with ``fill``
    (C, H, W): :func:`spray.confirm.test.removal_test` with
    :func:`spray.confirm.predictor.model_predictor`, on the CPU the fine-tuning runs on. The
    members are predicted once, for every removal. With ``rest_images`` (the rest of the
    class, model inputs), the blur's control and (unless :data:`OVERLAY_CONTROL` is 0) the
    overlay's subtraction with its control are measured too."""
    from spray.confirm.test import removal_outcome, removal_test

    _, first = np.unique(evidence.rows, return_index=True)
    predict = cpu_predictor(model, batch_size)
    images = evidence.images[first]
    probs = predict(images)
    entry, _, without = removal_test(predict, images, evidence.masks[first], np.asarray(fill, dtype=np.float32), class_id, probs)
    survival = _kept_share(entry)
    blurred = blurred_survival(model, images, class_id, batch_size, probs)
    controls: dict[str, float] = {}
    if rest_images is not None and len(rest_images):
        rest_images = np.asarray(rest_images, dtype=np.float32)
        rest_probs = predict(rest_images)
        controls = {"blurred_control": blurred_survival(model, rest_images, class_id, batch_size, rest_probs)}
        if OVERLAY_CONTROL > 0:
            subtract = overlay_subtraction(images, rest_images)
            lifted, _, unoverlaid_probs = removal_outcome(predict, images, subtract(images), class_id, probs)
            rest_lifted, _, _ = removal_outcome(predict, rest_images, subtract(rest_images), class_id, rest_probs)
            controls["unoverlaid"], controls["unoverlaid_control"] = _kept_share(lifted), _kept_share(rest_lifted)
            if controls["unoverlaid"] < survival:  # the overlay took the evidence off more members: their classes without it
                without = unoverlaid_probs
    lost = (probs.argmax(axis=1) == class_id) & (np.asarray(without).argmax(axis=1) != class_id)
    without = np.array(without, copy=True)
    without[:, class_id] = -np.inf
    return MemberRemoval(survival, blurred, images, without.argmax(axis=1).astype(np.int64), lost=lost, **controls)


def _kept_share(entry: dict[str, float | int]) -> float:
    """The share of a removal's eligible images that keep their class (NaN when none was eligible)."""
    return float("nan") if entry["n"] == 0 else 1.0 - float(entry["rate"])


def overlay_subtraction(member_images: np.ndarray, rest_images: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function that subtracts the members' mean overlay (:func:`overlay_evidence`) from
    images, clipped to the per-channel range of the members' and the rest's images."""
    overlay = overlay_evidence(member_images, rest_images)
    if overlay["overlay"] is None or overlay["bounds"] is None:
        return lambda images: np.asarray(images, dtype=np.float32)
    low, high = (bound[None, :, None, None] for bound in overlay["bounds"])
    return lambda images: np.clip(np.asarray(images, dtype=np.float32) - overlay["overlay"][None], low, high)


def cpu_predictor(model: nn.Module, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The causal test's batched predictor (:func:`spray.confirm.predictor.model_predictor`) on the CPU."""
    from spray.attribution.settings import AttributionSettings
    from spray.confirm.predictor import model_predictor

    return model_predictor(model, AttributionSettings(device="cpu"), batch_size)


def blurred_survival(model: nn.Module, images: np.ndarray, class_id: int, batch_size: int = 128, probs: np.ndarray | None = None) -> float:
    """Share of ``images`` (n, C, H, W, model inputs) predicted as ``class_id`` that still are
    blurred (:data:`BLUR_SIGMA`; :func:`scipy.ndimage.gaussian_filter` over the two image axes);
    NaN when none is predicted as it. ``probs``: the images' predictions, when already made."""
    from scipy.ndimage import gaussian_filter

    images = np.asarray(images, dtype=np.float32)
    if not len(images):
        return float("nan")
    predict = cpu_predictor(model, batch_size)
    before = (predict(images) if probs is None else probs).argmax(axis=1) == class_id
    if not before.any():
        return float("nan")
    sigma = BLUR_SIGMA * max(images.shape[-2:])
    blurred = gaussian_filter(images[before], sigma=(0, 0, sigma, sigma))
    return float((predict(blurred).argmax(axis=1) == class_id).mean())


def counterfactual_finetune(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    member_rows: np.ndarray,
    evidence: Evidence,
    *,
    class_id: int,
    epochs: int,
    learning_rate: float,
    paste_share: float,
    max_samples: int | None = None,
    batch_size: int = 128,
    random_state: int = 0,
    distill: float | None = None,
) -> tuple[nn.Module, FineTuneHistory]:
    """A copy of ``model`` fine-tuned on the counterfactual set (module docstring).

    ``images``/``labels``: the fitting data (model inputs; an array or anything indexable by
    rows), ``member_rows`` index them; ``evidence`` should come from those members only;
    ``distill``: the distillation weight (default :data:`DISTILL_WEIGHT`).
    """
    if len(evidence) == 0:
        raise CorrectionError("counterfactual fine-tuning needs the flag's evidence; none was found.")
    if epochs < 1:
        raise CorrectionError(f"counterfactual fine-tuning needs at least one epoch, got {epochs}.")
    started = time.perf_counter()
    rng = np.random.default_rng([random_state, 23])
    labels = np.asarray(labels, dtype=np.int64)
    member_rows = np.asarray(member_rows, dtype=np.int64)
    others = np.setdiff1d(np.arange(len(labels)), member_rows)
    class_rest = others[labels[others] == class_id]
    if len(class_rest) > MAX_REST:
        class_rest = np.sort(rng.choice(class_rest, size=MAX_REST, replace=False))
    rest_images = np.asarray(images[class_rest], dtype=np.float32)
    fill = np.median(rest_images, axis=0) if len(class_rest) else None
    tuned = copy.deepcopy(model).eval()
    removal = None if fill is None else member_removal(tuned, evidence, fill, class_id, batch_size, rest_images)
    # kept: the members are the class's own objects and stay in the fine-tuning, in their share of a sample
    kept = removal is not None and removal.members_stay()
    rows = np.arange(len(labels)) if kept else others
    if max_samples is not None and len(rows) > max_samples:
        rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
    clean = np.asarray(images[rows], dtype=np.float32)
    targets = labels[rows]
    n_pasted = int(round(paste_share * len(rows)))
    with torch.no_grad():  # the original model's predictions: the distillation's target, and the loss's width (the relabelled members are not distilled)
        teacher = torch.cat([
            nn.functional.log_softmax(tuned(torch.from_numpy(clean[start : start + batch_size])), dim=1)
            for start in range(0, len(clean), batch_size)
        ])
    n_relabelled = 0
    if not kept and removal is not None and RELABEL_MEMBERS:
        # the left-out members come back whole, evidence and all, under the class they show without it
        clean = np.concatenate([clean, removal.images])
        targets = np.concatenate([targets, removal.relabels])
        n_relabelled = len(removal.images)
    torch.manual_seed(random_state)
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=learning_rate)
    y_all = torch.from_numpy(targets)
    class_weights = torch.ones(teacher.shape[1])
    remaining = int((labels[others] == class_id).sum())
    if not kept and remaining:
        class_weights[class_id] = float(min(MAX_CLASS_WEIGHT, max(1.0, (labels == class_id).sum() / remaining)))
    distill = DISTILL_WEIGHT if distill is None else distill
    n_images = len(clean)
    epochs = max(epochs, math.ceil(MIN_STEPS / math.ceil(n_images / batch_size)))
    losses: list[float] = []
    for _ in range(epochs):
        epoch_images = clean.copy()
        chosen = rng.choice(len(rows), size=n_pasted, replace=False)
        epoch_images[chosen] = evidence.paste(clean[chosen], rng)
        plain = np.ones(n_images, dtype=bool)  # distilled toward the original: neither pasted nor relabelled
        plain[chosen] = False
        plain[len(rows):] = False
        plain_all = torch.from_numpy(plain)
        x_all = torch.from_numpy(epoch_images)
        order = torch.from_numpy(rng.permutation(n_images))
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            logits = tuned(x_all[batch])
            loss = nn.functional.cross_entropy(logits, y_all[batch], weight=class_weights)
            if distill > 0 and bool(plain_all[batch].any()):
                keep = batch[plain_all[batch]]
                student = nn.functional.log_softmax(logits[plain_all[batch]], dim=1)
                loss = loss + distill * nn.functional.kl_div(student, teacher[keep], log_target=True, reduction="batchmean")
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / max(1, len(order)))
    tuned.eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    history = FineTuneHistory(
        epochs=epochs, learning_rate=learning_rate, paste_share=paste_share, images_per_epoch=n_images, pasted_per_epoch=n_pasted,
        evidence_masks=len(evidence), loss=losses, seconds=time.perf_counter() - started, members_kept=kept,
        distill=distill, class_weight=float(class_weights[class_id]), relabelled=n_relabelled,
        overlay_share=OVERLAY_SHARE if evidence.overlay is not None else 0.0, **({} if removal is None else removal.rates()),
    )
    return tuned, history
