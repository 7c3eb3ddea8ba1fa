"""``write="workers"``: workers open the data, write one shard per chunk, the client joins them."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import spray.attribution.distributed as distributed
from spray.attribution.settings import AttributionSettings
from spray.attribution.engine import attribute_dataset
from spray.attribution.lrp import AttributionConfigError
from spray.audit import open_job_data, open_job_model, run_audit
from spray.data.arrays import ArrayFileSource, ArraySource
from spray.data.base import SourceReopenError
from spray.data.folder import FolderSource
from spray.data.h5 import H5Source, open_h5_source, write_input_h5
from spray.jobs import parse_job
from spray.models.demo import DemoNet
from spray.store.attributions import AttributionWriter

LAYERS = ("features.conv3", "features.conv4")
SETTINGS = AttributionSettings(layers=LAYERS, batch_size=8)  # 40 samples: 5 chunks


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    """Two in-process workers with one thread each (fast to start; still separate explainers and sources)."""
    client = distributed.start_client("local", workers=2, threads_per_worker=1, memory_limit="2GiB", processes=False)
    yield client
    client.close()


@pytest.fixture()
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, size=(40, 3, 32, 32)).astype(np.float32), np.arange(40) % 4


@pytest.fixture()
def source(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> Iterator[H5Source]:
    images, labels = data
    write_input_h5(tmp_path / "input.h5", images, labels, [f"img_{i}.png" for i in range(40)], ["a", "b", "c", "d"])
    opened = H5Source(tmp_path / "input.h5")
    yield opened
    opened.close()


@pytest.fixture()
def model() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet(4).eval()


def _contents(path: Path) -> dict[str, object]:
    """Every dataset and attribute of an HDF5 file, by name."""
    with h5py.File(path, "r") as handle:
        found: dict[str, object] = {f"@{k}": v for k, v in handle.attrs.items()}
        handle.visititems(lambda name, item: found.__setitem__(name, item[...]) if isinstance(item, h5py.Dataset) else None)
    return found


def _assert_same_file(a: Path, b: Path) -> None:
    left, right = _contents(a), _contents(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert np.array_equal(left[name], right[name]), name


def _record_shards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Chunks whose shard a worker writes from now on (the workers are threads of this process)."""
    written: list[int] = []
    original = distributed.write_shard

    def record(path: Path, chunk: int, *args: object) -> None:
        written.append(chunk)
        original(path, chunk, *args)

    monkeypatch.setattr(distributed, "write_shard", record)
    return written


def test_worker_written_shards_join_into_the_single_process_file(tmp_path, source, model, client, monkeypatch) -> None:
    local = attribute_dataset(source, model, SETTINGS, tmp_path / "local" / "attributions.h5", "d", progress=False)
    written = _record_shards(monkeypatch)
    joined = attribute_dataset(source, model, SETTINGS, tmp_path / "run" / "attributions.h5", "d", progress=False, client=client, write="workers")
    assert sorted(written) == [0, 1, 2, 3, 4]
    _assert_same_file(local, joined)
    assert "concepts/features.conv4" in _contents(joined) and "attribution" in _contents(joined)
    assert sorted(p.name for p in joined.parent.iterdir()) == ["attributions.h5"]  # shards/ removed after the join


def test_interrupted_run_recomputes_only_missing_shards(tmp_path, source, model, client, monkeypatch) -> None:
    reference = attribute_dataset(source, model, SETTINGS, tmp_path / "ref" / "attributions.h5", "d", progress=False)
    target = tmp_path / "run" / "attributions.h5"

    def crash(self, chunk, *args, **kwargs):
        raise KeyboardInterrupt("simulated crash while joining")

    with monkeypatch.context() as patch:
        patch.setattr(AttributionWriter, "write_chunk", crash)
        with pytest.raises(KeyboardInterrupt):
            attribute_dataset(source, model, SETTINGS, target, "d", progress=False, client=client, write="workers")
    shards = target.with_name("shards")
    assert sorted(p.name for p in shards.iterdir()) == [f"chunk-{i}.h5" for i in range(5)]
    target.with_name("attributions.h5.partial").unlink()  # the joined file is lost too
    (shards / "chunk-1.h5").unlink()
    (shards / "chunk-3.h5").unlink()

    written = _record_shards(monkeypatch)
    attribute_dataset(source, model, SETTINGS, target, "d", progress=False, client=client, write="workers")
    assert sorted(written) == [1, 3]
    _assert_same_file(reference, target)
    assert not shards.exists()


def test_shard_of_other_inputs_is_computed_again(tmp_path, source, model, client, monkeypatch) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with h5py.File(shards / "chunk-2.h5", "w") as old:
        old.attrs.update(format="spray-attribution-shard", format_version=1, fingerprint="older-run", chunk=2)
    written = _record_shards(monkeypatch)
    attribute_dataset(source, model, SETTINGS, tmp_path / "attributions.h5", "d", progress=False, client=client, write="workers")
    assert sorted(written) == [0, 1, 2, 3, 4]


def test_in_memory_source_is_refused_with_the_fix(tmp_path, data, model, client) -> None:
    images, labels = data
    memory = ArraySource(images, labels, [str(i) for i in range(40)], ["a", "b", "c", "d"])
    with pytest.raises(AttributionConfigError, match=r"ArraySource lives in this process only.*write='client'.*write_input_h5"):
        attribute_dataset(memory, model, SETTINGS, tmp_path / "attributions.h5", "d", progress=False, client=client, write="workers")
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_workers_mode_needs_a_client_and_a_known_mode(tmp_path, source, model) -> None:
    with pytest.raises(AttributionConfigError, match="needs a dask.distributed client"):
        attribute_dataset(source, model, SETTINGS, tmp_path / "a.h5", "d", progress=False, write="workers")
    with pytest.raises(AttributionConfigError, match=r"write must be one of \['client', 'workers'\]"):
        attribute_dataset(source, model, SETTINGS, tmp_path / "a.h5", "d", progress=False, write="shared")


def _file_sources(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> list[object]:
    """One opened source of each file-backed kind, over the same 8 images."""
    ids = [f"{i}" for i in range(8)]
    write_input_h5(tmp_path / "in.h5", images[:8], labels[:8], ids, ["a", "b", "c", "d"])
    np.savez(tmp_path / "in.npz", data=images[:8], label=labels[:8])
    for i in range(8):
        folder = tmp_path / "folder" / "abcd"[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return [H5Source(tmp_path / "in.h5"), open_h5_source(tmp_path / "in.h5", None), ArrayFileSource(tmp_path / "in.npz", list("abcd")), FolderSource(tmp_path / "folder")]


def test_file_sources_reopen_from_a_pickled_recipe(tmp_path, data) -> None:
    for original in _file_sources(tmp_path, *data):
        recipe = pickle.loads(pickle.dumps(original.recipe()))
        assert len(pickle.dumps(recipe)) < 2000  # paths, not pixels
        assert hash(recipe) == hash(original.recipe())  # usable as a per-worker cache key
        reopened = recipe.open()
        assert type(reopened) is type(original)
        assert reopened.sample_ids == original.sample_ids and reopened.class_names == original.class_names
        rows = np.array([1, 4, 6])
        assert np.array_equal(reopened.read(rows), original.read(rows))


def test_recipe_of_a_changed_or_missing_file_names_the_path(tmp_path, data) -> None:
    images, labels = data
    write_input_h5(tmp_path / "in.h5", images, labels, [str(i) for i in range(40)], ["a", "b", "c", "d"])
    recipe = H5Source(tmp_path / "in.h5").recipe()
    write_input_h5(tmp_path / "in.h5", images, labels[::-1].copy(), [str(i) for i in range(40)], ["a", "b", "c", "d"])
    with pytest.raises(SourceReopenError, match=r"in\.h5: a Dask worker sees other samples"):
        recipe.open()
    (tmp_path / "in.h5").unlink()
    with pytest.raises(SourceReopenError, match=r"in\.h5: cannot open the dataset on this Dask worker.*filesystem every worker sees"):
        recipe.open()


def test_join_removes_only_shard_files(tmp_path, source, model, client) -> None:
    keep = tmp_path / "shards" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("not a shard")
    attribute_dataset(source, model, SETTINGS, tmp_path / "attributions.h5", "d", progress=False, client=client, write="workers")
    assert [p.name for p in keep.parent.iterdir()] == ["notes.txt"]


def test_demo_audit_with_worker_written_attributions(tmp_path, client, monkeypatch) -> None:
    """``[cluster] write = "workers"`` reaches the engine: the demo's ``input.h5`` is reopened by the workers."""
    text = (
        f'[job]\nname = "w"\noutput = "{tmp_path.as_posix()}"\n[data]\nn_per_class = 10\n[model]\nepochs = 1\n'
        '[attribution]\nbatch_size = 8\n[cluster]\nkind = "local"\nwrite = "workers"\n'
    )
    spec = parse_job(text, path=tmp_path / "w.toml")
    written = _record_shards(monkeypatch)
    run_audit(spec, progress=False, client=client)
    stages = spec.output_dir / "stages"
    data = open_job_data(spec)
    model, _ = open_job_model(spec, data)
    settings = spec.attribution.for_model(model)
    assert settings.batch_size == 8 and sorted(written) == list(range(-(-len(data.source) // 8)))
    assert len(written) > 2
    reference = attribute_dataset(data.source, model, settings, tmp_path / "ref" / "attributions.h5", data.fingerprint, progress=False)
    _assert_same_file(reference, stages / "attributions.h5")
    assert not (stages / "shards").exists()
