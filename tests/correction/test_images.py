"""Audited images read as the correction's steps ask: the rows asked for, in their order,
each read once per request, through the model's normalisation when mapped."""

from __future__ import annotations

import numpy as np

from spray.correction.images import CountingReader, RowImages


def _source(n: int = 600) -> tuple[np.ndarray, list[np.ndarray]]:
    images = np.arange(n * 2 * 3 * 3, dtype=np.float32).reshape(n, 2, 3, 3)
    calls: list[np.ndarray] = []

    def read(rows: np.ndarray) -> np.ndarray:
        assert np.all(np.diff(rows) > 0), "a source reads ascending rows"
        calls.append(rows.copy())
        return images[rows]

    return images, calls, read  # type: ignore[return-value]


def test_rows_come_back_in_the_order_asked_with_repeats() -> None:
    images, calls, read = _source()
    reader = CountingReader(read)
    view = RowImages(reader, np.arange(len(images)), images.shape[1:])
    wanted = np.array([599, 3, 3, 0, 400])
    np.testing.assert_array_equal(view[wanted], images[wanted])
    assert reader.images_read == 4  # unique rows only
    assert view.shape == images.shape and len(view) == len(images)
    np.testing.assert_array_equal(view[10:13], images[10:13])
    np.testing.assert_array_equal(view[7], images[7])
    assert view[np.array([], dtype=np.int64)].shape == (0, 2, 3, 3)


def test_a_subset_reads_only_its_rows_in_batches_and_maps_them() -> None:
    images, calls, read = _source()
    reader = CountingReader(read)
    fit_rows = np.arange(0, 600, 2)
    fit = RowImages(reader, np.arange(len(images)), images.shape[1:]).subset(fit_rows).mapped(lambda x: x * 2.0)
    assert reader.images_read == 0  # nothing read until asked
    got = fit[np.arange(len(fit_rows))]
    np.testing.assert_array_equal(got, images[fit_rows] * 2.0)
    assert reader.images_read == 300 and max(len(rows) for rows in calls) <= 256
    np.testing.assert_array_equal(fit[[1, 0]], images[[2, 0]] * 2.0)
    np.testing.assert_array_equal(np.asarray(fit.subset([5])), images[[10]] * 2.0)


def test_a_remembering_view_reads_each_row_from_the_source_once() -> None:
    images, calls, read = _source()
    reader = CountingReader(read)
    fit = RowImages(reader, np.arange(len(images)), images.shape[1:]).subset(np.arange(0, 600, 3)).remembering()
    np.testing.assert_array_equal(fit[[4, 2, 4]], images[[12, 6, 12]])
    np.testing.assert_array_equal(fit.mapped(lambda x: -x)[[2, 5]], -images[[6, 15]])  # derived views share what was read
    assert reader.images_read == 3
