"""The analysis stage on Dask workers gives exactly the single-process results."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from spray.analysis.config import SprayConfig
from spray.analysis.distributed import dask_runner
from spray.analysis.pipeline import analyze_spaces


@pytest.fixture(scope="module")
def client():
    from spray.attribution.distributed import start_client

    cluster = start_client("local", workers=2, threads_per_worker=1, memory_limit="2GiB", processes=False)
    yield cluster.client
    cluster.close()


def _stored(tmp_path, rng, clean_class, artifact_class):
    """Three classes of 16x16 maps (one with a corner artifact on 30 %) and 12-channel
    concept vectors, in a chunked, compressed HDF5 file as an audit stores them."""
    maps = np.concatenate([clean_class(60, rng), artifact_class(60, 0.3, rng)[0], clean_class(60, rng)]).astype(np.float32)
    labels = np.repeat(np.arange(3), 60)
    order = rng.permutation(len(labels))  # classes interleaved, as in real data
    concepts = np.abs(rng.normal(size=(len(labels), 12))).astype(np.float32)
    path = tmp_path / "attributions.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("attribution", data=maps[order], chunks=(16, 16, 16), compression="gzip")
        file.create_dataset("concepts/layer", data=concepts, chunks=(16, 12), compression="gzip")
    return path, labels[order]


def test_dask_analysis_equals_single_process(tmp_path, client, make_clean, make_artifact):
    path, labels = _stored(tmp_path, np.random.default_rng(3), make_clean, make_artifact)
    config = SprayConfig(embedding="spectral", n_neighbors=8, min_class_size=10)
    with h5py.File(path) as file:
        sources = {"heatmaps": file["attribution"], "concepts": {"layer": file["concepts/layer"]}}
        here = analyze_spaces(sources["heatmaps"], labels, ["a", "b", "c"], config, concepts=sources["concepts"],
                              spaces=("heatmap", "concept:*"), dataset_wide=True)
        there = analyze_spaces(sources["heatmaps"], labels, ["a", "b", "c"], config, concepts=sources["concepts"],
                               spaces=("heatmap", "concept:*"), dataset_wide=True, runner=dask_runner(client))
    assert [(a.class_index, a.space) for a in there] == [(a.class_index, a.space) for a in here]
    assert len(here) == 8  # 3 classes + dataset-wide, in 2 spaces
    # the artifact class is split in the heatmap space: the comparison covers real clusters
    assert here[1].n_clusters >= 2
    for mine, theirs in zip(here, there):
        assert theirs.n_clusters == mine.n_clusters
        np.testing.assert_array_equal(theirs.rows, mine.rows)
        np.testing.assert_array_equal(theirs.labels, mine.labels)
        np.testing.assert_array_equal(theirs.eigenvalues, mine.eigenvalues)
        np.testing.assert_array_equal(theirs.embedding_2d, mine.embedding_2d)
        assert [c.artifact_score for c in theirs.clusters] == [c.artifact_score for c in mine.clusters]


def test_dask_analysis_keeps_a_bad_class_not_analysable(client, make_clean):
    rng = np.random.default_rng(4)
    maps = np.concatenate([make_clean(40, rng), make_clean(40, rng)]).astype(np.float32)
    maps[45] = np.nan
    labels = np.repeat([0, 1], 40)
    results = analyze_spaces(maps, labels, ["a", "b"], SprayConfig(embedding="spectral", min_class_size=10),
                             spaces=("heatmap",), runner=dask_runner(client))
    assert [r.analysable for r in results] == [True, False]
    assert "45" in results[1].reason
