"""CAV estimation on the demo: detection quality, persistence, and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spray.correction.cav import CAV, CAVError, fit_cav, fit_direction
from spray.correction.errors import CorrectionError

from .conftest import LAYER, Demo


def test_pattern_cav_detects_the_tag_on_held_out_samples(demo: Demo, demo_cav: CAV) -> None:
    """Observed: AUC 1.000 (flattened relu3 activations, about 75 held-out samples)."""
    assert demo_cav.estimator == "pattern"
    assert demo_cav.auc >= 0.9
    assert float(demo_cav.direction.norm()) == pytest.approx(1.0, abs=1e-5)
    assert demo_cav.n_artifact == int(demo.train.stamped.sum())
    assert demo_cav.n_clean == int(((demo.train.labels == 1) & ~demo.train.stamped).sum())
    # The artifact sits far above the clean samples along the direction.
    assert float(demo_cav.artifact_reference - demo_cav.reference) > 1.0


@pytest.mark.parametrize("estimator", ["svm", "logistic", "ridge"])
def test_filter_cavs_detect_the_tag(demo: Demo, estimator: str) -> None:
    cav = fit_cav(demo.model, demo.train.images, demo.train.labels, np.flatnonzero(demo.train.stamped), LAYER,
                  pooling="max", estimator=estimator)
    assert cav.estimator == estimator and cav.auc >= 0.9


def test_fit_direction_pattern_is_the_normalised_mean_difference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = np.arange(40) < 10
    x[y] += np.array([3.0, 0.0, 4.0])
    direction, intercept = fit_direction(x, y)
    expected = x[y].mean(0) - x[~y].mean(0)
    np.testing.assert_allclose(direction, expected / np.linalg.norm(expected))
    midpoint = (x[y].mean(0) + x[~y].mean(0)) / 2
    assert midpoint @ direction + intercept == pytest.approx(0.0, abs=1e-12)


def test_cav_round_trips_through_save_and_load(tmp_path: Path, demo_cav: CAV) -> None:
    path = demo_cav.save(tmp_path / "cav.pt")
    tensors = torch.load(path, weights_only=True)
    assert set(tensors) == {"direction", "clean_mean", "reference", "artifact_reference"}
    loaded = CAV.load(path)
    assert torch.equal(loaded.direction, demo_cav.direction) and torch.equal(loaded.reference, demo_cav.reference)
    assert loaded.metadata() == demo_cav.metadata()


def test_too_few_artifact_samples_are_refused_with_count_and_fix(demo: Demo) -> None:
    rows = np.flatnonzero(demo.train.stamped)[:3]
    with pytest.raises(CorrectionError, match=r"too few artifact samples for a CAV: got 3, need at least 5.*Pass more rows"):
        fit_cav(demo.model, demo.train.images, demo.train.labels, rows, LAYER)


def test_held_out_split_needs_are_counted(demo: Demo) -> None:
    rows = np.flatnonzero(demo.train.stamped)[:5]
    with pytest.raises(CAVError, match=r"got 5, need at least 6"):
        fit_cav(demo.model, demo.train.images, demo.train.labels, rows, LAYER, pooling="max", estimator="logistic", test_size=0.5)


def test_unknown_layer_lists_valid_layers_and_the_fix(demo: Demo) -> None:
    with pytest.raises(CorrectionError, match=r"layer 'features.conv9' not found in the model; valid layers: features, features.conv1, .*"
                       r"features.relu3, .*classifier.fc2\. .*\[correct\] layer .*spray correct --layer"):
        fit_cav(demo.model, demo.train.images, demo.train.labels, np.flatnonzero(demo.train.stamped), "features.conv9")


def test_class_id_out_of_range_is_refused_with_the_fix(demo: Demo) -> None:
    with pytest.raises(CorrectionError, match=r"class_id 7 is out of range: the data has 4 classes \(ids 0\.\.3\)\. Pass the id .*leave class_id out"):
        fit_cav(demo.model, demo.train.images, demo.train.labels, np.flatnonzero(demo.train.stamped), LAYER, class_id=7)


def test_rows_outside_the_data_are_refused(demo: Demo) -> None:
    with pytest.raises(CAVError, match=r"outside 0\.\.1199"):
        fit_cav(demo.model, demo.train.images, demo.train.labels, np.array([1, 2, 5000]), LAYER)
