"""The evaluation data of a correction on data that carry no planted artifact (a user's own).

:func:`held_out_evaluation` is what :func:`spray.correction.job.correct_job` uses for every
job whose data do not bring their own test split and stamping function (the demo's do).
The corrected flag's member rows come from the audit's ``summary.json``.

**Held-out split.** The audited samples are split once, deterministically (``config.seed``)
and stratified by class: ``config.held_out`` of each class (default 25%) is held out for the
before/after evaluation; the CAV, the detector, the attack's evidence and RR-ClArC's
fine-tuning only see the rest. Flagged members that fall in the held-out part are left out
of every fit and of the evaluation (their number is recorded): their labels are what the flag
calls into question, and a correction that undoes a backdoor would lose them as "clean"
accuracy.

**Attacked set.** The artifact is stamped on the held-out images of the other classes:

* with ``[correct] stamp = "module:function"`` (or ``"file.py:function"``, relative to the job
  file; ``config.stamp``), by that function: it takes and returns an (N, C, H, W) float array in [0, 1]
  (display images, before the model's normalisation). Its artifact mask is the pixels it
  changes in at least half of the held-out images it was tried on;
* without one, by pasting the flagged members' own **evidence**, as the audit's causal test
  does (:mod:`spray.correction.attack`): each attacked image gets one donor member's
  relevance excess (or, where the members share a pixel signature, every other image the
  signature), half of them moved to a random place. The donors are at most half of the
  fitting members, and counterfactual fine-tuning never pastes their evidence
  (``EvaluationPlan.attack_donors``): the correction is not judged on what it was shown.
  For a flag the causal test confirmed as an overlay, the search compares its candidates
  on the same donors with their median overlay in place of the signature's pastes
  (``EvaluationPlan.search_stamp``); the verdict stays on the attack above.

The artifact's share of relevance in the evaluation is measured in one mask: the stamp
function's, or for the evidence the region where the members' relevance exceeds their
class's most (:func:`cutout_mask`): each fitting sample's positive relevance is sum-pooled to
the analysis grid (``[analysis] pooled_size``) and scaled to sum 1; the cells where the
flagged members' mean exceeds the mean of the rest of their class by at least
:data:`MASK_RELATIVE` of the largest excess form candidate regions, of which the 4-connected
one holding the largest excess is kept and upsampled to image size. How the attacked set
was made is recorded under ``evaluation_set`` in ``report.json`` and shown on the page, with
a picture of the mask (``artifact_mask.png`` beside the page). Everything here works on
display images in [0, 1].

The members' median pixels inside that one mask, pasted (:func:`cutout_patch`, :func:`paste`),
were the attack before the evidence; on held-out cases its verdict was wrong (``docs/correction.md``),
and the bench keeps it to measure that (``bench/correction_q3.py --attack cutout``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from spray.correction.config import CorrectionConfig
from spray.correction.errors import CorrectionError
from spray.correction.evaluate import Stamp
from spray.correction.images import RowImages
from spray.correction.page import MASK_PICTURE
from spray.correction.run import EvaluationPlan
from spray.jobs import JobSpec
from spray.store.folders import ATTRIBUTIONS_FILE
from spray.store.rows import take_rows

#: A cell belongs to the cut-out mask when the members' excess relevance reaches this share of the largest excess.
MASK_RELATIVE = 0.5
#: A stamp-function pixel belongs to its mask when the function changes it in at least this share of images.
STAMP_MASK_SHARE = 0.5
#: Samples of the rest of the class whose heatmaps the cut-out mask is compared with, at most.
MAX_REFERENCE_HEATMAPS = 2000
#: Held-out images a stamp function is tried on to find its mask.
STAMP_PROBE_IMAGES = 64
#: Shortest side of the mask and patch pictures on the page (nearest-neighbour upscaling).
PICTURE_SIDE = 96


def held_out_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting rows, held-out rows), both sorted: ``round(share * n)`` rows of each class held out.

    Seeded and stratified, so every class is in both parts (a class of one sample stays
    in the fitting part) and the same job always gets the same split.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        n_held = min(len(rows) - 1, int(round(share * len(rows))))
        held.append(rng.permutation(rows)[: max(n_held, 0)])
    held_rows = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_rows), held_rows


def checked_stamp(function: Callable[..., Any], name: str) -> Stamp:
    """``function`` with its output checked: an (N, C, H, W) float array like its input, finite, in [0, 1]."""
    fix = f"[correct] stamp {name!r} must take and return an (N, C, H, W) float array in [0, 1] (display images)"

    def stamp(images: np.ndarray) -> np.ndarray:
        from spray.data.entrypoint import call_user_code

        result = np.asarray(call_user_code(name, "while stamping images", function, np.array(images, dtype=np.float32, copy=True)))
        if result.shape != images.shape:
            raise CorrectionError(f"{fix}; given shape {images.shape} it returned shape {result.shape}.")
        if not np.issubdtype(result.dtype, np.floating) or not np.isfinite(result).all():
            raise CorrectionError(f"{fix}; it returned {result.dtype} values that are not all finite floats.")
        if result.min() < -1e-6 or result.max() > 1 + 1e-6:
            raise CorrectionError(f"{fix}; it returned values in [{result.min():.3g}, {result.max():.3g}].")
        return np.clip(result, 0.0, 1.0).astype(np.float32)

    return stamp


def load_stamp(name: str, base_dir: Path) -> Stamp | None:
    """The ``[correct] stamp`` entry point ``name`` (relative to ``base_dir``, the job file's folder),
    checked (see :func:`checked_stamp`), or None when unset."""
    from spray.data.base import DataSourceError
    from spray.data.entrypoint import load_entry_point

    if not name:
        return None
    try:
        function = load_entry_point(name, base_dir)
    except DataSourceError as error:
        raise CorrectionError(f"[correct] stamp: {error} Fix the entry point or remove the key to cut the artifact out of the flagged samples.") from error
    return checked_stamp(function, name)


def _pixel_bins(length: int, bins: int) -> np.ndarray:
    """For each pixel along an axis of ``length``, the pooled cell it falls in (``bins`` cells)."""
    return np.minimum((np.arange(length) * bins) // length, bins - 1)


def _mean_share_map(heatmaps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean over samples of the positive relevance, sum-pooled to ``grid`` and scaled to sum 1 per sample."""
    from spray.analysis.preprocess import sum_pool

    if len(heatmaps) == 0:
        return np.zeros(grid)
    pooled = sum_pool(np.clip(np.asarray(heatmaps, np.float64), 0.0, None), grid)
    totals = pooled.sum(axis=(1, 2), keepdims=True)
    return (pooled / np.where(totals > 0, totals, 1.0)).mean(axis=0)


def cutout_mask(
    members: np.ndarray, rest: np.ndarray, pooled_size: tuple[int, int] | None, image_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Boolean mask of the artifact: where the members' heatmaps (N, h, w) exceed the rest of the class's,
    compared on the analysis grid ``pooled_size`` ((h, w) as ``[analysis] pooled_size`` holds it; None: unpooled).

    The mask has ``image_shape`` (H, W), the display images' size, which is larger than the
    heatmaps' when they are stored pooled (``[attribution] heatmap_size``); by default the
    heatmaps' own. See the module docstring for the rule. Raises :class:`CorrectionError`
    when the members' relevance exceeds the class's nowhere (nothing to cut out).
    """
    from scipy import ndimage

    from spray.analysis.preprocess import pooled_shape

    height, width = members.shape[1:]
    grid = pooled_shape(height, width, pooled_size)
    excess = _mean_share_map(members, grid) - _mean_share_map(rest, grid)
    if not excess.max() > 0:
        raise CorrectionError(
            "the flagged cluster's relevance exceeds the rest of its class nowhere, so no artifact can be cut out; "
            "give the job's stamping function as [correct] stamp = \"module:function\"."
        )
    regions, _ = ndimage.label(excess >= MASK_RELATIVE * excess.max())
    top = regions == regions[np.unravel_index(np.argmax(excess), excess.shape)]
    image_height, image_width = image_shape if image_shape is not None else (height, width)
    return top[np.ix_(_pixel_bins(image_height, grid[0]), _pixel_bins(image_width, grid[1]))]


def cutout_patch(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C, H, W) patch: the pixel-wise median of display ``images`` (N, C, H, W) inside ``mask``, 0 outside."""
    patch = np.zeros(images.shape[1:], dtype=np.float32)
    patch[:, mask] = np.median(np.asarray(images)[:, :, mask], axis=0)
    return patch


def paste(patch: np.ndarray, mask: np.ndarray) -> Stamp:
    """A stamp that pastes ``patch`` inside ``mask`` onto display images."""

    def stamp(images: np.ndarray) -> np.ndarray:
        stamped = np.array(images, dtype=np.float32, copy=True)
        stamped[:, :, mask] = patch[:, mask][None]
        return stamped

    return stamp


def stamp_mask(stamp: Stamp, images: np.ndarray) -> np.ndarray:
    """Pixels (H, W) that ``stamp`` changes in at least :data:`STAMP_MASK_SHARE` of display ``images``."""
    changed = np.abs(stamp(images) - images).max(axis=1) > 1e-6
    return changed.mean(axis=0) >= STAMP_MASK_SHARE


def _bounding_box(mask: np.ndarray) -> list[int] | None:
    """[top, left, bottom, right] (inclusive) of ``mask``'s pixels, or None when it is empty."""
    rows, cols = np.nonzero(mask)
    return None if rows.size == 0 else [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())]


@dataclass
class AttackSet:
    """How the artifact is put on the held-out images: the stamp (display images), its mask, the facts for report.json."""

    stamp: Stamp
    mask: np.ndarray | None
    facts: dict[str, Any]
    #: the flagged members (audited rows) whose evidence the attack pastes; empty for a stamp
    #: function
    donors: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    #: the attack the search validates on, where it differs from ``stamp`` (the evidence attack
    #: of a flag confirmed as an overlay: :func:`evidence_attack_set`); None: ``stamp``
    search_stamp: Stamp | None = field(default=None, repr=False)


def read_audit_heatmaps(spec: JobSpec, rows: np.ndarray, n_samples: int) -> np.ndarray:
    """The audit's heatmaps (len(rows), H, W) of ascending unique ``rows`` from ``stages/attributions.h5``.

    ``n_samples``: how many samples the data hold now; a file of another size is from other data.
    """
    from spray.store.attributions import read_attributions

    path = spec.folders.stages / ATTRIBUTIONS_FILE
    if not path.is_file():
        raise CorrectionError(f"{path} not found; run 'spray audit' on the job first.")
    with read_attributions(path) as attributions:
        if len(attributions.labels) != n_samples:
            raise CorrectionError(f"{path} holds {len(attributions.labels)} samples but the data {n_samples}; run 'spray audit' on the job again.")
        if len(rows) == 0:
            return np.zeros((0, *attributions.heatmaps.shape[1:]), dtype=np.float32)
        return np.asarray(take_rows(attributions.heatmaps, rows), dtype=np.float32)


def _grid_name(pooled_size: tuple[int, int] | None) -> str:
    """The analysis grid for people: "8×8", or the heatmaps' own when they are not pooled."""
    return "the heatmaps' own" if pooled_size is None else "×".join(str(int(side)) for side in pooled_size)


def evidence_attack_set(
    spec: JobSpec, display: np.ndarray | RowImages, labels: np.ndarray, fit_rows: np.ndarray, members: np.ndarray, class_id: int, seed: int,
    overlay: bool = False,
) -> AttackSet:
    """The flagged fitting ``members``' own evidence pasted (:mod:`spray.correction.attack`),
    with the region of their largest relevance excess as the relevance mask (None where they
    exceed their class nowhere on the pooled grid). ``overlay``: the flag was confirmed as an
    overlay, and the search validates on the same donors with their median overlay in place
    of the signature's pastes (:data:`spray.correction.attack.SEARCH_OVERLAY_STATISTIC`)."""
    from spray.correction.attack import SEARCH_OVERLAY_STATISTIC, donor_limit, evidence_attack

    rest = np.setdiff1d(fit_rows[labels[fit_rows] == class_id], members)
    if len(rest) > MAX_REFERENCE_HEATMAPS:
        rest = np.sort(np.random.default_rng(seed).choice(rest, MAX_REFERENCE_HEATMAPS, replace=False))
    read = np.union1d(members, rest)  # one read of the audit's heatmaps serves the evidence and the relevance mask
    stored = read_audit_heatmaps(spec, read, len(labels))

    def heatmaps(rows: np.ndarray) -> np.ndarray:
        return stored[np.searchsorted(read, rows)]

    def images(rows: np.ndarray) -> np.ndarray:
        return np.asarray(display[rows], dtype=np.float32)

    # one draw of the donors serves both attacks: the search's adds their overlay over the other
    # classes' fitting images (drawn last, so the donors, masks and signature are the verdict's)
    others = fit_rows[labels[fit_rows] != class_id] if overlay else None
    searched = evidence_attack(
        members, rest, heatmaps, images, seed, donor_limit(len(members)), others, SEARCH_OVERLAY_STATISTIC, overlay_over_signature=True,
    )
    attack = replace(searched, overlay=None, bounds=None)
    searched = searched if searched.overlay is not None else None
    if attack.empty:
        raise CorrectionError(
            "no flagged member has relevance outside where its class looks, so there is no evidence to paste for the attacked "
            "set; set [correct] stamp to a function that puts the artifact on images."
        )
    try:
        mask: np.ndarray | None = cutout_mask(heatmaps(members), heatmaps(rest), spec.analysis.pooled_size, tuple(display.shape[2:]))
    except CorrectionError:
        mask = None
    facts = {
        "kind": "evidence",
        "description": (
            f"one of {len(attack.donors)} flagged members' evidence (its relevance over the rest of its class, the causal test's "
            "masks) pasted on each held-out image of the other classes"
            + (", every other image the members' pixel signature" if attack.signature is not None else "")
            + "; half of the pastes moved to a random place. Counterfactual fine-tuning never pastes these donors' evidence"
        ),
        "mask_rule": f"relevance share measured in the pooled cells ({_grid_name(spec.analysis.pooled_size)} grid) where the members' mean "
        f"relevance share exceeds the rest of the class's by at least {MASK_RELATIVE:.0%} of the largest excess; the connected "
        "region of the largest excess",
        "n_members": int(len(members)),
        "n_donors": int(len(attack.donors)),
        "n_donors_with_evidence": int(len(attack.masks)),
        "signature_pixels": None if attack.signature is None else int(attack.signature.sum()),
        "n_reference": int(len(rest)),
    }
    if searched is not None:
        facts["search_description"] = (
            f"the same donors' evidence on every other image, the donors' {SEARCH_OVERLAY_STATISTIC} overlay (what they add over "
            "the other classes' images and the rest of their class) on the others: the flag was confirmed as an overlay, "
            "which no pasted region holds whole"
        )
    return AttackSet(attack.stamp, mask, facts, donors=attack.donors, search_stamp=None if searched is None else searched.stamp)


def function_attack(name: str, stamp: Stamp, probe: np.ndarray) -> AttackSet:
    """The job's stamping function ``name``, tried on ``probe`` images now (a bad function fails before any fitting)."""
    mask = stamp_mask(stamp, probe)
    facts = {
        "kind": "stamp",
        "description": f"the job's stamping function {name} applied to the held-out images of the other classes",
        "mask_rule": f"pixels the function changes in at least {STAMP_MASK_SHARE:.0%} of {len(probe)} held-out images",
    }
    return AttackSet(stamp, mask if mask.any() else None, facts)


def _describe_mask(attack: AttackSet) -> None:
    """Add the mask's size and bounding box to the attack's facts."""
    mask = attack.mask
    attack.facts["mask_pixels"] = None if mask is None else int(mask.sum())
    attack.facts["mask_box"] = None if mask is None else _bounding_box(mask)


def write_pictures(attack: AttackSet, folder: Path) -> list[str]:
    """Write the attack's mask (white on black) as a PNG into ``folder``; return the names written
    (none without a mask)."""
    from spray.report.plots import rgba_png

    if attack.mask is None:
        return []
    scale = max(1, -(-PICTURE_SIDE // min(attack.mask.shape)))
    mask = np.repeat(attack.mask[:, :, None].astype(np.float32), 3, axis=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MASK_PICTURE).write_bytes(rgba_png(np.kron(mask, np.ones((scale, scale, 1), np.float32))))
    return [MASK_PICTURE]


def cut_points(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """Those of ``candidates`` (the audit's concept layers) at which the model can be cut for ClArC, in their order."""
    from spray.correction.clarc import split_model

    found = []
    for layer in candidates:
        try:
            split_model(model, layer)
        except CorrectionError:
            continue
        found.append(layer)
    return found


def default_layer(model: nn.Module, candidates: tuple[str, ...]) -> str:
    """The last of ``candidates`` (the audit's concept layers) at which the model can be cut for ClArC."""
    from spray.correction.clarc import split_model

    for layer in reversed(candidates):
        try:
            split_model(model, layer)
        except CorrectionError:
            continue
        return layer
    raise CorrectionError(
        f"none of the audit's concept layers {list(candidates)} is a point where the model can be cut for ClArC; "
        "set [correct] layer (or spray correct --layer) to a layer whose output is all the later layers see."
    )


def _attack_set(
    spec: JobSpec, stamp_name: str, display: np.ndarray | RowImages, labels: np.ndarray, fit_rows: np.ndarray, test_rows: np.ndarray,
    members: np.ndarray, class_id: int, seed: int, overlay: bool = False,
) -> AttackSet:
    """The stamping function ``stamp_name`` (``[correct] stamp``) when set, else the members' evidence
    (``overlay``: see :func:`evidence_attack_set`); with its mask described."""
    stamp = load_stamp(stamp_name, spec.base_dir)
    if stamp is None:
        attack = evidence_attack_set(spec, display, labels, fit_rows, members, class_id, seed, overlay)
    else:
        others = test_rows[labels[test_rows] != class_id][:STAMP_PROBE_IMAGES]
        if len(others) == 0:
            raise CorrectionError("the held-out part holds no image of another class to stamp; raise [correct] held_out.")
        attack = function_attack(stamp_name, stamp, display[others])
    _describe_mask(attack)
    return attack


def held_out_evaluation(
    spec: JobSpec, display: np.ndarray | RowImages, labels: np.ndarray, members: np.ndarray, class_id: int, config: CorrectionConfig, folder: Path,
    overlay: bool = False,
) -> EvaluationPlan:
    """Split the audited ``display`` images (and ``labels``) for correcting the flag of class ``class_id``
    with ``members`` (sorted unique rows), and make the attacked set; see the module docstring.
    ``overlay``: the flag was confirmed as an overlay (the search's attack, :func:`evidence_attack_set`).

    The picture of the attack's mask is written to ``folder`` (the correction's).
    ``display`` may be a :class:`~spray.correction.images.RowImages`: the fitting part then
    stays unread (each step reads the rows it uses), and only the held-out part is read here.
    """
    fit_rows, held_rows = held_out_split(labels, config.held_out, config.seed)
    fit_members = np.intersect1d(members, fit_rows)
    test_rows = np.setdiff1d(held_rows, members)  # the flagged members' labels are in question: not "clean" (spray.correction.search)
    if fit_members.size == 0:
        raise CorrectionError(f"none of the flag's {members.size} member(s) falls outside the held-out part; lower [correct] held_out.")
    attack = _attack_set(spec, config.stamp, display, labels, fit_rows, test_rows, fit_members, class_id, config.seed, overlay)
    attack.facts["pictures"] = write_pictures(attack, folder)
    facts = {
        "held_out": {
            "share": config.held_out, "seed": config.seed, "n_fit": int(len(fit_rows)), "n_held_out": int(len(held_rows)),
            "n_evaluated": int(len(test_rows)),
            "n_flagged": int(len(members)), "n_flagged_held_out": int(len(members) - len(fit_members)),
        },
        "attack": attack.facts,
    }
    return EvaluationPlan(
        fit_images=display.subset(fit_rows) if isinstance(display, RowImages) else display[fit_rows], fit_labels=labels[fit_rows],
        test_images=display[test_rows], test_labels=labels[test_rows],
        artifact_rows=np.searchsorted(fit_rows, fit_members), stamp=attack.stamp, mask=attack.mask, facts=facts, fit_rows=fit_rows,
        unseen_rows=np.setdiff1d(members, fit_members), attack_donors=np.searchsorted(fit_rows, attack.donors),
        search_stamp=attack.search_stamp,
    )
