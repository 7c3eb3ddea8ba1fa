"""Counterfactual fine-tuning (:mod:`spray.correction.counterfactual`): the members' evidence,
pasting, the search's candidates, and the fine-tuning on the demo's tagged squares (end to end
through ``spray correct``: ``test_correction_user.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch import nn

from spray.correction.counterfactual import (
    Evidence,
    blurred_survival,
    counterfactual_finetune,
    member_evidence,
    member_removal,
    signature_mask,
)
from spray.correction.errors import CorrectionError
from spray.correction.evaluate import evaluate, recovered_share
from spray.correction.config import CorrectionConfig
from spray.correction.search import candidates_for
from spray.data.demo import stamp_tag, tag_region


def _maps(n: int, corner: bool, rng: np.random.Generator) -> np.ndarray:
    maps = rng.uniform(0, 0.05, size=(n, 8, 8))
    maps[:, 3:5, 3:5] += 1.0  # where the class is recognised
    if corner:
        maps[:, 6:8, 6:8] += 1.5  # the members' extra evidence
    return maps


def test_member_evidence_is_where_members_look_and_their_class_does_not() -> None:
    rng = np.random.default_rng(0)
    members, rest = _maps(6, True, rng), _maps(20, False, rng)
    images = rng.uniform(size=(6, 1, 16, 16)).astype(np.float32)
    evidence = member_evidence(np.arange(10, 16), members, rest, images, areas=(0.12, 0.3))
    assert len(evidence) == 12 and evidence.masks.shape == (12, 16, 16)
    corner = np.zeros((16, 16), bool)
    corner[11:, 11:] = True  # the 2x2 heatmap cells at 16x16, grown by a pixel
    assert evidence.masks[:, corner].mean() > 0.5 and not evidence.masks[:, :10, :].any()
    assert list(evidence.among(np.array([10, 11])).rows) == [10, 11, 10, 11]
    with pytest.raises(CorrectionError, match="there is no evidence to fine-tune against"):
        member_evidence(np.arange(3), -rest[:3], rest, images[:3])  # no positive relevance anywhere


def test_the_signature_is_the_frame_every_member_carries_not_their_objects() -> None:
    """Members are different objects (random blobs) that all carry a frame; the rest of the
    class are other blobs without it. Each member's relevance singles out one side of the
    frame; the members' pixel signature is the whole frame and nothing of the objects."""
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(40, 1, 8, 8)).astype(np.float32) * (rng.uniform(size=(40, 1, 8, 8)) > 0.5)
    images[:, :, [0, 7], :] = images[:, :, :, [0, 7]] = 0.0
    frame = np.zeros((8, 8), bool)
    frame[[0, 7], :] = frame[:, [0, 7]] = True
    members, rest = images[:12].copy(), images[12:]
    members[:, 0, frame] = 1.0
    assert np.array_equal(signature_mask(members, rest), frame)
    assert not signature_mask(images[:12], rest).any()  # the same objects without the frame: no signature
    member_maps, rest_maps = _maps(12, False, rng), _maps(20, False, rng)
    sides = [(slice(0, 1), slice(None)), (slice(7, 8), slice(None)), (slice(None), slice(0, 1)), (slice(None), slice(7, 8))]
    for i, side in enumerate(sides * 3):
        member_maps[(i, *side)] += 2.0
    own = member_evidence(np.arange(12), member_maps, rest_maps, members, scope="member", rest_images=rest)
    assert len(own) == 12 and own.masks[:, frame].mean(axis=1).max() < 0.6  # one side and its grown edge, never the frame
    auto = member_evidence(np.arange(12), member_maps, rest_maps, members, rest_images=rest)
    assert len(auto) == 12 and all(np.array_equal(mask, frame) for mask in auto.masks)
    # without the rest's images, or with members that share no signature, the member masks
    assert np.array_equal(member_evidence(np.arange(12), member_maps, rest_maps, members).masks, own.masks)
    assert np.array_equal(member_evidence(np.arange(12), member_maps, rest_maps, images[:12], rest_images=rest).masks, own.masks)
    with pytest.raises(CorrectionError, match="unknown evidence scope"):
        member_evidence(np.arange(12), member_maps, rest_maps, members, scope="cluster")


def test_a_faint_watermark_over_the_object_is_carried_whole_by_the_members_mean_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members are different objects with a faint diagonal stripe written over them: it
    differs from the class by less than the objects do (no signature), and each member's
    relevance singles out a corner of it. Their mean overlay holds the whole stripe, and
    the pasted evidence adds it (within the images' range) to part of the hosts. Off by
    default (``OVERLAY_SHARE`` 0, chosen on Q3's dev split)."""
    from spray.correction import counterfactual

    rng = np.random.default_rng(2)
    images = (rng.uniform(size=(600, 1, 8, 8)) * (rng.uniform(size=(600, 1, 8, 8)) > 0.5)).astype(np.float32)
    stripe = np.eye(8, dtype=bool)
    members, rest = images[:300].copy(), images[300:]
    members[:, 0, stripe] = np.clip(members[:, 0, stripe] + 0.3, 0.0, 1.0)
    assert not signature_mask(members, rest).any()
    member_maps, rest_maps = _maps(300, False, rng), _maps(300, False, rng)
    member_maps[:, :2, :2] += 2.0
    assert member_evidence(np.arange(300), member_maps, rest_maps, members, rest_images=rest).overlay is None
    monkeypatch.setattr(counterfactual, "OVERLAY_SHARE", 0.5)
    evidence = member_evidence(np.arange(300), member_maps, rest_maps, members, rest_images=rest)
    assert evidence.overlay is not None and evidence.overlay.shape == (1, 8, 8)
    on, off = evidence.overlay[0][stripe], evidence.overlay[0][~stripe]
    assert on.min() > 0.1 and off.max() < 0.5 * on.min()  # the whole stripe, little of the objects
    assert not evidence.masks[:, 3:, 3:].any()  # the masks hold only the corner the relevance singles out
    hosts = np.full((400, 1, 8, 8), 0.9, np.float32)
    result = evidence.paste(hosts, np.random.default_rng(0))
    added = np.abs(result - hosts)[:, 0, 5, 5] > 0  # only the overlay reaches the stripe's far end
    assert 0.4 < added.mean() < 0.6 and result.max() <= 1.0  # half the hosts, clipped to the images' range
    assert member_evidence(np.arange(300), member_maps, rest_maps, members).overlay is None  # needs the rest's images
    assert member_evidence(np.arange(300), member_maps, rest_maps, members, scope="member", rest_images=rest).overlay is not None


class _CornerOrCentre(nn.Module):
    """Class 1 when a bright corner plus a bright centre outweigh a constant class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.tensor([2.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner, centre = x[:, 0, :2, :2].mean(dim=(1, 2)), x[:, 0, 3:5, 3:5].mean(dim=(1, 2))
        return torch.stack([torch.ones_like(corner), self.weights[0] * corner + self.weights[1] * centre], dim=1)


def _corner_data(members_are_class_objects: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, Evidence]:
    """40 class-0 images (dark centre), 40 class-1 images (bright centre), and 10 members with
    a bright corner labelled 1: class-0 objects (a backdoor) or class-1 objects (co-occurrence)."""
    images = np.zeros((90, 1, 8, 8), np.float32)
    images[40:80, 0, 3:5, 3:5] = 1.0
    labels = np.array([0] * 40 + [1] * 50)
    images[80:, 0, :2, :2] = 1.0
    if members_are_class_objects:
        images[80:, 0, 3:5, 3:5] = 1.0
    members = np.arange(80, 90)
    masks = np.zeros((10, 8, 8), bool)
    masks[:, :2, :2] = True
    return images, labels, members, Evidence(members, images[members], masks)


@pytest.mark.parametrize("members_are_class_objects", [False, True])
def test_members_stay_under_their_label_only_when_they_hold_their_class_without_the_evidence(members_are_class_objects: bool) -> None:
    images, labels, members, evidence = _corner_data(members_are_class_objects)
    model = _CornerOrCentre()
    fill = np.median(images[40:80], axis=0)
    removal = member_removal(model, evidence, fill, class_id=1)
    assert removal.survival == (1.0 if members_are_class_objects else 0.0)
    assert np.array_equal(removal.images, images[members]) and np.array_equal(removal.relabels, np.zeros(10))  # class 1 excepted
    tuned, history = counterfactual_finetune(
        model, images, labels, members, evidence, class_id=1, epochs=1, learning_rate=5e-2, paste_share=0.5,
    )
    assert history.members_kept is members_are_class_objects
    # kept, under their label; left out, they come back under the class they show without the corner
    assert history.relabelled == (0 if members_are_class_objects else 10) and history.images_per_epoch == 90
    # left out, the members' class keeps its weight in the loss: 50 labelled over 40 remaining
    assert history.class_weight == (1.0 if members_are_class_objects else 1.25)
    with torch.no_grad():
        member_predictions = tuned(torch.from_numpy(images[members])).argmax(dim=1)
    assert (member_predictions == (1 if members_are_class_objects else 0)).all()


class _TextureOrCentre(nn.Module):
    """Class 1 when a fine checkerboard (high-frequency energy) plus a bright centre outweigh a constant class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.tensor([2.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = (x[:, 0, :, 1:] - x[:, 0, :, :-1]).abs().mean(dim=(1, 2)) / 0.1
        centre = x[:, 0, 12:16, 12:16].mean(dim=(1, 2))
        return torch.stack([torch.ones_like(energy), self.weights[0] * energy + self.weights[1] * centre], dim=1)


@pytest.mark.parametrize("members_are_class_objects", [False, True])
def test_members_that_lose_their_class_blurred_where_the_rest_keeps_it_are_left_out(members_are_class_objects: bool) -> None:
    """A texture over the whole image survives a corner's removal; a blur takes it off, and the rest of the class is the control."""
    images = np.zeros((60, 1, 28, 28), np.float32)
    images[20:60, 0, 11:17, 11:17] = 1.0  # class 1: a bright centre
    labels = np.array([0] * 20 + [1] * 40)
    members = np.arange(50, 60)
    rows, cols = np.mgrid[:28, :28]
    if not members_are_class_objects:
        images[members] = 0.0  # class-0 objects under label 1: a backdoor
    images[members, 0] = np.clip(images[members, 0] + 0.2 * ((rows + cols) % 2), 0, 1)
    masks = np.zeros((10, 28, 28), bool)
    masks[:, :2, :2] = True
    evidence = Evidence(members, images[members], masks)
    model = _TextureOrCentre()
    assert member_removal(model, evidence, np.median(images[20:50], axis=0), class_id=1).survival == 1.0  # the corner holds no texture
    assert blurred_survival(model, images[20:50], class_id=1) == 1.0
    assert blurred_survival(model, images[members], class_id=1) == (1.0 if members_are_class_objects else 0.0)
    _, history = counterfactual_finetune(model, images, labels, members, evidence, class_id=1, epochs=1, learning_rate=1e-3, paste_share=0.5)
    assert history.members_kept is members_are_class_objects
    assert (history.blurred_survival, history.blurred_control) == ((1.0 if members_are_class_objects else 0.0), 1.0)
    assert history.relabelled == (0 if members_are_class_objects else 10)


class _WatermarkOrCentre(nn.Module):
    """Class 1 when a faint diagonal band (a watermark over the object, smooth enough to
    outlast a blur) plus a bright centre outweigh a constant class 0; class 2 reads the band
    a little too, so that among the other classes a watermarked image looks like a 2."""

    def __init__(self) -> None:
        super().__init__()
        rows, cols = np.mgrid[:28, :28]
        self.register_buffer("band", torch.from_numpy(((rows + cols >= 20) & (rows + cols <= 34)).astype(np.float32)))
        self.weights = nn.Parameter(torch.tensor([2.0, 2.0, 1.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark = (x[:, 0] * self.band).sum(dim=(1, 2)) / self.band.sum() / 0.3
        centre = x[:, 0, 12:16, 12:16].mean(dim=(1, 2))
        class_1 = self.weights[0] * mark + self.weights[1] * centre
        return torch.stack([torch.ones_like(mark), class_1, self.weights[2] * mark], dim=1)


@pytest.mark.parametrize("members_are_class_objects", [False, True])
def test_a_watermark_that_outlasts_masks_and_blur_leaves_with_the_mean_overlay_subtracted(
    members_are_class_objects: bool,
) -> None:
    """Q3's draw-9 failure: a watermark backdoor's members keep the flagged class with a mask
    filled and blurred, so they stayed and were trained under it again. Subtracting their mean
    overlay (what they add to the class on average) takes the band off: class-0 objects fall to
    class 0 and leave, relabelled 0 (the mask fill would say 2, the band still on), while the
    class's own objects under the band keep class 1 and stay."""
    rows, cols = np.mgrid[:28, :28]
    band = ((rows + cols >= 20) & (rows + cols <= 34)).astype(np.float32)
    images = np.zeros((60, 1, 28, 28), np.float32)
    images[20:60, 0, 11:17, 11:17] = 1.0  # class 1: a bright centre
    labels = np.array([0] * 20 + [1] * 40)
    members = np.arange(50, 60)
    if not members_are_class_objects:
        images[members] = 0.0  # class-0 objects under label 1: a backdoor
    images[members, 0] = np.clip(images[members, 0] + 0.3 * band, 0, 1)
    masks = np.zeros((10, 28, 28), bool)
    masks[:, :2, :2] = True  # the members' relevance excess: a corner the band does not reach
    evidence = Evidence(members, images[members], masks)
    model = _WatermarkOrCentre()
    fill, rest = np.median(images[20:50], axis=0), images[20:50]
    removal = member_removal(model, evidence, fill, class_id=1, rest_images=rest)
    assert removal.survival == 1.0 and removal.blurred >= 0.9 and removal.blurred_control == 1.0  # neither takes the band off
    assert removal.unoverlaid_control == 1.0
    assert removal.unoverlaid == (1.0 if members_are_class_objects else 0.0)
    assert removal.members_stay() is members_are_class_objects
    if not members_are_class_objects:
        assert removal.relabels.tolist() == [0] * 10  # their class with the band off, not the fill's 2
        assert removal.members_stay(overlay_control=0.0)  # without the subtraction they would stay: the failure it fixes
    _, history = counterfactual_finetune(model, images, labels, members, evidence, class_id=1, epochs=1, learning_rate=1e-3, paste_share=0.5)
    assert history.members_kept is members_are_class_objects
    assert history.relabelled == (0 if members_are_class_objects else 10)
    assert (history.unoverlaid_survival, history.unoverlaid_control) == (removal.unoverlaid, 1.0)


def test_pasting_puts_a_members_pixels_inside_its_mask_only() -> None:
    """A member's evidence is pasted whole, at its place on about half the hosts (MOVED_SHARE)
    and elsewhere on the others; a mask that spans the image (a frame) stays where it is."""
    from spray.correction.counterfactual import MOVED_SHARE

    donors = np.ones((2, 1, 4, 4), np.float32)
    frame = np.ones((2, 4, 4), bool)
    frame[:, 1:3, 1:3] = False
    framed = Evidence(np.arange(2), donors, frame).paste(np.zeros((5, 1, 4, 4), np.float32), np.random.default_rng(0))
    assert (framed[:, 0] == frame[0]).all()
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 0, 0] = True
    pasted = Evidence(np.arange(2), donors, masks).paste(np.zeros((400, 1, 4, 4), np.float32), np.random.default_rng(0))
    assert (pasted.reshape(400, -1).sum(axis=1) == 1).all()  # one member pixel each, nothing else
    at_place = pasted[:, 0, 0, 0].mean()  # moved ones land on any of the 16 pixels, the place included
    assert at_place == pytest.approx(1 - MOVED_SHARE + MOVED_SHARE / 16, abs=0.06)


def test_moved_evidence_keeps_the_mask_inside_the_image_and_its_pixels_under_it() -> None:
    from spray.correction.counterfactual import moved_evidence

    rng = np.random.default_rng(1)
    images = rng.uniform(size=(200, 2, 8, 8)).astype(np.float32)
    masks = np.zeros((200, 8, 8), bool)
    masks[:, 5:8, 0:2] = True  # a 3x2 mark at the bottom left
    moved, moved_masks = moved_evidence(images, masks, np.random.default_rng(2))
    assert (moved_masks.reshape(200, -1).sum(axis=1) == 6).all()  # whole, never cut by the border
    for image, original, mask in zip(moved, images, moved_masks):
        assert np.array_equal(np.sort(image[:, mask].ravel()), np.sort(original[:, masks[0]].ravel()))
    places = {tuple(np.argwhere(mask)[0]) for mask in moved_masks}
    assert len(places) > 20  # spread over the image (6 x 7 places fit)
    same, same_masks = moved_evidence(images, masks, np.random.default_rng(2), share=0.0)
    assert np.array_equal(same, images) and np.array_equal(same_masks, masks)


def test_the_search_tries_learning_rates_and_paste_shares() -> None:
    tried = candidates_for(CorrectionConfig(method="counterfactual", cf_learning_rate=1e-3), ["l1", "l2"])
    assert [(item.learning_rate, item.paste_share, item.rr_lambda) for item in tried] == [
        (pytest.approx(1e-3 * factor), share, None) for factor in (0.3, 1.0, 3.0) for share in (0.1, 0.5)
    ]
    assert tried[0].settings(CorrectionConfig(method="counterfactual")).cf_paste_share == 0.1


def _tag_evidence(train) -> tuple[np.ndarray, Evidence, int]:
    """The demo's tagged members, the tag's region as every member's evidence, and their class."""
    members = np.flatnonzero(train.stamped)
    mask = np.zeros(train.images.shape[-2:], bool)
    mask[tag_region()] = True
    return members, Evidence(members, train.images[members], np.repeat(mask[None], len(members), axis=0)), int(train.labels[members[0]])


def test_fine_tuning_on_the_tags_evidence_removes_the_demo_shortcut(demo) -> None:
    """The tag's region as every member's evidence (this tests the fine-tuning, not the masks),
    half the images pasted, then the demo's test set with the true stamp. Measured: attacked
    accuracy 32.3 % -> 89.0 % (recovered 0.90), clean 95.0 % -> 94.7 % with one and with two
    torch threads; at a tenth pasted it recovered 0.82. The clean change has varied by a point
    with the order tests run in, so the bound here is 2 pt, not the correction goal's 0.5 pt
    (``spray correct``'s search, tested end to end, holds that one)."""
    train, test = demo.train, demo.test
    members, evidence, class_id = _tag_evidence(demo.train)
    before = evaluate(demo.model, test.images, test.labels, class_id, stamp_tag, relevance_samples=0)
    assert before.clean_accuracy - before.attacked_accuracy >= 0.15  # the model uses the tag
    original = {name: value.clone() for name, value in demo.model.state_dict().items()}
    tuned, history = counterfactual_finetune(
        demo.model, train.images, train.labels, members, evidence, class_id=class_id, epochs=2, learning_rate=3e-4, paste_share=0.5,
    )
    after = evaluate(tuned, test.images, test.labels, class_id, stamp_tag, relevance_samples=0)
    assert recovered_share(before, after) >= 0.8 and after.clean_accuracy - before.clean_accuracy >= -0.02
    # the tagged squares are squares: most keep their class with the tag filled in, so they stay;
    # 1,200 images make 10 batches, so 7 epochs reach the 64 steps
    assert history.members_kept and history.member_survival >= 0.5
    assert history.images_per_epoch == len(train.labels) and len(history.loss) == history.epochs == 7
    assert all(torch.equal(value, original[name]) for name, value in demo.model.state_dict().items())  # a copy was tuned


def test_distillation_keeps_the_clean_predictions_closer_to_the_original(demo) -> None:
    """The same fine-tuning at a learning rate ten times the default, with and without the
    distillation term: with it, the tuned model's predictions on the clean test images stay
    nearer the original model's (mean KL divergence), and the shortcut is still undone.
    Measured: KL 0.182 without, 0.099 with; attacked accuracy 32.3 % -> 91.3 % with."""
    train, test = demo.train, demo.test
    members, evidence, class_id = _tag_evidence(demo.train)
    clean = torch.from_numpy(test.images)
    with torch.no_grad():
        reference = torch.log_softmax(demo.model(clean), dim=1)

    def divergence(distill: float) -> tuple[float, float]:
        tuned, history = counterfactual_finetune(
            demo.model, train.images, train.labels, members, evidence, class_id=class_id, epochs=1, learning_rate=3e-3,
            paste_share=0.5, distill=distill,
        )
        assert history.distill == distill
        with torch.no_grad():
            tuned_log = torch.log_softmax(tuned(clean), dim=1)
        kl = float(torch.nn.functional.kl_div(tuned_log, reference, log_target=True, reduction="batchmean"))
        attacked = evaluate(tuned, test.images, test.labels, class_id, stamp_tag, relevance_samples=0).attacked_accuracy
        return kl, attacked

    plain_kl, _ = divergence(0.0)
    distilled_kl, distilled_attacked = divergence(1.0)
    assert distilled_kl < 0.7 * plain_kl
    before = evaluate(demo.model, test.images, test.labels, class_id, stamp_tag, relevance_samples=0).attacked_accuracy
    assert distilled_attacked - before >= 0.1  # the pasted tags still teach the model to ignore the tag
