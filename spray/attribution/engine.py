"""The dataset pass: explain every sample in batches and stream the results to HDF5.

Resumable: results go to ``attributions.h5.partial`` chunk by chunk (one chunk per batch);
a re-run with the same inputs (same fingerprint) computes only the missing chunks. With
``write="workers"`` the Dask workers write one shard per chunk (``spray.store.shards``),
which are joined into the same ``attributions.h5`` when all are done; finished shards are
kept across interrupted runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import spray
from spray.attribution.chunks import check_batch, explain_chunk
from spray.attribution.lrp import AttributionConfigError, resolve_layers
from spray.attribution.resolution import stored_shape
from spray.attribution.select import make_explainer
from spray.attribution.settings import RESULT_INDEPENDENT, WRITE_MODES, AttributionSettings
from spray.config import to_dict
from spray.data.base import DataSource, ReopenableSource, SourceRecipe
from spray.models.fingerprint import model_fingerprint
from spray.store.attributions import VERSION as FORMAT_VERSION
from spray.store.attributions import AttributionLayout, AttributionWriter, read_attributions
from spray.store.common import StoreError, writable_folder
from spray.store.shards import join_shards, remove_shards, shard_folder, shard_is_done, shard_path

log = logging.getLogger(__name__)


class ChunkCluster(Protocol):
    """Workers that explain chunks of the pass (``spray.attribution.distributed.DaskCluster``)."""

    def explain(
        self, model: nn.Module, settings: AttributionSettings, batches: Iterable[tuple[int, np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[int, tuple]]:
        """Explain each ``(chunk, images, labels)``; yield ``(chunk, explain_chunk's result)`` as chunks finish."""
        ...

    def explain_to_shards(
        self,
        model: nn.Module,
        settings: AttributionSettings,
        recipe: SourceRecipe,
        windows: Iterable[tuple[int, tuple[int, int]]],
        image_shape: tuple[int, ...],
        folder: Path,
        fingerprint: str,
    ) -> Iterator[int]:
        """Have the workers read, explain and write the shard of each ``(chunk, (start, stop))``; yield each chunk when written."""
        ...


def attribution_fingerprint(data_fingerprint: str, model: nn.Module, settings: AttributionSettings, metadata: dict[str, Any]) -> str:
    """Hash of everything an attribution file's content depends on: the data (every sample,
    ``data_fingerprint``), the model (weights and code, :func:`model_fingerprint`), every
    setting but those that cannot change the result (``RESULT_INDEPENDENT``), the file's
    ``metadata``, spray's and zennit's versions and the file format's version."""
    payload = {
        "data": data_fingerprint,
        "model": model_fingerprint(model),
        "settings": {key: value for key, value in to_dict(settings).items() if key not in RESULT_INDEPENDENT},
        "metadata": metadata,
        "spray": spray.__version__,
        "zennit": importlib.metadata.version("zennit"),
        "format_version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _probe_model(model: nn.Module, sample: torch.Tensor, n_classes: int, layers: dict[str, nn.Module]) -> dict[str, int]:
    """One forward pass of one sample: check the model's output against the class count and
    count the channels at each concept layer."""
    channels: dict[str, int] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: channels.__setitem__(name, int(out.shape[1])))
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            output = model.eval()(sample)
    except RuntimeError as error:
        raise AttributionConfigError(
            f"the model cannot run on the dataset's images of shape {tuple(sample.shape[1:])}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    if output.ndim != 2 or output.shape[1] != n_classes:
        raise AttributionConfigError(
            f"the model returns shape {tuple(output.shape[1:])} per sample but the dataset has {n_classes} "
            "classes; give a model with one output per class, or the matching class list."
        )
    return channels


def attribute_dataset(
    source: DataSource,
    model: nn.Module,
    settings: AttributionSettings,
    out_path: Path,
    data_fingerprint: str,
    progress: bool = True,
    client: ChunkCluster | None = None,
    write: str = "client",
) -> Path:
    """Explain every sample of ``source`` and write ``out_path`` (see ``spray.store.attributions``).

    Returns the finished file's path. Interrupted runs resume from ``out_path.partial``. With a
    ``client`` (a ``spray.attribution.distributed.DaskCluster``, as ``cluster_client`` yields),
    chunks are explained on its workers (each holds one copy of the model). ``write="client"``: results come back and are written here as they complete.
    ``write="workers"``: each worker opens ``source`` itself (it must have ``recipe()``) and
    writes one shard per chunk into ``shards/`` beside ``out_path``; when all are written they
    are joined into ``out_path`` and the folder is removed. Either way the file is the same as
    a local run's.
    """
    _check_write(write, client, source)
    settings = settings.for_model(model)
    n_classes = len(source.class_names)
    first = source.read(np.array([0]))
    image_shape = tuple(first.shape[1:])
    concept_channels = _probe_model(model, settings.model_input(first), n_classes, resolve_layers(model, settings.layers))
    heatmap_shape = stored_shape(image_shape[1:], settings.heatmap_size)
    metadata = {
        "model": type(model).__name__,
        "composite": settings.composite,
        "canonizers": list(settings.canonizers),
        "layers": list(settings.layers),
        "target": settings.target,
        "class_names": list(source.class_names),
        "input_mean": list(settings.mean),
        "input_std": list(settings.std),
        "engine": settings.engine,
        "precision": settings.precision,
        "heatmap_shape": list(heatmap_shape),
    }
    fingerprint = attribution_fingerprint(data_fingerprint, model, settings, metadata)
    if _finished_with(Path(out_path), fingerprint):
        log.info("%s is up to date; attribution skipped", out_path)
        remove_shards(shard_folder(Path(out_path)))
        return Path(out_path)
    layout = AttributionLayout(
        n_samples=len(source),
        heatmap_shape=heatmap_shape,
        n_classes=n_classes,
        concept_channels=concept_channels,
        chunk_size=settings.batch_size,
        fingerprint=fingerprint,
        metadata=metadata,
    )
    writable_folder(Path(out_path).parent, "give an output path in a folder this user can write to.")
    writer = AttributionWriter(Path(out_path), layout, source.labels, source.sample_ids)
    try:
        pending = writer.pending_chunks()
        bar = tqdm(total=len(source), desc="attribution", unit="img", disable=not progress, initial=len(source) - _rows_of(writer, pending))
        if write == "workers":
            folder = shard_folder(Path(out_path))
            _explain_on_workers(client, model, settings, source, writer, pending, image_shape, folder, bar)
            join_shards(writer, pending, folder, fingerprint)
        else:
            _write_here(client, model, settings, source, writer, pending, image_shape, bar)
        bar.close()
        finished = writer.finish()
        remove_shards(shard_folder(finished))
        return finished
    finally:
        writer.close()


def _check_write(write: str, client: ChunkCluster | None, source: DataSource) -> None:
    """``write`` is a known mode, and ``"workers"`` has a cluster and a source the workers can reopen."""
    if write not in WRITE_MODES:
        raise AttributionConfigError(f"write must be one of {list(WRITE_MODES)}, got {write!r}.")
    if write != "workers":
        return
    if client is None:
        raise AttributionConfigError("write='workers' needs a dask.distributed client; pass client=, or use write='client'.")
    if not isinstance(source, ReopenableSource):
        raise AttributionConfigError(
            f"write='workers' needs a dataset that every Dask worker can open from files, but {type(source).__name__} "
            "lives in this process only (an in-memory or entry-point dataset); use write='client' ([cluster] write = "
            "\"client\"), or save the data as an HDF5 file (spray.data.h5.write_input_h5) and use data.source = \"h5\"."
        )


def read_ahead(read: Callable[[int], Any], keys: Sequence[int], threads: int) -> Iterator[Any]:
    """``read(key)`` for every key, in order, with up to ``threads`` reads running ahead in
    background threads, so that loading and decoding overlap the explaining.

    A read's error is raised when its turn comes, after every earlier result was yielded
    (so those are written first). ``threads=0`` reads inline.
    """
    if threads <= 0:
        yield from (read(key) for key in keys)
        return
    remaining = iter(keys)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spray-read") as pool:
        running: deque[Future[Any]] = deque(pool.submit(read, key) for _, key in zip(range(threads + 1), remaining))
        while running:
            result = running.popleft().result()
            following = next(remaining, None)
            if following is not None:
                running.append(pool.submit(read, following))
            yield result


def _rows_of(writer: AttributionWriter, chunks: list[int]) -> int:
    """How many samples ``chunks`` hold."""
    return sum(len(writer.chunk_rows(c)) for c in chunks)


def _write_here(
    client: ChunkCluster | None,
    model: nn.Module,
    settings: AttributionSettings,
    source: DataSource,
    writer: AttributionWriter,
    pending: list[int],
    image_shape: tuple[int, ...],
    bar: Any,
) -> None:
    """Read the ``pending`` chunks here, explain them here (or on ``client``'s workers) and write them here."""

    def load(chunk: int) -> tuple[int, np.ndarray, np.ndarray]:
        rows = writer.chunk_rows(chunk)
        images = source.read(rows)
        check_batch(images, rows, source.sample_ids, image_shape)
        return chunk, images, np.asarray(source.labels[rows])

    def batches() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return read_ahead(load, pending, settings.loader_threads)

    if client is None:
        with make_explainer(model, settings) as explainer:
            log.info("attribution engine: %s on %s (%s)", explainer.engine, explainer.device, settings.precision)
            results = ((chunk, explain_chunk(explainer, settings, images, labels)) for chunk, images, labels in batches())
            _write_all(writer, results, bar)
    else:
        _write_all(writer, client.explain(model, settings, batches()), bar)


def _write_all(writer: AttributionWriter, results: Iterator[tuple[int, tuple]], bar: Any) -> None:
    """Write each ``(chunk, result)`` as it arrives and advance the progress bar."""
    for chunk, result in results:
        writer.write_chunk(chunk, *result)
        bar.update(len(writer.chunk_rows(chunk)))


def _explain_on_workers(
    client: ChunkCluster,
    model: nn.Module,
    settings: AttributionSettings,
    source: ReopenableSource,
    writer: AttributionWriter,
    pending: list[int],
    image_shape: tuple[int, ...],
    folder: Path,
    bar: Any,
) -> None:
    """Have the workers write a shard for each ``pending`` chunk that has no finished shard yet."""
    fingerprint = writer.layout.fingerprint
    todo = [c for c in pending if not shard_is_done(shard_path(folder, c), fingerprint, c)]
    if len(todo) < len(pending):
        log.info("%s: %d of %d chunks already have a shard", folder, len(pending) - len(todo), len(pending))
    bar.update(_rows_of(writer, pending) - _rows_of(writer, todo))
    windows = ((c, (int(writer.chunk_rows(c)[0]), int(writer.chunk_rows(c)[-1]) + 1)) for c in todo)
    for chunk in client.explain_to_shards(model, settings, source.recipe(), windows, image_shape, folder, fingerprint):
        bar.update(len(writer.chunk_rows(chunk)))


def _finished_with(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` is a finished attribution file computed from the same inputs."""
    if not path.exists():
        return False
    try:
        with read_attributions(path) as existing:
            return existing.fingerprint == fingerprint
    except StoreError as error:
        log.warning("%s is not reusable (%s); computing it again", path, error)
        return False
