"""``analysis.h5``: a write/read round trip reproduces every field; damage is reported."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_class, not_analysable
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.store.analysis import read_analysis, read_config, write_analysis
from spray.store.common import StoreError

CONFIG = SprayConfig(embedding="spectral", threshold=0.5, pooled_size=(16, 16))


@pytest.fixture(scope="module")
def analyses(make_artifact, make_clean) -> list[ClassAnalysis]:
    rng = np.random.default_rng(0)
    artifact_maps, _ = make_artifact(120, 0.2, rng)
    clean_maps = make_clean(80, rng)
    vectors = rng.standard_normal((50, 24))
    return [
        analyze_class(artifact_maps, np.arange(120), 0, "dog <&> \"quoted\"", CONFIG),
        analyze_class(clean_maps, np.arange(120, 200), 1, "Katze ü", CONFIG),
        analyze_class(vectors, np.arange(200, 250), 1, "Katze ü", CONFIG, space="concept:features/3"),
        not_analysable(2, "rare", "heatmap", "5 analysable samples, fewer than the 20 needed"),
        analyze_class(np.zeros((30, 16, 16)), np.arange(250, 280), -1, "", CONFIG, space=""),
    ]


def _assert_same(first: object, second: object, where: str) -> None:
    if isinstance(first, np.ndarray):
        assert isinstance(second, np.ndarray), where
        assert first.dtype == second.dtype and first.shape == second.shape, where
        np.testing.assert_array_equal(first, second, err_msg=where)
    elif dataclasses.is_dataclass(first):
        assert type(first) is type(second), where
        for field in dataclasses.fields(first):
            _assert_same(getattr(first, field.name), getattr(second, field.name), f"{where}.{field.name}")
    elif isinstance(first, list):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            _assert_same(a, b, f"{where}[{index}]")
    else:
        assert type(first) is type(second) and first == second, f"{where}: {first!r} != {second!r}"


def test_round_trip_reproduces_every_field(analyses, tmp_path):
    assert any(c.flagged for c in analyses[0].clusters), "fixture should hold a flagged cluster"
    path = tmp_path / "analysis.h5"
    write_analysis(path, analyses, CONFIG)
    again = read_analysis(path)
    _assert_same(analyses, again, "analyses")
    assert read_config(path) == CONFIG
    assert not (tmp_path / "analysis.h5.partial").exists()


def test_round_trip_of_hand_made_records(tmp_path):
    cluster = ClusterResult(
        cluster_id=1,
        member_rows=np.array([3, 9], dtype=np.int64),
        artifact_score=0.123456789012345,
        flagged=False,
        score_components={"displacement": 1 / 3, "separation": 0.0},
        mean_heatmap=np.arange(6, dtype=np.float64).reshape(2, 3),
    )
    record = ClassAnalysis(
        class_index=7,
        class_name="x",
        space="heatmap",
        rows=np.array([3, 9, 11], dtype=np.int32),
        eigenvalues=np.array([0.0, 0.5]),
        n_clusters=2,
        labels=np.array([1, 1, 0]),
        spectral_embedding=np.zeros((3, 2)),
        embedding_2d=np.ones((3, 2), dtype=np.float32),
        clusters=[cluster],
        class_mean_heatmap=None,
    )
    path = tmp_path / "analysis.h5"
    write_analysis(path, [record], SprayConfig())
    _assert_same([record], read_analysis(path), "records")


def test_duplicate_class_and_space_is_refused(analyses, tmp_path):
    with pytest.raises(StoreError, match="class 0"):
        write_analysis(tmp_path / "a.h5", [analyses[0], analyses[0]], CONFIG)


def test_truncated_file_raises_store_error_naming_the_path(analyses, tmp_path):
    path = tmp_path / "analysis.h5"
    write_analysis(path, analyses, CONFIG)
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 100):
        path.write_bytes(data[:keep])
        with pytest.raises(StoreError) as error:
            read_analysis(path)
        assert str(path) in str(error.value)


def test_missing_parts_and_other_formats_raise_store_error(analyses, tmp_path):
    path = tmp_path / "analysis.h5"
    write_analysis(path, analyses, CONFIG)
    with h5py.File(path, "a") as handle:
        del handle["classes/0/heatmap/clusters/0/mean_heatmap"]
    with pytest.raises(StoreError, match="damaged"):
        read_analysis(path)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs["format"] = "spray-attributions"
        handle.attrs["format_version"] = 1
    with pytest.raises(StoreError, match="spray-analysis"):
        read_analysis(other)
    with pytest.raises(StoreError, match="not found"):
        read_analysis(tmp_path / "missing.h5")


def test_config_written_before_new_fields_existed_reads_with_defaults(analyses, tmp_path):
    path = tmp_path / "analysis.h5"
    write_analysis(path, analyses, CONFIG)
    with h5py.File(path, "a") as handle:
        old = {k: v for k, v in json.loads(handle.attrs["config"]).items() if k not in ("scaling", "knn_method", "pca_components", "n_threads")}
        handle.attrs["config"] = json.dumps(old)
    config = read_config(path)
    assert config.scaling == SprayConfig().scaling and config.n_threads == SprayConfig().n_threads
