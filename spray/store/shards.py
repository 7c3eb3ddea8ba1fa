"""Shards of ``attributions.h5`` written by Dask workers (``[cluster] write = "workers"``).

One file per chunk, ``<folder>/chunk-<index>.h5`` (format ``spray-attribution-shard``,
version 1), holding that chunk's rows of ``attribution``, ``prediction``, ``target`` and
``concepts/<layer>`` under the names of ``attributions.h5``; attributes ``fingerprint``
(of the whole pass, as in ``attributions.h5``) and ``chunk``. A shard is written under a
temporary name and renamed when complete (``atomic_h5``), so a shard that exists under its
final name is whole; one of other inputs (another fingerprint) counts as missing. The
client copies finished shards into the single ``attributions.h5`` (``join_shards``) and
then removes them (``remove_shards``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from spray.store.attributions import AttributionWriter
from spray.store.common import StoreError, atomic_h5, open_h5

FORMAT = "spray-attribution-shard"
VERSION = 1
log = logging.getLogger(__name__)

ChunkResult = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]


def shard_folder(out_path: Path) -> Path:
    """The folder of the shards of ``out_path``: ``shards/`` beside it."""
    return Path(out_path).with_name("shards")


def shard_path(folder: Path, chunk: int) -> Path:
    """Where chunk ``chunk``'s shard lives in ``folder``."""
    return Path(folder) / f"chunk-{chunk}.h5"


def write_shard(path: Path, chunk: int, fingerprint: str, result: ChunkResult) -> None:
    """Write one chunk's heatmaps, logits, targets and concept relevances atomically to ``path``."""
    heatmaps, logits, targets, concepts = result
    with atomic_h5(Path(path)) as handle:
        handle.attrs.update(format=FORMAT, format_version=VERSION, fingerprint=fingerprint, chunk=chunk)
        handle.create_dataset("attribution", data=np.asarray(heatmaps, dtype=np.float32), compression="gzip", compression_opts=1)
        handle.create_dataset("prediction", data=np.asarray(logits, dtype=np.float32))
        handle.create_dataset("target", data=np.asarray(targets, dtype=np.int64))
        group = handle.create_group("concepts")
        for name, values in concepts.items():
            group.create_dataset(name, data=np.asarray(values, dtype=np.float32))


def _belongs(handle: h5py.File, fingerprint: str, chunk: int) -> bool:
    """Whether an open shard is chunk ``chunk`` of the pass with ``fingerprint``."""
    return handle.attrs.get("fingerprint") == fingerprint and int(handle.attrs.get("chunk", -1)) == chunk


def read_shard(path: Path, fingerprint: str, chunk: int) -> ChunkResult:
    """One shard's arrays; ``StoreError`` when it is missing, unreadable or of other inputs."""
    with open_h5(Path(path), FORMAT, VERSION) as handle:
        if not _belongs(handle, fingerprint, chunk):
            raise StoreError(f"{path}: shard of other inputs or another chunk; delete it and re-run the attribution stage.")
        concepts = {name: np.asarray(handle["concepts"][name][...]) for name in handle["concepts"]}
        return np.asarray(handle["attribution"][...]), np.asarray(handle["prediction"][...]), np.asarray(handle["target"][...]), concepts


def shard_is_done(path: Path, fingerprint: str, chunk: int) -> bool:
    """Whether ``path`` is a whole shard of chunk ``chunk`` of this pass (so it is not computed again)."""
    if not Path(path).exists():
        return False
    try:
        with open_h5(Path(path), FORMAT, VERSION) as handle:
            return _belongs(handle, fingerprint, chunk)
    except StoreError as error:
        log.warning("%s is not reusable (%s); computing it again", path, error)
        return False


def join_shards(writer: AttributionWriter, chunks: list[int], folder: Path, fingerprint: str) -> None:
    """Copy the shards of ``chunks`` into ``writer``'s file, chunk by chunk (resumable like any write)."""
    for chunk in chunks:
        path = shard_path(folder, chunk)
        if not path.exists():
            raise StoreError(
                f"{path}: a worker wrote this shard but it is not visible here; [cluster] write = 'workers' needs the "
                "output folder on a filesystem every worker sees (or use write = 'client')."
            )
        writer.write_chunk(chunk, *read_shard(path, fingerprint, chunk))


def remove_shards(folder: Path) -> None:
    """Delete the shard files in ``folder`` (finished or half-written), then the folder if nothing else is in it.

    Only files named like shards are removed, so a folder that happens to hold other files keeps them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob("chunk-*.h5*"):
        path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
