"""``analysis.h5``: SpRAy results per class, the input of the report stage.

Layout (format ``"spray-analysis"``, version 1)::

    /                       attrs: format, format_version, config (SprayConfig as JSON),
                                   n_analyses
    /classes/<class_index>/<space key>      one group per ClassAnalysis
        attrs: position (index in the written list), class_index, class_name, space,
               n_clusters, analysable, reason, has_class_mean
        rows                (n,)   int64   attribution-file rows, ascending
        eigenvalues         (m,)   float64 Laplacian eigenvalues, ascending
        labels              (n,)   int64   cluster per row
        spectral_embedding  (n, m) float32 Laplacian eigenvectors
        embedding_2d        (n, 2) float32 picture coordinates
        class_mean_heatmap  (h, w) float32 (only if has_class_mean)
        clusters/<j>        j = rank by artifact score (0 = highest)
            attrs: cluster_id, score, flagged, candidate, components (JSON),
                   confirmation (JSON; "null" when no causal test was asked for)
            member_rows     (size,) int64
            mean_heatmap    (h, w)  float32
            examples/<name> (k, H, W, C) uint8 before/after images of the causal test

``<class_index>`` is ``-1`` for a dataset-wide analysis. ``<space key>`` is the space name
(``"heatmap"``, ``"concept:<layer>"``) with ``/`` replaced (HDF5 would read it as a path);
the exact name is kept in the ``space`` attribute. Mean heatmaps of a concept space have
shape (1, channels). The ``config`` attribute holds every ``SprayConfig`` field; a file
written before a field existed reads back with that field's default. Arrays are written with the dtype they have,
so a round trip returns equal arrays of equal dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from spray.analysis.config import SprayConfig
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.store.common import StoreError, atomic_h5, open_h5

FORMAT = "spray-analysis"
FORMAT_VERSION = 1

_ARRAYS = ("rows", "eigenvalues", "labels", "spectral_embedding", "embedding_2d")


def _space_key(space: str) -> str:
    return space.replace("/", "|") or "_"


def write_analysis(path: Path, analyses: list[ClassAnalysis], config: SprayConfig) -> None:
    """Write ``analyses`` and the ``config`` they were computed with, atomically.

    The file appears under ``path`` only once complete (see ``atomic_h5``).

    Raises:
        StoreError: when two analyses share a class index and space.
    """
    path = Path(path)
    seen: set[tuple[int, str]] = set()
    for analysis in analyses:
        key = (int(analysis.class_index), _space_key(analysis.space))
        if key in seen:
            raise StoreError(
                f"{path}: two analyses for class {key[0]} in space {analysis.space!r}; "
                "each (class, space) pair can be written once."
            )
        seen.add(key)
    with atomic_h5(path) as handle:
        handle.attrs["format"] = FORMAT
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["config"] = json.dumps(config.to_dict(), sort_keys=True)
        handle.attrs["n_analyses"] = len(analyses)
        classes = handle.create_group("classes")
        for position, analysis in enumerate(analyses):
            parent = classes.require_group(str(int(analysis.class_index)))
            _write_class(parent.create_group(_space_key(analysis.space)), analysis, position)


def _write_class(group: h5py.Group, analysis: ClassAnalysis, position: int) -> None:
    group.attrs["position"] = position
    group.attrs["class_index"] = int(analysis.class_index)
    group.attrs["class_name"] = str(analysis.class_name)
    group.attrs["space"] = str(analysis.space)
    group.attrs["n_clusters"] = int(analysis.n_clusters)
    group.attrs["analysable"] = bool(analysis.analysable)
    group.attrs["reason"] = str(analysis.reason)
    group.attrs["has_class_mean"] = analysis.class_mean_heatmap is not None
    for name in _ARRAYS:
        group.create_dataset(name, data=np.asarray(getattr(analysis, name)))
    if analysis.class_mean_heatmap is not None:
        group.create_dataset("class_mean_heatmap", data=np.asarray(analysis.class_mean_heatmap))
    clusters = group.create_group("clusters")
    for rank, cluster in enumerate(analysis.clusters):
        item = clusters.create_group(str(rank))
        item.attrs["cluster_id"] = int(cluster.cluster_id)
        item.attrs["score"] = float(cluster.artifact_score)
        item.attrs["flagged"] = bool(cluster.flagged)
        item.attrs["components"] = json.dumps(
            {str(k): float(v) for k, v in cluster.score_components.items()}
        )
        item.attrs["candidate"] = bool(cluster.candidate)
        item.attrs["confirmation"] = json.dumps(cluster.confirmation, sort_keys=True)
        item.create_dataset("member_rows", data=np.asarray(cluster.member_rows))
        item.create_dataset("mean_heatmap", data=np.asarray(cluster.mean_heatmap))
        examples = item.create_group("examples")
        for name, images in cluster.examples.items():
            examples.create_dataset(name, data=np.asarray(images, dtype=np.uint8))


def read_analysis(path: Path) -> list[ClassAnalysis]:
    """All analyses in ``path``, in the order they were written.

    Raises:
        StoreError: naming the file when it is missing, truncated, unreadable, of another
            format or version, or lacks parts of the layout.
    """
    path = Path(path)
    handle = open_h5(path, FORMAT, FORMAT_VERSION)
    try:
        with handle:
            groups = [
                space_group
                for class_group in handle["classes"].values()
                for space_group in class_group.values()
            ]
            analyses = sorted(
                ((int(g.attrs["position"]), _read_class(g)) for g in groups),
                key=lambda item: item[0],
            )
            expected = int(handle.attrs["n_analyses"])
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise StoreError(
            f"{path}: damaged analysis file ({type(error).__name__}: {error}). "
            "Delete it and re-run the analysis stage."
        ) from error
    if len(analyses) != expected:
        raise StoreError(
            f"{path}: holds {len(analyses)} analyses but records {expected}; the file is "
            "damaged. Delete it and re-run the analysis stage."
        )
    return [analysis for _, analysis in analyses]


def read_config(path: Path) -> SprayConfig:
    """The :class:`SprayConfig` the analyses in ``path`` were computed with."""
    path = Path(path)
    with open_h5(path, FORMAT, FORMAT_VERSION) as handle:
        try:
            return SprayConfig.from_dict(json.loads(handle.attrs["config"]))
        except (KeyError, ValueError, TypeError) as error:
            raise StoreError(f"{path}: unreadable analysis config ({error}).") from error


def _read_class(group: h5py.Group) -> ClassAnalysis:
    clusters = [
        _read_cluster(group["clusters"][key])
        for key in sorted(group["clusters"].keys(), key=int)
    ]
    return ClassAnalysis(
        class_index=int(group.attrs["class_index"]),
        class_name=_text(group.attrs["class_name"]),
        space=_text(group.attrs["space"]),
        rows=group["rows"][()],
        eigenvalues=group["eigenvalues"][()],
        n_clusters=int(group.attrs["n_clusters"]),
        labels=group["labels"][()],
        spectral_embedding=group["spectral_embedding"][()],
        embedding_2d=group["embedding_2d"][()],
        clusters=clusters,
        class_mean_heatmap=(
            group["class_mean_heatmap"][()] if bool(group.attrs["has_class_mean"]) else None
        ),
        analysable=bool(group.attrs["analysable"]),
        reason=_text(group.attrs["reason"]),
    )


def _read_cluster(group: h5py.Group) -> ClusterResult:
    return ClusterResult(
        cluster_id=int(group.attrs["cluster_id"]),
        member_rows=group["member_rows"][()],
        artifact_score=float(group.attrs["score"]),
        flagged=bool(group.attrs["flagged"]),
        score_components={k: float(v) for k, v in json.loads(group.attrs["components"]).items()},
        mean_heatmap=group["mean_heatmap"][()],
        candidate=bool(group.attrs.get("candidate", group.attrs["flagged"])),
        confirmation=json.loads(group.attrs.get("confirmation", "null")),
        examples={name: data[()] for name, data in group["examples"].items()} if "examples" in group else {},
    )


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
