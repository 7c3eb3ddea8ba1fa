"""Ordered reads from NumPy and h5py arrays, and the choice of members to show."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from spray.report.rows import representatives, take_rows, texts_at


def test_take_rows_keeps_caller_order_on_h5py(tmp_path: Path) -> None:
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    rows = [7, 2, 7, 0]
    with h5py.File(tmp_path / "rows.h5", "w") as handle:
        handle["data"] = data
        ids = [f"id{row}" for row in range(10)]
        handle.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        np.testing.assert_array_equal(take_rows(handle["data"], rows), data[rows])
        assert take_rows(handle["data"], []).shape == (0, 2)
        assert texts_at(handle["ids"], [3, 1]) == ["id3", "id1"]
    np.testing.assert_array_equal(take_rows(data, rows), data[rows])
    assert texts_at(["a", "b", "c"], [2, 0]) == ["c", "a"]


def test_representatives_prefer_the_cluster_centre() -> None:
    analysis_rows = np.array([10, 11, 12, 13, 14])
    embedding = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    members = np.array([14, 10, 11, 12])
    chosen = representatives(members, analysis_rows, embedding, limit=2)
    # centre is 4.0 -> nearest are row 12 (2.0) then row 11 (1.0)
    assert chosen.tolist() == [12, 11]


def test_representatives_fall_back_to_evenly_spaced() -> None:
    members = np.arange(100, 200)
    chosen = representatives(members, np.arange(100, 200), None, limit=5)
    assert chosen.tolist() == [100, 125, 150, 174, 199]
    assert representatives(members, np.arange(5), np.zeros((5, 2)), limit=3).size == 3
    assert representatives(members[:2], members, None, limit=5).tolist() == [100, 101]
