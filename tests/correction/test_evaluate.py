"""The before/after evaluation (spray.correction.evaluate): the attacked accuracy counts every
error, the share given the flagged class counts the moves the shortcut makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spray.correction.evaluate import EvaluationResult, evaluate, format_table


class FirstRow(nn.Module):
    """Class k's logit is the image's pixel (0, k): a model that reads one pixel per class."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :4]


def _images() -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([0, 1, 0, 1, 2, 2])
    images = np.zeros((len(labels), 1, 4, 4), dtype=np.float32)
    images[np.arange(len(labels)), 0, 0, labels] = 1.0
    return images, labels


def _stamp_pixel(column: int):
    def stamp(images: np.ndarray) -> np.ndarray:
        out = images.copy()
        out[:, 0, 0, column] = 2.0
        return out

    return stamp


def test_errors_into_the_flagged_class_are_told_from_errors_elsewhere() -> None:
    images, labels = _images()
    shortcut = evaluate(FirstRow(), images, labels, 2, _stamp_pixel(2), relevance_samples=0)
    elsewhere = evaluate(FirstRow(), images, labels, 2, _stamp_pixel(3), relevance_samples=0)
    # both attacks take every stamped image (the four of classes 0 and 1) from its class ...
    assert shortcut.attacked_accuracy == elsewhere.attacked_accuracy == 2 / 6 and shortcut.n_attacked == 4
    # ... but only the first into the flagged class
    assert (shortcut.attacked_to_class, elsewhere.attacked_to_class) == (1.0, 0.0)
    assert shortcut.clean_to_class == elsewhere.clean_to_class == 0.0
    assert shortcut.to_dict()["attacked_to_class"] == 1.0 and "attacked to class %" in format_table([shortcut])
    nothing = evaluate(FirstRow(), images[labels == 2], labels[labels == 2], 2, _stamp_pixel(2), relevance_samples=0)
    assert nothing.n_attacked == 0 and nothing.attacked_to_class is None and nothing.clean_to_class is None


def test_the_moves_into_the_class_are_the_stamped_share_less_the_unstamped_one() -> None:
    result = EvaluationResult("original", 0.9, 0.5, attacked_to_class=0.42, clean_to_class=0.02)
    assert result.moved_to_class == pytest.approx(0.40)
    assert EvaluationResult("original", 0.9, 0.9).moved_to_class is None  # nothing attacked: not measured


def test_an_attack_that_raises_the_class_probability_without_moving_argmaxes_is_measured() -> None:
    images, labels = _images()
    # 0.9 on class 2's pixel stays under the label's 1.0: no image moves, but P(class 2) rises
    nudged = evaluate(FirstRow(), images, labels, 2, _stamp_pixel(2), relevance_samples=0)
    weak = evaluate(FirstRow(), images, labels, 2, lambda x: np.where(np.arange(4) == 2, 0.9, x).astype(np.float32), relevance_samples=0)
    e = np.e
    unstamped, stamped = 1 / (e + 3), e**0.9 / (e + e**0.9 + 2)
    assert weak.moved_to_class == 0.0 and weak.attacked_accuracy == 1.0
    assert weak.clean_class_probability == pytest.approx(unstamped)
    assert weak.attacked_class_probability == pytest.approx(stamped)
    assert weak.raised_class_probability == pytest.approx(stamped - unstamped) and 0.1 < stamped - unstamped < 0.2
    assert nudged.raised_class_probability > weak.raised_class_probability  # the full stamp (2.0) raises it more
    assert EvaluationResult("original", 0.9, 0.9).raised_class_probability is None  # nothing attacked: not measured
    assert weak.to_dict()["attacked_class_probability"] == pytest.approx(stamped)
