"""The bench's attacks without ground truth: the cut-out is the one ``spray correct`` makes
for a user job (``--attack cutout``), so the bench measures the product's own verdict."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from bench.correction_q3 import cutout_stamp


def _case(n: int = 40, side: int = 16) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.3, size=(n, 1, side, side)).astype(np.float32)
    labels = np.repeat([0, 1], n // 2)
    return SimpleNamespace(spec=SimpleNamespace(seed=3), train_images=images, train_labels=labels)


def test_the_cutout_pastes_the_members_median_where_their_relevance_exceeds_their_class():
    case = _case()
    members = np.arange(20, 30)  # half of class 1 carries a bright corner and looks at it
    case.train_images[members, :, :4, :4] = 1.0
    heatmaps = np.full((40, 16, 16), 0.01, dtype=np.float32)
    heatmaps[members, :4, :4] = 1.0
    stamp = cutout_stamp(case, members, 1, heatmaps)
    hosts = case.train_images[:5]
    stamped = stamp(hosts)
    assert np.all(stamped[:, :, :4, :4] == 1.0)
    assert np.array_equal(stamped[:, :, 8:, 8:], hosts[:, :, 8:, 8:])
    assert np.array_equal(stamp(hosts), stamped)  # the same attack on every call


def test_no_cutout_when_the_members_exceed_their_class_nowhere():
    case = _case()
    heatmaps = np.full((40, 16, 16), 0.01, dtype=np.float32)
    assert cutout_stamp(case, np.arange(20, 30), 1, heatmaps) is None
