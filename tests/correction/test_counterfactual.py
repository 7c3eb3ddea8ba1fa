"""Counterfactual fine-tuning (:mod:`spray.correction.counterfactual`): the members' evidence,
pasting, the search's candidates, and the fine-tuning on the demo's tagged squares (end to end
through ``spray correct``: ``test_correction_user.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spray.correction.counterfactual import Evidence, counterfactual_finetune, member_evidence
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


def test_pasting_puts_a_members_pixels_inside_its_mask_only() -> None:
    donors = np.ones((2, 1, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 0, 0] = True
    pasted = Evidence(np.arange(2), donors, masks).paste(np.zeros((5, 1, 4, 4), np.float32), np.random.default_rng(0))
    assert pasted[:, 0, 0, 0].tolist() == [1.0] * 5 and pasted.sum() == 5


def test_the_search_tries_learning_rates_and_paste_shares() -> None:
    tried = candidates_for(CorrectionConfig(method="counterfactual", cf_learning_rate=1e-3), ["l1", "l2"])
    assert [(item.learning_rate, item.paste_share, item.rr_lambda) for item in tried] == [
        (pytest.approx(1e-3 * factor), share, None) for factor in (0.3, 1.0, 3.0) for share in (0.1, 0.5)
    ]
    assert tried[0].settings(CorrectionConfig(method="counterfactual")).cf_paste_share == 0.1


def test_fine_tuning_on_the_tags_evidence_removes_the_demo_shortcut(demo) -> None:
    """The tag's region as every member's evidence (this tests the fine-tuning, not the masks),
    then the demo's test set with the true stamp. Measured: attacked accuracy 32.3 % -> 91.7 %
    (recovered 0.95), clean 95.0 % -> 94.0 % in the full suite; the clean change varies by a
    point with the order tests run in (torch's thread count), so the bound here is 2 pt, not the
    correction goal's 0.5 pt (``spray correct``'s search, tested end to end, holds that one)."""
    train, test = demo.train, demo.test
    members = np.flatnonzero(train.stamped)
    mask = np.zeros(train.images.shape[-2:], bool)
    mask[tag_region()] = True
    evidence = Evidence(members, train.images[members], np.repeat(mask[None], len(members), axis=0))
    class_id = int(train.labels[members[0]])
    before = evaluate(demo.model, test.images, test.labels, class_id, stamp_tag, relevance_samples=0)
    assert before.clean_accuracy - before.attacked_accuracy >= 0.15  # the model uses the tag
    original = {name: value.clone() for name, value in demo.model.state_dict().items()}
    tuned, history = counterfactual_finetune(
        demo.model, train.images, train.labels, members, evidence, class_id=class_id, epochs=2, learning_rate=3e-4, paste_share=0.1,
    )
    after = evaluate(tuned, test.images, test.labels, class_id, stamp_tag, relevance_samples=0)
    assert recovered_share(before, after) >= 0.8 and after.clean_accuracy - before.clean_accuracy >= -0.02
    # the members are left out; 1,110 images make 9 batches, so 8 epochs reach the 64 steps
    assert history.images_per_epoch == len(train.labels) - len(members) and len(history.loss) == history.epochs == 8
    assert all(torch.equal(value, original[name]) for name, value in demo.model.state_dict().items())  # a copy was tuned
