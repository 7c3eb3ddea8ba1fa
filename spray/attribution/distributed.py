"""The attribution pass on a ``dask.distributed`` cluster.

The model is pickled here and its bytes are sent to every worker once
(``Client.scatter(..., broadcast=True)``; pickled by us because dask's own tensor
serialisation rebuilds modules whose hook registries no longer accept hooks); each worker
unpickles it once and keeps one explainer per model for its lifetime (on the worker's own
device: ``[attribution] device = "auto"`` resolves on each worker), so the model is compiled
or the composite's hooks are registered once per worker, not per chunk. The client reads
the data and writes the single resumable HDF5 file: results come back per chunk and are
written as they complete, at most ``2 × workers`` chunks in flight so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from torch import nn

from spray.attribution.engine import AttributionSettings, explain_chunk

_WORKER_STATE = threading.local()


def _explain_remote(model_bytes: bytes, settings: AttributionSettings, images: np.ndarray, labels: np.ndarray) -> tuple:
    """Run on a worker: explain one chunk with this worker's (cached) model and explainer."""
    cache = getattr(_WORKER_STATE, "explainers", None)
    if cache is None:
        cache = _WORKER_STATE.explainers = {}
    key = (hashlib.sha256(model_bytes).hexdigest(), settings)
    if key not in cache:
        model = pickle.loads(model_bytes)
        explainer = settings.explainer(model)
        explainer.__enter__()
        cache[key] = (model, explainer)
    model, explainer = cache[key]
    return explain_chunk(explainer, settings, images, labels)


def explain_on_cluster(
    client: Any, model: nn.Module, settings: AttributionSettings, batches: Iterable[tuple[int, np.ndarray, np.ndarray]]
) -> Iterator[tuple[int, tuple]]:
    """Yield ``(chunk, result)`` as the cluster finishes chunks (in completion order)."""
    from distributed import as_completed

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    remote_model = client.scatter(pickle.dumps(model.eval()), broadcast=True)
    pending = as_completed()
    chunk_of = {}
    source = iter(batches)
    limit = 2 * workers

    def submit_next() -> bool:
        try:
            chunk, images, labels = next(source)
        except StopIteration:
            return False
        future = client.submit(_explain_remote, remote_model, settings, images, labels, pure=False)
        chunk_of[future.key] = chunk
        pending.add(future)
        return True

    for _ in range(limit):
        if not submit_next():
            break
    for future in pending:
        yield chunk_of.pop(future.key), future.result()
        submit_next()


def start_client(kind: str, workers: int = 2, threads_per_worker: int = 1, memory_limit: str = "4GiB", address: str = "") -> Any:
    """A ``distributed.Client``: a ``LocalCluster`` started here, or the scheduler at ``address``."""
    from distributed import Client, LocalCluster

    if kind == "address":
        return Client(address, timeout="30s")
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit, processes=True, dashboard_address=None
    )
    return Client(cluster)
