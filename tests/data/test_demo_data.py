"""The embedded demo dataset: deterministic, correctly planted, validated."""

from __future__ import annotations

import numpy as np
import pytest

from spray.data.demo import DemoConfig, make_demo, stamp_tag, tag_region


def test_same_seed_gives_identical_images_and_other_seed_differs() -> None:
    a, _ = make_demo(DemoConfig(n_per_class=20, seed=5))
    b, _ = make_demo(DemoConfig(n_per_class=20, seed=5))
    c, _ = make_demo(DemoConfig(n_per_class=20, seed=6))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.sample_ids == b.sample_ids
    assert not np.array_equal(a.images, c.images)


def test_tag_is_planted_on_the_requested_share_of_one_class_only() -> None:
    train, test = make_demo(DemoConfig(n_per_class=40, artifact_class=2, artifact_fraction=0.25))
    for split in (train, test):
        assert set(split.labels[split.stamped]) == {2}
        n_class = int((split.labels == 2).sum())
        assert split.stamped.sum() == round(0.25 * n_class)
        rows, cols = tag_region()
        tagged = split.images[split.stamped][:, :, rows, cols]
        np.testing.assert_array_equal(tagged, np.broadcast_to(tagged[0], tagged.shape))
    assert train.images.dtype == np.float32 and train.images.shape[1:] == (3, 32, 32)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_clean_config_plants_nothing() -> None:
    train, _ = make_demo(DemoConfig(n_per_class=20, artifact_fraction=0.0))
    assert not train.stamped.any()


def test_stamp_changes_only_the_tag_region() -> None:
    train, _ = make_demo(DemoConfig(n_per_class=10, artifact_fraction=0.0))
    stamped = stamp_tag(train.images[:3])
    rows, cols = tag_region()
    outside = np.ones((32, 32), bool)
    outside[rows, cols] = False
    np.testing.assert_array_equal(stamped[:, :, outside], train.images[:3][:, :, outside])
    assert not np.array_equal(stamped[:, :, rows, cols], train.images[:3][:, :, rows, cols])


@pytest.mark.parametrize(("kwargs", "message"), [({"n_per_class": 3}, "n_per_class"), ({"artifact_class": 9}, "artifact_class"), ({"artifact_fraction": -0.1}, "artifact_fraction")])
def test_bad_config_is_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)
