"""Counterfactual fine-tuning: teach the model that a flag's evidence means nothing by itself.

A projection (P-/R-ClArC) or a gradient penalty (RR-ClArC) removes one direction at one
layer. A backdoor or a shortcut the model learned from hundreds of stamped images is rarely
one direction: Q2 on held-out cases (``docs/correction.md``) shows them recovering a few
percent of the attacked-accuracy loss. The literature's augmentation baseline retrains what
the model learned instead: it shows the model the evidence where it does *not* go with the
flagged class, under the true labels.

What the fine-tuning sees, all of it from the audited images and the flag (no ground truth):

* **evidence** (:class:`Evidence`): each flagged member's distinguishing region, where its
  relevance exceeds the rest of its class (:func:`spray.confirm.evidence.excess_masks`, the
  same masks the causal test pastes), at each of :data:`EVIDENCE_AREAS` (a frame or a
  watermark spreads over more of the image than a tag; several sizes cover both);
* **counterfactual images**: a share (``paste_share``) of the images of every class, redrawn
  each epoch, get one random member's evidence pasted, and keep their own (true) labels. The
  flagged class's own images get it too, so the evidence ends up carrying no label at all
  (pasted on the other classes only, it would come to mean "not this class", and the class's
  genuine members that carry it would be misread);
* **the clean images** as they are, under their labels. The flagged members themselves are
  left out: in a backdoor they are other classes' objects under the flagged label, and
  training on them with the evidence removed would teach the model wrong labels.

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
#: Members whose evidence is used, at most (a seeded sample).
MAX_DONORS = 256
#: Samples of the rest of the class the excess is measured against, at most.
MAX_REST = 512
#: Fewest optimizer steps of a fine-tuning (more epochs on small sets): two epochs of 4,000
#: images in batches of 128, the size of the MNIST cases the defaults were set on.
MIN_STEPS = 64
#: Learning-rate multiples of ``cf_learning_rate`` and shares of pasted images the search tries.
LEARNING_RATE_FACTORS: tuple[float, ...] = (0.3, 1.0, 3.0)
PASTE_SHARES: tuple[float, ...] = (0.1, 0.5)


@dataclass(frozen=True)
class Evidence:
    """Members' evidence, ready to paste: model-input images (n, C, H, W) and their masks
    (n, H, W) at the images' resolution; ``rows`` are the members' rows in the audited data
    (a member appears once per evidence size)."""

    rows: np.ndarray
    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def among(self, rows: np.ndarray) -> Evidence:
        """The evidence of the members among ``rows`` only (e.g. those of a fitting split)."""
        keep = np.isin(self.rows, rows)
        return Evidence(self.rows[keep], self.images[keep], self.masks[keep])

    def paste(self, hosts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``hosts`` with one random member's evidence each (``host * (1 - mask) + member * mask``)."""
        from spray.confirm.test import pasted

        which = rng.integers(0, len(self), size=len(hosts))
        return pasted(np.asarray(hosts, dtype=np.float32), self.images[which], self.masks[which])


def member_evidence(
    member_rows: np.ndarray,
    member_maps: np.ndarray,
    rest_maps: np.ndarray,
    member_images: np.ndarray,
    areas: tuple[float, ...] = EVIDENCE_AREAS,
    mass: float = EVIDENCE_MASS,
) -> Evidence:
    """The :class:`Evidence` of members with heatmaps ``member_maps`` (m, h, w, any grid)
    against the rest of their class's ``rest_maps``, on ``member_images`` (m, C, H, W, model
    inputs). Members with no excess relevance add nothing; :class:`CorrectionError` when no
    member has any (the flag holds nothing to paste)."""
    rest = rest_share(rest_maps)
    rows, images, masks = [], [], []
    for area in areas:
        small = excess_masks(member_maps, rest, area, mass)
        full = image_masks(small, tuple(member_images.shape[-2:]))
        keep = full.reshape(len(full), -1).any(axis=1)
        rows.append(np.asarray(member_rows)[keep])
        images.append(member_images[keep])
        masks.append(full[keep])
    evidence = Evidence(np.concatenate(rows), np.concatenate(images).astype(np.float32), np.concatenate(masks))
    if len(evidence) == 0:
        raise CorrectionError("no flagged member has relevance outside where its class looks: there is no evidence to fine-tune against.")
    return evidence


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
    return member_evidence(donors, maps(donors), maps(rest), images(donors))


@dataclass
class FineTuneHistory:
    """What the fine-tuning did: its settings (``epochs`` as run, at least :data:`MIN_STEPS`
    steps), images per epoch, pasted ones among them, mean loss per epoch."""

    epochs: int
    learning_rate: float
    paste_share: float
    images_per_epoch: int
    pasted_per_epoch: int
    evidence_masks: int
    loss: list[float]
    seconds: float


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
) -> tuple[nn.Module, FineTuneHistory]:
    """A copy of ``model`` fine-tuned on the counterfactual set (module docstring).

    ``images``/``labels``: the fitting data (model inputs; an array or anything indexable by
    rows), ``member_rows`` index them; ``evidence`` should come from those members only.
    """
    if len(evidence) == 0:
        raise CorrectionError("counterfactual fine-tuning needs the flag's evidence; none was found.")
    if epochs < 1:
        raise CorrectionError(f"counterfactual fine-tuning needs at least one epoch, got {epochs}.")
    started = time.perf_counter()
    rng = np.random.default_rng([random_state, 23])
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.setdiff1d(np.arange(len(labels)), np.asarray(member_rows, dtype=np.int64))
    if max_samples is not None and len(rows) > max_samples:
        rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
    clean = np.asarray(images[rows], dtype=np.float32)
    targets = labels[rows]
    n_pasted = int(round(paste_share * len(rows)))
    torch.manual_seed(random_state)
    tuned = copy.deepcopy(model).eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=learning_rate)
    y_all = torch.from_numpy(targets)
    epochs = max(epochs, math.ceil(MIN_STEPS / math.ceil(len(rows) / batch_size)))
    losses: list[float] = []
    for _ in range(epochs):
        epoch_images = clean.copy()
        chosen = rng.choice(len(rows), size=n_pasted, replace=False)
        epoch_images[chosen] = evidence.paste(clean[chosen], rng)
        x_all = torch.from_numpy(epoch_images)
        order = torch.from_numpy(rng.permutation(len(rows)))
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(tuned(x_all[batch]), y_all[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / max(1, len(order)))
    tuned.eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    history = FineTuneHistory(
        epochs=epochs, learning_rate=learning_rate, paste_share=paste_share, images_per_epoch=len(rows), pasted_per_epoch=n_pasted,
        evidence_masks=len(evidence), loss=losses, seconds=time.perf_counter() - started,
    )
    return tuned, history
