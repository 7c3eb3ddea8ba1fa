"""The dataset pass: HDF5 layout round trip, resume, and bad input."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from spray.attribution.settings import AttributionSettings
from spray.attribution.chunks import BadInputError
from spray.attribution.engine import attribute_dataset
from spray.attribution.lrp import AttributionConfigError, Explainer, make_composite
from spray.config import ConfigError
from spray.data.arrays import ArraySource
from spray.models.demo import DemoNet
from spray.store.attributions import AttributionWriter, read_attributions
from spray.store.common import StoreError

LAYERS = ("features.conv3", "features.conv4")


@pytest.fixture()
def source() -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(40, 3, 32, 32)).astype(np.float32)
    labels = np.arange(40) % 4
    return ArraySource(images, labels, [f"img_{i}.png" for i in range(40)], ["a", "b", "c", "d"])


@pytest.fixture()
def model() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet(4).eval()


def test_layout_round_trip_matches_direct_explanation(tmp_path, source, model) -> None:
    settings = AttributionSettings(layers=LAYERS, batch_size=16)
    path = attribute_dataset(source, model, settings, tmp_path / "attributions.h5", "data-v1", progress=False)
    with read_attributions(path) as stored:
        assert stored.heatmaps.shape == (40, 32, 32)
        assert stored.logits.shape == (40, 4)
        assert stored.sample_ids == source.sample_ids
        np.testing.assert_array_equal(stored.labels, source.labels)
        np.testing.assert_array_equal(stored.targets, source.labels)
        assert stored.metadata["layers"] == list(LAYERS)
        assert {k: v.shape for k, v in stored.concepts.items()} == {"features.conv3": (40, 32), "features.conv4": (40, 64)}
        rows = np.arange(16, 32)
        with Explainer(model, make_composite("epsilon_plus_flat"), LAYERS) as explainer:
            direct = explainer.explain(torch.from_numpy(source.images[rows]), torch.from_numpy(source.labels[rows]))
        np.testing.assert_allclose(stored.heatmaps[16:32], direct.heatmaps.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stored.concepts["features.conv4"][16:32], direct.concepts["features.conv4"].numpy(), rtol=1e-5, atol=1e-7)
    # ViRelAy-readable names are plain datasets in the file.
    with h5py.File(path, "r") as handle:
        assert {"attribution", "prediction", "label"} <= set(handle)


def test_interrupted_run_resumes_without_recomputing_and_gives_same_file(tmp_path, source, model, monkeypatch) -> None:
    settings = AttributionSettings(layers=LAYERS, batch_size=8)
    reference = attribute_dataset(source, model, settings, tmp_path / "ref" / "attributions.h5", "d", progress=False)

    written: list[int] = []
    original = AttributionWriter.write_chunk

    def crash_after_two(self, chunk, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        written.append(chunk)
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(AttributionWriter, "write_chunk", crash_after_two)
    target = tmp_path / "run" / "attributions.h5"
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(source, model, settings, target, "d", progress=False)
    assert not target.exists() and target.with_name("attributions.h5.partial").exists()

    resumed: list[int] = []

    def record(self, chunk, *args, **kwargs):
        resumed.append(chunk)
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(AttributionWriter, "write_chunk", record)
    attribute_dataset(source, model, settings, target, "d", progress=False)
    assert resumed == [2, 3, 4]  # the two finished chunks were not recomputed
    with read_attributions(reference) as a, read_attributions(target) as b:
        np.testing.assert_array_equal(a.heatmaps[...], b.heatmaps[...])
        np.testing.assert_array_equal(a.concepts["features.conv3"][...], b.concepts["features.conv3"][...])


def test_nan_image_is_named_and_finished_chunks_are_kept(tmp_path, source, model) -> None:
    source.images[21, 0, 3, 3] = np.nan
    target = tmp_path / "attributions.h5"
    with pytest.raises(BadInputError, match=r"NaN or Inf.*img_21\.png"):
        attribute_dataset(source, model, AttributionSettings(batch_size=8), target, "d", progress=False)
    with h5py.File(target.with_name("attributions.h5.partial"), "r") as partial:
        assert partial["complete"][...].tolist() == [True, True, False, False, False]


def test_model_with_wrong_number_of_outputs_is_rejected(tmp_path, source) -> None:
    with pytest.raises(AttributionConfigError, match="returns shape \\(10,\\).*4 classes"):
        attribute_dataset(source, DemoNet(10), AttributionSettings(), tmp_path / "a.h5", "d", progress=False)


def test_truncated_file_gives_clear_error(tmp_path, source, model) -> None:
    path = attribute_dataset(source, model, AttributionSettings(batch_size=16), tmp_path / "attributions.h5", "d", progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="attributions.h5.*truncated"):
        read_attributions(path)


def test_dask_local_cluster_gives_the_same_file_as_one_process(tmp_path, source, model) -> None:
    from spray.attribution.distributed import start_client

    settings = AttributionSettings(layers=LAYERS, batch_size=8)
    local = attribute_dataset(source, model, settings, tmp_path / "local" / "attributions.h5", "d", progress=False)
    client = start_client("local", workers=2, threads_per_worker=1, memory_limit="2GiB")
    try:
        spread = attribute_dataset(source, model, settings, tmp_path / "dask" / "attributions.h5", "d", progress=False, client=client)
        # worker processes start with Dask's environment, less the malloc trim threshold that slows analyses
        environments = client.client.run(lambda: {name: os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    finally:
        client.close()
    assert list(environments.values()) == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}] * 2
    with read_attributions(local) as a, read_attributions(spread) as b:
        np.testing.assert_array_equal(a.heatmaps[...], b.heatmaps[...])
        np.testing.assert_array_equal(a.logits[...], b.logits[...])
        np.testing.assert_array_equal(a.concepts["features.conv4"][...], b.concepts["features.conv4"][...])
        assert a.fingerprint == b.fingerprint


def test_normalisation_is_applied_before_the_model(tmp_path, source, model) -> None:
    settings = AttributionSettings(batch_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = attribute_dataset(source, model, settings, tmp_path / "attributions.h5", "d", progress=False)
    with read_attributions(path) as stored, torch.no_grad():
        expected = model((torch.from_numpy(source.images) - 0.5) / 0.25).numpy()
        np.testing.assert_allclose(stored.logits[...], expected, rtol=1e-5, atol=1e-6)
        assert stored.metadata["input_std"] == [0.25, 0.25, 0.25]


def test_partial_file_of_other_inputs_is_kept_aside_not_deleted(tmp_path, source, model) -> None:
    target = tmp_path / "attributions.h5"
    with h5py.File(target.with_name("attributions.h5.partial"), "w") as old:
        old.attrs["format_version"] = 0
        old.attrs["fingerprint"] = "older-run"
        old["marker"] = np.arange(3)
    attribute_dataset(source, model, AttributionSettings(batch_size=40), target, "d", progress=False)
    with h5py.File(target.with_name("attributions.h5.partial.stale"), "r") as kept:
        assert kept["marker"][...].tolist() == [0, 1, 2]
    with read_attributions(target) as stored:
        assert stored.heatmaps.shape[0] == 40


def test_read_ahead_keeps_order_bounds_the_look_ahead_and_raises_in_turn() -> None:
    import threading
    import time

    from spray.attribution.engine import read_ahead

    in_flight, most, threads_seen = [0], [0], set()
    lock = threading.Lock()

    def read(key: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        threads_seen.add(threading.current_thread().name)
        time.sleep(0.01 * (5 - key % 5))  # later keys finish first: order must still hold
        with lock:
            in_flight[0] -= 1
        if key == 7:
            raise ValueError("bad chunk 7")
        return key * 10

    results = []
    with pytest.raises(ValueError, match="bad chunk 7"):
        for value in read_ahead(read, list(range(12)), threads=2):
            results.append(value)
    assert results == [k * 10 for k in range(7)]
    assert most[0] <= 2 and all(name.startswith("spray-read") for name in threads_seen)
    assert list(read_ahead(read, [1, 2], threads=0)) == [10, 20]


def test_background_reading_gives_the_same_file_as_inline_reading(tmp_path, source, model) -> None:
    paths = [
        attribute_dataset(source, model, AttributionSettings(layers=LAYERS, batch_size=8, loader_threads=threads),
                          tmp_path / f"t{threads}" / "attributions.h5", "d", progress=False)
        for threads in (0, 3)
    ]
    with read_attributions(paths[0]) as inline, read_attributions(paths[1]) as ahead:
        np.testing.assert_array_equal(inline.heatmaps[...], ahead.heatmaps[...])
        np.testing.assert_array_equal(inline.concepts["features.conv4"][...], ahead.concepts["features.conv4"][...])
    with pytest.raises(ConfigError, match="loader_threads"):
        AttributionSettings(loader_threads=-1)


def test_reference_rows_are_collected_during_the_pass_and_survive_a_resume(tmp_path, source, model, monkeypatch) -> None:
    """``references/<layer>`` holds, per channel, the rows a full scan of the stored concept
    relevances ranks highest (ties to the lower row), also after an interrupted run."""
    from spray.attribution.crp import collected_top_rows, top_rows_by_concept
    from spray.store import attributions as store

    source.images[[5, 6]] = source.images[[7, 7]]  # equal samples: equal relevances, ties to break
    source.labels[[5, 6]] = source.labels[7]
    settings = AttributionSettings(layers=LAYERS, batch_size=8)
    whole = attribute_dataset(source, model, settings, tmp_path / "whole" / "attributions.h5", "d", progress=False)

    calls = {"n": 0}
    original = store.AttributionWriter.write_chunk

    def crash_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(store.AttributionWriter, "write_chunk", crash_after_two)
    target = tmp_path / "resumed" / "attributions.h5"
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(source, model, settings, target, "d", progress=False)
    monkeypatch.setattr(store.AttributionWriter, "write_chunk", original)
    resumed = attribute_dataset(source, model, settings, target, "d", progress=False)

    for path in (whole, resumed):
        with read_attributions(path) as stored:
            for layer in LAYERS:
                rows, values = stored.references[layer]
                channels = stored.concepts[layer].shape[1]
                assert rows.shape == values.shape == (32, channels)
                scanned = top_rows_by_concept(stored.concepts[layer], range(channels), 32)
                collected = collected_top_rows(stored.references[layer], range(channels), 32)
                assert all(np.array_equal(collected[c], scanned[c]) for c in range(channels))
                np.testing.assert_array_equal(values[:, 0], np.asarray(stored.concepts[layer][...])[rows[:, 0], 0])
            assert collected_top_rows(stored.references[LAYERS[0]], [0], 33) is None
            tied = [list(rows[:, c]) for c in range(rows.shape[1]) if {5, 6, 7} <= set(rows[:, c].tolist())]
            assert tied and all(order.index(6) == order.index(5) + 1 == order.index(7) - 1 for order in tied)


def test_an_unwritable_output_folder_is_named_and_earlier_work_is_kept(tmp_path, source, model, monkeypatch) -> None:
    settings = AttributionSettings(layers=LAYERS, batch_size=16)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"file[/\\]out: cannot write here \(Not a directory\); give an output path"):
        attribute_dataset(source, model, settings, blocker / "out" / "attributions.h5", "d", progress=False)
    # A read-only or full disk (simulated: the tests may run as root, who may write anywhere).
    folder = tmp_path / "earlier"
    folder.mkdir()
    partial = folder / "attributions.h5.partial"
    partial.write_bytes(b"chunks of an earlier run")

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("spray.store.common.tempfile.NamedTemporaryFile", refuse)
    with pytest.raises(StoreError, match=r"earlier: cannot write here \(Permission denied\)"):
        attribute_dataset(source, model, settings, folder / "attributions.h5", "d", progress=False)
    assert partial.read_bytes() == b"chunks of an earlier run"
