"""Pooling, sign handling, normalisation and bad-input detection."""

from __future__ import annotations

import numpy as np
import pytest

from spray.analysis.preprocess import (
    AnalysisInputError,
    linear_maps,
    pooled_shape,
    pooling_matrix,
    preprocess,
    sum_pool,
)


def test_sum_pooling_keeps_total_relevance_of_each_block():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3, 32, 48))
    pooled = sum_pool(maps, (16, 16))
    assert pooled.shape == (3, 16, 16)
    # 32x48 -> 16x16: every block is 2x3 cells, summed
    expected = maps.reshape(3, 16, 2, 16, 3).sum(axis=(2, 4))
    np.testing.assert_allclose(pooled, expected)


def test_adaptive_bins_cover_every_cell_when_size_does_not_divide():
    bins = pooling_matrix(length=23, bins=16)
    assert bins.shape == (16, 23)
    assert (bins.sum(axis=0) >= 1).all(), "some input cell is in no bin"
    assert (bins.sum(axis=1) >= 1).all(), "some bin is empty"
    # bins are contiguous runs
    for row in bins:
        cells = np.flatnonzero(row)
        assert (np.diff(cells) == 1).all()


def test_small_maps_are_not_upsampled():
    assert pooled_shape(8, 20, (16, 16)) == (8, 16)
    assert pooled_shape(224, 224, None) == (224, 224)
    prepared = preprocess(np.random.default_rng(0).standard_normal((4, 8, 8)))
    assert prepared.pooled.shape == (4, 8, 8)
    assert prepared.vectors.shape == (4, 64)


@pytest.mark.parametrize("normalisation", ["l2", "max", "sum"])
def test_normalisation_makes_scale_irrelevant(normalisation):
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((5, 16, 16))
    small = preprocess(maps, normalisation=normalisation).vectors
    large = preprocess(maps * 1000.0, normalisation=normalisation).vectors
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-7)
    if normalisation == "l2":
        np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, rtol=1e-5)


def test_relevance_modes():
    maps = np.zeros((2, 16, 16))
    maps[:, 0, 0] = [2.0, -2.0]
    maps[:, 5, 5] = 1.0
    positive = preprocess(maps, relevance="positive", normalisation="none").pooled
    absolute = preprocess(maps, relevance="absolute", normalisation="none").pooled
    signed = preprocess(maps, relevance="signed", normalisation="none").pooled
    assert positive[1, 0, 0] == 0 and positive[0, 0, 0] == 2
    assert absolute[1, 0, 0] == 2
    assert signed[1, 0, 0] == -2


def test_nan_rows_raise_naming_count_and_rows():
    maps = np.ones((10, 16, 16))
    maps[3, 2, 2] = np.nan
    maps[7, 0, 0] = np.inf
    rows = np.arange(100, 110)
    with pytest.raises(AnalysisInputError) as error:
        preprocess(maps, rows=rows)
    message = str(error.value)
    assert "2 of 10" in message
    assert "103" in message and "107" in message


def test_constant_and_all_negative_maps_are_flagged():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((4, 16, 16))
    maps[1] = 0.0
    maps[2] = 0.7
    maps[3] = -np.abs(maps[3])  # nothing left after taking the positive part
    signed = preprocess(maps)
    assert signed.constant.tolist() == [False, True, True, False]
    positive = preprocess(maps, relevance="positive")
    assert positive.constant.tolist() == [False, True, True, True]
    assert not positive.vectors[positive.constant].any()
    assert np.isfinite(positive.vectors).all()


def test_vector_input_is_not_pooled():
    vectors = np.random.default_rng(3).standard_normal((6, 40))
    prepared = preprocess(vectors)
    assert prepared.map_shape == (1, 40)
    assert prepared.vectors.shape == (6, 40)


def test_wrong_rank_and_unknown_modes_are_rejected():
    with pytest.raises(AnalysisInputError, match="shape"):
        preprocess(np.zeros((2, 3, 4, 5)))
    with pytest.raises(AnalysisInputError, match="relevance"):
        preprocess(np.zeros((2, 4, 4)), relevance="negative")
    with pytest.raises(AnalysisInputError, match="normalisation"):
        preprocess(np.zeros((2, 4, 4)), normalisation="zscore")


def test_sqrt_scaling_sees_spread_and_compact_shares_alike():
    """With sqrt scaling, moving 20 % of the relevance costs the same distance whether it
    lands on 4 pixels or on 100; with linear scaling the spread share nearly vanishes."""
    base = np.zeros((16, 16))
    base[6:10, 6:10] = 1.0 / 16
    compact, spread = 0.8 * base, 0.8 * base
    compact[0:2, 0:2] += 0.2 / 4
    frame = np.zeros((16, 16), dtype=bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    spread[frame] += 0.2 / frame.sum()
    maps = np.stack([base, compact, spread])

    def distances(scaling):
        v = preprocess(maps, scaling=scaling).vectors
        return np.linalg.norm(v[1] - v[0]), np.linalg.norm(v[2] - v[0])

    to_compact, to_spread = distances("sqrt")
    assert to_spread == pytest.approx(to_compact, rel=0.05)
    linear_compact, linear_spread = distances("linear")
    assert linear_spread < 0.35 * linear_compact


def test_linear_maps_undo_the_scaling():
    rng = np.random.default_rng(4)
    maps = rng.standard_normal((7, 16, 16))
    prepared = preprocess(maps, scaling="sqrt", normalisation="l2")
    recovered = linear_maps(prepared.vectors, "sqrt")[2:5]
    expected = maps[2:5].reshape(3, -1) / np.abs(maps[2:5]).sum(axis=(1, 2))[:, None]
    np.testing.assert_allclose(recovered, expected, rtol=1e-4, atol=1e-7)
    assert linear_maps(prepared.vectors, "sqrt").shape == (7, 256)
    with pytest.raises(AnalysisInputError, match="scaling"):
        preprocess(maps, scaling="log")
