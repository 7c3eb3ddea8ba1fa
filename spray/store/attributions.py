"""``attributions.h5``: LRP heatmaps, logits and concept relevances of every sample.

Layout (format ``spray-attributions``, version 1; the first three names are ViRelAy's):

=====================  ==============  ===============================================
``attribution``        float32 N×H×W   input heatmap per sample (channels summed), at the
                                       images' resolution or sum-pooled to
                                       ``[attribution] heatmap_size``
``prediction``         float32 N×K     the model's logits
``label``              int64 N         true label
``sample_id``          str N           dataset-provided id (file name or index)
``target``             int64 N         the class whose logit was explained
``concepts/<layer>``   float32 N×C     relevance per channel at ``<layer>``, summed over space
``complete``           bool n_chunks   which chunks of ``chunk_size`` rows are written
``references/<layer>`` group           per channel, the ``REFERENCE_ROWS`` rows with the
                                       highest relevance (``rows`` int64 K×C, -1 where
                                       the dataset has fewer rows; ``values`` float32 K×C),
                                       highest first, ties to the lower row
=====================  ==============  ===============================================

The reference rows (CRP's relevance maximisation) are collected while the chunks are
written, so finding a concept's most relevant samples never needs another read of the
concept relevances; a resumed run rebuilds them from the chunks already done. Files
written before they existed lack the group, and readers fall back to a scan.

Attributes: ``format``, ``format_version``, ``chunk_size``, ``fingerprint`` (hash of
everything the content depends on: every sample, the model's weights and code, every
setting, spray's and this format's versions; ``spray.attribution.engine.attribution_fingerprint``) and
``metadata`` (JSON: model, composite, canonizers, layers, target rule, class names, the
stored ``heatmap_shape``).

The file is written as ``attributions.h5.partial``; rows are written chunk by chunk and a
chunk's ``complete`` flag is set and flushed only after its data, so an interrupted run
resumes at the first incomplete chunk. The file gets its final name when every chunk is done.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spray.store.common import StoreError, open_h5

FORMAT = "spray-attributions"
VERSION = 1
#: Reference rows kept per channel (``references/<layer>``).
REFERENCE_ROWS = 32
log = logging.getLogger(__name__)


def merge_top_rows(
    best: tuple[np.ndarray, np.ndarray], rows: np.ndarray, values: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the ``k`` highest values among ``best`` (rows, values: K×C) and a new
    block (``rows``: b, ``values``: b×C), highest first, ties to the lower row; NaN ranks last.

    Padding rows are -1 with value -inf, so they sort after every real row.
    """
    best_rows, best_values = best
    block_rows = np.broadcast_to(np.asarray(rows, dtype=np.int64)[:, None], values.shape)
    all_rows = np.concatenate([best_rows, block_rows])
    all_values = np.nan_to_num(np.concatenate([best_values, values.astype(np.float64)]), nan=-np.inf)
    padding = all_rows < 0
    by_row = np.argsort(np.where(padding, np.iinfo(np.int64).max, all_rows), axis=0, kind="stable")
    all_rows, all_values = np.take_along_axis(all_rows, by_row, 0), np.take_along_axis(all_values, by_row, 0)
    by_value = np.argsort(-all_values, axis=0, kind="stable")[:k]
    return np.take_along_axis(all_rows, by_value, 0), np.take_along_axis(all_values, by_value, 0)


def empty_top_rows(k: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The starting point of :func:`merge_top_rows`: ``k`` padding rows per channel."""
    return np.full((k, channels), -1, dtype=np.int64), np.full((k, channels), -np.inf)


@dataclass
class AttributionLayout:
    """Shapes and metadata that fix an attribution file before any row is written."""

    n_samples: int
    heatmap_shape: tuple[int, int]
    n_classes: int
    concept_channels: dict[str, int]
    chunk_size: int
    fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_size)


class AttributionWriter:
    """Writes ``attributions.h5`` chunk by chunk, resuming a matching ``.partial`` file."""

    def __init__(self, path: Path, layout: AttributionLayout, labels: np.ndarray, sample_ids: list[str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.layout = layout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self._resume() or self._create(labels, sample_ids)
        self.references = self._references_so_far()

    def _resume(self) -> h5py.File | None:
        if not self.partial.exists():
            return None
        try:
            handle = h5py.File(self.partial, "a")
            matches = handle.attrs.get("fingerprint") == self.layout.fingerprint and handle.attrs.get("format_version") == VERSION
            if matches and "complete" in handle:
                done = int(np.sum(handle["complete"][...]))
                log.info("resuming %s: %d of %d chunks already done", self.partial, done, self.layout.n_chunks)
                return handle
            handle.close()
            stale = self.partial.with_name(self.partial.name + ".stale")
            os.replace(self.partial, stale)
            log.warning("%s belongs to other inputs or another format version; kept as %s, starting again", self.partial, stale)
            return None
        except OSError as error:
            aside = self.partial.with_name(self.partial.name + ".unreadable")
            os.replace(self.partial, aside)
            log.warning("%s was unreadable (%s); moved to %s and starting again", self.partial, error, aside)
            return None

    def _create(self, labels: np.ndarray, sample_ids: list[str]) -> h5py.File:
        layout = self.layout
        n, chunk = layout.n_samples, min(layout.chunk_size, layout.n_samples)
        handle = h5py.File(self.partial, "w")
        handle.attrs.update(
            format=FORMAT,
            format_version=VERSION,
            chunk_size=layout.chunk_size,
            fingerprint=layout.fingerprint,
            metadata=json.dumps(layout.metadata, sort_keys=True),
        )
        handle.create_dataset("attribution", shape=(n, *layout.heatmap_shape), dtype="f4", chunks=(chunk, *layout.heatmap_shape), compression="gzip", compression_opts=1)
        handle.create_dataset("prediction", shape=(n, layout.n_classes), dtype="f4", chunks=(chunk, layout.n_classes))
        handle.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
        handle.create_dataset("target", shape=(n,), dtype="i8")
        handle.create_dataset("sample_id", data=np.array(sample_ids, dtype=object), dtype=h5py.string_dtype())
        group = handle.create_group("concepts")
        for name, channels in layout.concept_channels.items():
            group.create_dataset(name, shape=(n, channels), dtype="f4", chunks=(chunk, channels))
        handle.create_dataset("complete", data=np.zeros(layout.n_chunks, dtype=bool))
        handle.flush()
        return handle

    def _references_so_far(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Running reference rows per layer, rebuilt from the chunks already complete."""
        k = min(REFERENCE_ROWS, self.layout.n_samples)
        references = {name: empty_top_rows(k, channels) for name, channels in self.layout.concept_channels.items()}
        done = np.flatnonzero(self.handle["complete"][...])
        for chunk in done.tolist():
            rows = self.chunk_rows(chunk)
            window = slice(int(rows[0]), int(rows[-1]) + 1)
            for name in references:
                references[name] = merge_top_rows(references[name], rows, self.handle["concepts"][name][window], k)
        return references

    def pending_chunks(self) -> list[int]:
        """Indices of the chunks still to compute, ascending."""
        return [int(i) for i in np.flatnonzero(~self.handle["complete"][...])]

    def chunk_rows(self, chunk: int) -> np.ndarray:
        start = chunk * self.layout.chunk_size
        return np.arange(start, min(start + self.layout.chunk_size, self.layout.n_samples))

    def write_chunk(self, chunk: int, heatmaps: np.ndarray, logits: np.ndarray, targets: np.ndarray, concepts: dict[str, np.ndarray]) -> None:
        """Write one chunk's rows, then mark it complete (data first, flag last, both flushed)."""
        rows = self.chunk_rows(chunk)
        window = slice(int(rows[0]), int(rows[-1]) + 1)
        self.handle["attribution"][window] = heatmaps
        self.handle["prediction"][window] = logits
        self.handle["target"][window] = targets
        for name, values in concepts.items():
            self.handle["concepts"][name][window] = values
            best = self.references[name]
            self.references[name] = merge_top_rows(best, rows, np.asarray(values), len(best[0]))
        self.handle.flush()
        self.handle["complete"][chunk] = True
        self.handle.flush()

    def finish(self) -> Path:
        """Close the file and give it its final name; every chunk must be complete."""
        pending = self.pending_chunks()
        if not pending:
            group = self.handle.require_group("references")
            for name, (rows, values) in self.references.items():
                if name in group:
                    del group[name]
                layer = group.create_group(name)
                layer.create_dataset("rows", data=rows)
                layer.create_dataset("values", data=values.astype(np.float32))
        self.handle.close()
        if pending:
            raise StoreError(f"{self.partial}: {len(pending)} chunks are not written yet; re-run to resume.")
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the ``.partial`` file stays for a later resume)."""
        if self.handle.id.valid:
            self.handle.close()


@dataclass
class Attributions:
    """An open ``attributions.h5``: datasets stay lazy (h5py) except small per-row arrays."""

    path: Path
    handle: h5py.File
    heatmaps: h5py.Dataset
    logits: h5py.Dataset
    labels: np.ndarray
    targets: np.ndarray
    sample_ids: list[str]
    concepts: dict[str, h5py.Dataset]
    metadata: dict[str, Any]
    fingerprint: str
    references: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.logits[...]).argmax(axis=1)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Attributions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_attributions(path: Path) -> Attributions:
    """Open a finished ``attributions.h5`` for reading (clear ``StoreError`` on any problem)."""
    handle = open_h5(Path(path), FORMAT, VERSION)
    if "complete" in handle and not bool(np.all(handle["complete"][...])):
        handle.close()
        raise StoreError(f"{path}: some chunks are not written; re-run the attribution stage to finish it.")
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in handle["sample_id"][...]]
    return Attributions(
        path=Path(path),
        handle=handle,
        heatmaps=handle["attribution"],
        logits=handle["prediction"],
        labels=np.asarray(handle["label"][...]),
        targets=np.asarray(handle["target"][...]),
        sample_ids=ids,
        concepts={name: handle["concepts"][name] for name in handle["concepts"]},
        metadata=json.loads(handle.attrs["metadata"]),
        fingerprint=str(handle.attrs["fingerprint"]),
        references={
            name: (np.asarray(group["rows"][...]), np.asarray(group["values"][...]))
            for name, group in handle.get("references", {}).items()
        },
    )
