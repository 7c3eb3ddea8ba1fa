"""SprayConfig validation, analyze_class edge cases and determinism, analyze_dataset."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from spray.analysis.config import SprayConfig
from spray.analysis.pipeline import analyze_class, analyze_dataset, analyze_spaces
from spray.analysis.preprocess import AnalysisInputError

CONFIG = SprayConfig(embedding="spectral")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"relevance": "negative"}, "relevance"),
        ({"normalisation": "zscore"}, "normalisation"),
        ({"affinity": "cosine"}, "affinity"),
        ({"clusterer": "optics"}, "clusterer"),
        ({"knn_method": "annoy"}, "knn_method"),
        ({"pca_components": 1}, "pca_components"),
        ({"n_threads": 0}, "n_threads"),
        ({"embedding": "pca"}, "embedding"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_neighbors": 2.5}, "n_neighbors"),
        ({"max_clusters": 40, "n_eigen": 32}, "max_clusters"),
        ({"pooled_size": (16,)}, "pooled_size"),
        ({"pooled_size": (0, 16)}, "pooled_size"),
        ({"threshold": float("nan")}, "threshold"),
        ({"min_eigen_ratio": 1.0}, "min_eigen_ratio"),
        ({"random_state": -1}, "random_state"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes, named):
    with pytest.raises(ValueError, match=named):
        SprayConfig(**changes)


def test_config_dict_round_trip():
    config = SprayConfig(pooled_size=(8, 12), n_neighbors=7, threshold=0.4, embedding="tsne")
    again = SprayConfig.from_dict(config.to_dict())
    assert again == config
    assert SprayConfig.from_dict(SprayConfig(pooled_size=None).to_dict()).pooled_size is None
    with pytest.raises(ValueError, match="unknown"):
        SprayConfig.from_dict({"n_neighbours": 3})


def test_same_input_and_seed_give_identical_results(make_artifact):
    maps, _ = make_artifact(240, 0.15, np.random.default_rng(0))
    first = analyze_class(maps, np.arange(240), 0, "a", CONFIG)
    second = analyze_class(maps.copy(), np.arange(240), 0, "a", CONFIG)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.eigenvalues, second.eigenvalues)
    np.testing.assert_array_equal(first.spectral_embedding, second.spectral_embedding)
    assert [c.artifact_score for c in first.clusters] == [c.artifact_score for c in second.clusters]


def test_result_fields_are_consistent(make_artifact):
    maps, _ = make_artifact(200, 0.2, np.random.default_rng(1))
    result = analyze_class(maps, np.arange(200), 4, "cat", CONFIG, space="heatmap")
    n = len(result.rows)
    assert (result.class_index, result.class_name, result.space) == (4, "cat", "heatmap")
    assert result.labels.shape == (n,) and result.embedding_2d.shape == (n, 2)
    assert result.spectral_embedding.shape == (n, len(result.eigenvalues))
    assert len(result.clusters) == result.n_clusters == len(np.unique(result.labels))
    assert result.class_mean_heatmap.shape == (16, 16)
    scores = [c.artifact_score for c in result.clusters]
    assert scores == sorted(scores, reverse=True)
    for cluster in result.clusters:
        expected = result.rows[result.labels == cluster.cluster_id]
        np.testing.assert_array_equal(cluster.member_rows, expected)
        assert cluster.mean_heatmap.shape == (16, 16)


def test_unsorted_rows_come_back_ascending_and_aligned(make_artifact):
    maps, truth = make_artifact(200, 0.2, np.random.default_rng(2))
    rows = np.random.default_rng(3).permutation(np.arange(500, 700))
    result = analyze_class(maps, rows, 0, "a", CONFIG)
    assert (np.diff(result.rows) > 0).all()
    artifact_rows = set(rows[truth].tolist())
    top = result.clusters[0]
    assert top.flagged and set(top.member_rows.tolist()) == artifact_rows


def test_nan_heatmaps_raise_naming_rows():
    maps = np.random.default_rng(4).standard_normal((50, 16, 16))
    maps[[5, 9]] = np.nan
    with pytest.raises(AnalysisInputError, match=r"2 of 50.*\b105\b.*\b109\b"):
        analyze_class(maps, np.arange(100, 150), 0, "a", CONFIG)


def test_too_small_class_is_not_analysable():
    config = SprayConfig(embedding="spectral", n_neighbors=10, min_class_size=2)
    maps = np.random.default_rng(5).standard_normal((10, 16, 16))
    result = analyze_class(maps, np.arange(10), 2, "rare", config)
    assert not result.analysable
    assert "10" in result.reason and "n_neighbors" in result.reason
    assert result.rows.size == 0 and result.labels.size == 0 and result.clusters == []
    assert result.embedding_2d.shape == (0, 2)


def test_all_constant_class_is_not_analysable():
    result = analyze_class(np.zeros((40, 16, 16)), np.arange(40), 1, "blank", CONFIG)
    assert not result.analysable and "constant" in result.reason


def test_constant_maps_are_left_out(make_clean):
    maps = make_clean(60, np.random.default_rng(6))
    maps[[3, 30]] = 0.0
    result = analyze_class(maps, np.arange(60), 0, "a", CONFIG)
    assert result.analysable
    assert len(result.rows) == 58 and not np.isin([3, 30], result.rows).any()


def test_vector_input_is_analysed(make_blobs):
    points, truth = make_blobs([60, 20], np.random.default_rng(7), dim=32)
    result = analyze_class(points, np.arange(80), 0, "a", CONFIG, space="concept:layer3")
    assert result.analysable and result.n_clusters == 2
    assert result.clusters[0].mean_heatmap.shape == (1, 32)
    members = {tuple(sorted(c.member_rows.tolist())) for c in result.clusters}
    assert tuple(np.flatnonzero(truth == 1).tolist()) in members


def test_dataset_analysis_groups_by_label_and_reads_hdf5(make_artifact, make_clean, tmp_path):
    rng = np.random.default_rng(8)
    artifact_maps, truth = make_artifact(150, 0.2, rng)
    clean_maps = make_clean(150, rng)
    order = rng.permutation(300)  # interleave the classes
    maps = np.concatenate([artifact_maps, clean_maps])[order]
    labels = np.r_[np.zeros(150, int), np.ones(150, int)][order]
    artifact_rows = np.flatnonzero(np.isin(order, np.flatnonzero(truth)))

    in_memory = analyze_dataset(maps, labels, ["dog", "cat"], CONFIG)
    path = tmp_path / "attributions.h5"
    with h5py.File(path, "w") as handle:
        handle["attribution"] = maps.astype(np.float32)
        handle["label"] = labels
    with h5py.File(path, "r") as handle:
        from_file = analyze_dataset(handle["attribution"], handle["label"], ["dog", "cat"], CONFIG)

    assert [a.class_index for a in in_memory] == [0, 1]
    assert [a.class_name for a in from_file] == ["dog", "cat"]
    for memory, stored in zip(in_memory, from_file):
        np.testing.assert_array_equal(memory.rows, np.flatnonzero(labels == memory.class_index))
        np.testing.assert_array_equal(memory.rows, stored.rows)
        np.testing.assert_array_equal(memory.labels, stored.labels)
    dog, cat = in_memory
    assert dog.clusters[0].flagged
    np.testing.assert_array_equal(dog.clusters[0].member_rows, artifact_rows)
    assert not any(c.flagged for c in cat.clusters)


def test_dataset_analysis_row_subset_and_requested_classes(make_clean):
    maps = make_clean(120, np.random.default_rng(9))
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    subset = np.arange(0, 120, 2)
    results = analyze_dataset(maps, labels, ["a", "b", "c"], CONFIG, rows=subset, classes=[1, 2])
    assert [r.class_index for r in results] == [1, 2]
    assert set(results[0].rows.tolist()) == set(range(60, 120, 2))
    assert not results[1].analysable and "no samples" in results[1].reason
    with pytest.raises(AnalysisInputError, match="labels outside"):
        analyze_dataset(maps, labels, ["a"], CONFIG)


def test_spaces_per_class_and_dataset_wide_in_one_call(make_artifact, make_clean, make_blobs):
    rng = np.random.default_rng(10)
    artifact_maps, truth = make_artifact(150, 0.2, rng)
    maps = np.concatenate([artifact_maps, make_clean(150, rng)])
    labels = np.r_[np.zeros(150, int), np.ones(150, int)]
    concepts, concept_truth = make_blobs([200, 100], rng, dim=12)
    results = analyze_spaces(
        maps, labels, ["dog", "cat"], CONFIG, concepts={"features.3": concepts},
        spaces=("heatmap", "concept:*"), dataset_wide=True,
    )
    assert [(r.class_index, r.space) for r in results] == [
        (0, "heatmap"), (1, "heatmap"), (-1, "heatmap"),
        (0, "concept:features.3"), (1, "concept:features.3"), (-1, "concept:features.3"),
    ]
    assert results[2].class_name == "all classes" and len(results[2].rows) == 300
    dog = results[0]
    assert dog.clusters[0].flagged
    assert set(dog.clusters[0].member_rows.tolist()) == set(np.flatnonzero(truth).tolist())
    # the planted concept groups are found dataset-wide
    wide = results[5]
    assert wide.n_clusters == 2
    groups = {tuple(sorted(c.member_rows.tolist())) for c in wide.clusters}
    assert tuple(np.flatnonzero(concept_truth == 1).tolist()) in groups


def test_unknown_space_names_the_available_ones():
    maps = np.zeros((30, 4, 4))
    with pytest.raises(AnalysisInputError, match=r"concept:layer1"):
        analyze_spaces(maps, np.zeros(30, int), ["a"], CONFIG, concepts={"layer1": np.zeros((30, 3))},
                       spaces=("concept:layer2",))
    with pytest.raises(AnalysisInputError, match="repeat"):
        analyze_spaces(maps, np.zeros(30, int), ["a"], CONFIG, spaces=("heatmap", "heatmap"))


def test_bad_class_is_reported_not_analysable_and_the_others_are_analysed(make_clean):
    """NaN heatmaps, too few samples, constant maps: each class explains itself; none raises."""
    rng = np.random.default_rng(11)
    maps = np.concatenate([make_clean(60, rng), make_clean(60, rng), np.ones((40, 16, 16)), make_clean(8, rng)])
    maps[[61, 70]] = np.nan
    labels = np.r_[np.zeros(60, int), np.ones(60, int), np.full(40, 2), np.full(8, 3)]
    results = analyze_dataset(maps, labels, ["ok", "nan", "flat", "rare"], CONFIG)
    ok, nan, flat, rare = results
    assert ok.analysable
    assert not nan.analysable and "NaN" in nan.reason and "61" in nan.reason and "70" in nan.reason
    assert not flat.analysable and "constant" in flat.reason
    assert not rare.analysable and "8 analysable samples" in rare.reason


def test_step_timings_and_thread_setting_are_restored(make_clean):
    import torch

    before = torch.get_num_threads()
    timings: dict[str, float] = {}
    config = SprayConfig(embedding="spectral", n_threads=1)
    analyze_class(make_clean(80, np.random.default_rng(12)), np.arange(80), 0, "a", config, timings=timings)
    assert set(timings) == {"preprocess", "pca", "graph", "eigen", "cluster", "score", "embed"}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("clusterer", ["agglomerative", "dbscan", "hdbscan"])
def test_other_clusterers_find_the_artifact(make_artifact, clusterer):
    maps, truth = make_artifact(200, 0.2, np.random.default_rng(13))
    config = SprayConfig(embedding="spectral", clusterer=clusterer)
    result = analyze_class(maps, np.arange(200), 0, "a", config)
    top = result.clusters[0]
    assert top.flagged and set(top.member_rows.tolist()) == set(np.flatnonzero(truth).tolist())


def test_dataset_wide_flags_the_minority_artifact_not_whole_classes(make_artifact, make_clean):
    """All classes together: each clean class is its own, well-separated cluster (a class's
    main strategy, never a flag); the corner-patch minority of class 0 is still flagged."""
    rng = np.random.default_rng(21)
    artifact_maps, truth = make_artifact(150, 0.2, rng)
    y, x = np.mgrid[:16, :16]
    others = [
        np.stack([np.exp(-((y - cy - rng.uniform(-1, 1)) ** 2 + (x - cx - rng.uniform(-1, 1)) ** 2) / 4.0) for _ in range(150)])
        + 0.05 * rng.standard_normal((150, 16, 16))
        for cy, cx in ((12.5, 3.0), (3.0, 12.5))
    ]
    maps = np.concatenate([artifact_maps, *others])
    labels = np.repeat(np.arange(3), 150)
    (wide,) = analyze_spaces(maps, labels, ["a", "b", "c"], CONFIG, spaces=("heatmap",), dataset_wide=True, classes=[])
    assert wide.class_index == -1 and wide.n_clusters >= 3
    flagged = [c for c in wide.clusters if c.flagged]
    assert len(flagged) == 1
    assert set(flagged[0].member_rows.tolist()) == set(np.flatnonzero(truth).tolist())
    assert flagged[0].score_components["size_fraction"] == pytest.approx(0.2)
    whole = [c for c in wide.clusters if c.size >= 100]
    assert whole and all(c.score_components["size_fraction"] > 0.5 and c.artifact_score == 0 for c in whole)
