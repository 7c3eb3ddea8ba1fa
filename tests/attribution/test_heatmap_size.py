"""Heatmaps stored pooled (``[attribution] heatmap_size``): relevance kept, the rest of the file unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spray.attribution.settings import AttributionSettings
from spray.attribution.engine import attribute_dataset
from spray.config import ConfigError
from spray.attribution.resolution import HeatmapSizeError, area_pooling_matrix, pool_heatmaps, stored_shape
from spray.data.arrays import ArraySource
from spray.jobs import JobSpecError, parse_job
from spray.models.demo import DemoNet
from spray.store.attributions import read_attributions

LAYERS = ("features.conv3", "features.conv4")


def test_pooling_to_a_divisor_is_block_summing() -> None:
    maps = np.random.default_rng(0).normal(size=(3, 24, 32)).astype(np.float32)
    pooled = pool_heatmaps(maps, (6, 8))
    np.testing.assert_allclose(pooled, maps.reshape(3, 6, 4, 8, 4).sum(axis=(2, 4)), rtol=1e-5, atol=1e-6)


def test_pooling_to_any_grid_keeps_each_heatmaps_total() -> None:
    maps = np.random.default_rng(1).normal(size=(4, 30, 30)).astype(np.float32)
    pooled = pool_heatmaps(maps, (8, 7))
    assert pooled.shape == (4, 8, 7) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled.sum(axis=(1, 2)), maps.sum(axis=(1, 2), dtype=np.float64), rtol=1e-5, atol=1e-4)
    # Each pixel is split between the bins it overlaps, by area: 30 pixels into 8 bins of 3.75.
    matrix = area_pooling_matrix(30, 8)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)
    np.testing.assert_allclose(matrix.sum(axis=1), 3.75)
    np.testing.assert_allclose(matrix[0, 3], 0.75)
    np.testing.assert_allclose(matrix[1, 3], 0.25)


def test_stored_shape_never_upsamples_and_rejects_bad_sizes() -> None:
    assert stored_shape((224, 224), []) == (224, 224)
    assert stored_shape((224, 224), [56]) == (56, 56)
    assert stored_shape((32, 48), [64, 16]) == (32, 16)
    for bad in ([0], [8, 8, 8], [-4, 4]):
        with pytest.raises(HeatmapSizeError, match="heatmap_size"):
            stored_shape((32, 32), bad)
    with pytest.raises(ConfigError, match="heatmap_size"):
        AttributionSettings(heatmap_size=(0,))


def test_a_pass_with_a_heatmap_size_stores_the_pooled_heatmaps_and_the_same_concepts(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(24, 3, 32, 32)).astype(np.float32)
    source = ArraySource(images, np.arange(24) % 4, [f"s{i}" for i in range(24)], ["a", "b", "c", "d"])
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    full = attribute_dataset(source, net, AttributionSettings(layers=LAYERS, batch_size=8), tmp_path / "full" / "attributions.h5", "d", progress=False)
    small_settings = AttributionSettings(layers=LAYERS, batch_size=8, heatmap_size=(8,))
    small = attribute_dataset(source, net, small_settings, tmp_path / "small" / "attributions.h5", "d", progress=False)
    with read_attributions(full) as a, read_attributions(small) as b:
        assert b.heatmaps.shape == (24, 8, 8)
        assert b.metadata["heatmap_shape"] == [8, 8] and a.metadata["heatmap_shape"] == [32, 32]
        assert b.fingerprint != a.fingerprint  # another size is another result, never reused for it
        full_maps = a.heatmaps[...]
        np.testing.assert_allclose(b.heatmaps[...], full_maps.reshape(24, 8, 4, 8, 4).sum(axis=(2, 4)), rtol=1e-4, atol=1e-6)
        # Conservation survives the pooling: each stored heatmap sums to its full heatmap's total.
        np.testing.assert_allclose(b.heatmaps[...].sum(axis=(1, 2)), full_maps.sum(axis=(1, 2)), rtol=1e-4, atol=1e-6)
        for layer in LAYERS:
            np.testing.assert_array_equal(a.concepts[layer][...], b.concepts[layer][...])
        np.testing.assert_array_equal(a.logits[...], b.logits[...])


def test_job_spec_heatmap_size_is_checked_with_file_line_and_key() -> None:
    text = '[job]\nname = "x"\n[attribution]\nheatmap_size = [0]\n'
    with pytest.raises(JobSpecError, match=r"x\.toml:4: attribution\.heatmap_size item 0: must be at least 1, got 0"):
        parse_job(text, "x.toml")
    assert parse_job('[job]\nname = "x"\n[attribution]\nheatmap_size = [56]\n', "x.toml").attribution.heatmap_size == (56,)
