"""Export an audit for ViRelAy, the interactive viewer of SpRAy results.

``export_virelay(audit_dir)`` writes a ViRelAy project next to the audit's stage files,
in ``<audit>/virelay/`` unless told otherwise:

=======================  ===========================================================
``project.yaml``         the project file ViRelAy opens (``virelay project.yaml``)
``label-map.json``       ``[{"index": i, "word_net_id": "<i>", "name": <class name>}]``
``input.h5``             ``data`` float32 N×C×H×W in [0, 1], ``label`` int64 N
                         (plus ``sample_id``); copied, or external links to
                         ``stages/input.h5`` with ``link_input=True``
``attribution.h5``       ``attribution`` float32 N×C×H×W, ``prediction`` float32 N×K
                         (logits), ``label`` int64 N (true label), ``sample_id``
``analysis-<space>.h5``  one file per SpRAy space (``heatmap``, ``concept-<layer>``)
=======================  ===========================================================

ViRelAy renders an attribution by summing its channel axis, and fails on a single
channel, so the LRP heatmap (channels already summed) is written spread evenly over the
input's C channels (at least 2): channel ``c`` holds ``heatmap / C`` and the sum ViRelAy
shows is spray's heatmap.

Analysis files hold one group per analysed class, named by the class's ``word_net_id``
in the label map (the class index as text; ``all`` for a dataset-wide analysis):

* ``index``: uint32 (n,) rows of the attribution file;
* ``embedding/spectral``: float32 (n, m) Laplacian eigenvectors, attribute
  ``eigenvalue`` (m,);
* ``embedding/<name>``: float32 (n, 2) the picture embedding of the audit (``umap`` or
  ``tsne``), attribute ``base = "spectral"``;
* ``cluster/spray``: uint32 (n,) the audit's cluster per row (attributes ``k`` and
  ``embedding = "spectral"``);
* ``cluster/flagged``: uint32 (n,) 1 for members of a flagged cluster, else 0.

ViRelAy takes the clustering and embedding names of an analysis file from its first
class, so every class carries the same names; classes that could not be analysed are
left out. The project's ``attribution_strategy`` is ``true_label`` or
``predicted_label`` after the audit's explained target.

Strings in the YAML file are written as double-quoted JSON strings, which YAML reads
unchanged, so class names and paths cannot break the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spray.analysis.result import ClassAnalysis
from spray.store.common import write_text_atomic
from spray.store.analysis import read_analysis, read_config
from spray.store.attributions import read_attributions
from spray.store.common import StoreError, atomic_h5
from spray.store.folders import ANALYSIS_FILE, ATTRIBUTIONS_FILE, SUMMARY_FILE, JobFolders
from spray.store.folders import INPUT_FILE as STAGE_INPUT_FILE

PROJECT_FILE = "project.yaml"
LABEL_MAP_FILE = "label-map.json"
INPUT_FILE = "input.h5"
ATTRIBUTION_FILE = "attribution.h5"
COPY_CHUNK = 256
CLUSTERING = "spray"
FLAG_CLUSTERING = "flagged"


@dataclass
class VirelayExport:
    """What ``export_virelay`` wrote."""

    project: Path
    label_map: Path
    input: Path
    attribution: Path
    analyses: list[Path]


def find_stages(audit_dir: Path) -> Path:
    """The ``stages`` folder of an audit: in the folder, or two levels up for dated runs
    (``<job>/runs/<time>/``)."""
    for candidate in (JobFolders(audit_dir).stages, JobFolders(audit_dir.parent.parent).stages):
        if (candidate / ATTRIBUTIONS_FILE).is_file() and (candidate / ANALYSIS_FILE).is_file():
            return candidate
    raise StoreError(
        f"{audit_dir}: no stages/attributions.h5 and stages/analysis.h5 found in the audit "
        "folder (or two levels up); export needs a finished audit."
    )


def export_virelay(
    audit_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    source: Any | None = None,
    link_input: bool = False,
) -> VirelayExport:
    """Write a ViRelAy project for the audit in ``audit_dir`` (see the module docstring).

    Args:
        audit_dir: the audit folder (with ``summary.json``; stage files in ``stages/``).
        out_dir: where to write; default ``<audit_dir>/virelay``.
        source: the audited dataset (``read(rows)`` gives display images in [0, 1]);
            needed when the audit has no ``stages/input.h5`` (every source but the demo).
        link_input: with ``stages/input.h5``, write ``input.h5`` as HDF5 external links to
            it instead of a copy (no extra disk; the audit folder must stay together).

    Raises:
        StoreError: the stage files are missing or damaged, or no images are available.
    """
    audit = Path(audit_dir).resolve()
    stages = find_stages(audit)
    out = Path(out_dir).resolve() if out_dir is not None else JobFolders(audit).virelay
    out.mkdir(parents=True, exist_ok=True)
    summary = _read_summary(audit)
    analyses = read_analysis(stages / ANALYSIS_FILE)
    config = read_config(stages / ANALYSIS_FILE)
    with read_attributions(stages / ATTRIBUTIONS_FILE) as attributions:
        class_names = [str(name) for name in attributions.metadata.get("class_names", [])]
        class_names = class_names or [str(name) for name in summary.get("class_names", [])]
        shape = tuple(attributions.heatmaps.shape[1:])
        n_samples = int(attributions.heatmaps.shape[0])
        metadata = attributions.metadata
        _write_input(out / INPUT_FILE, stages / STAGE_INPUT_FILE, source, n_samples, link_input)
        with h5py.File(out / INPUT_FILE, "r") as written_input:
            channels = int(written_input["data"].shape[1])
        _write_attribution(out / ATTRIBUTION_FILE, attributions, max(2, channels))
    label_map = out / LABEL_MAP_FILE
    write_text_atomic(label_map, json.dumps(_label_map(class_names), indent=2, ensure_ascii=False) + "\n")
    written = []
    spaces = sorted({str(analysis.space) for analysis in analyses})
    for space in spaces:
        chosen = [a for a in analyses if str(a.space) == space and a.analysable]
        if not chosen:
            continue
        path = out / f"analysis-{_file_key(space)}.h5"
        _write_analysis(path, chosen, config.embedding)
        written.append((space, path))
    project = out / PROJECT_FILE
    write_text_atomic(project, _project_yaml(summary, metadata, shape, written))
    return VirelayExport(
        project=project,
        label_map=label_map,
        input=out / INPUT_FILE,
        attribution=out / ATTRIBUTION_FILE,
        analyses=[path for _, path in written],
    )


def category_name(class_index: int) -> str:
    """The analysis group (and label-map ``word_net_id``) of a class."""
    return "all" if int(class_index) == -1 else str(int(class_index))


def _label_map(class_names: list[str]) -> list[dict[str, Any]]:
    return [
        {"index": index, "word_net_id": category_name(index), "name": name}
        for index, name in enumerate(class_names)
    ]


def _read_summary(audit: Path) -> dict[str, Any]:
    path = audit / SUMMARY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_attribution(path: Path, attributions: Any, channels: int) -> None:
    """Heatmaps spread over ``channels``, logits, true labels and ids, copied in row chunks."""
    heatmaps = attributions.heatmaps
    n, height, width = heatmaps.shape
    with atomic_h5(path) as handle:
        target = handle.create_dataset(
            "attribution", shape=(n, channels, height, width), dtype="f4",
            chunks=(min(COPY_CHUNK, n), channels, height, width), compression="gzip", compression_opts=1,
        )
        for start in range(0, n, COPY_CHUNK):
            stop = min(n, start + COPY_CHUNK)
            share = np.asarray(heatmaps[start:stop], dtype=np.float32) / channels
            target[start:stop] = np.repeat(share[:, None], channels, axis=1)
        handle.create_dataset("prediction", data=np.asarray(attributions.logits[...], dtype=np.float32))
        handle.create_dataset("label", data=np.asarray(attributions.labels, dtype=np.int64))
        handle.create_dataset(
            "sample_id", data=np.array(attributions.sample_ids, dtype=object), dtype=h5py.string_dtype()
        )


def _write_input(path: Path, stored: Path, source: Any | None, n_samples: int, link: bool) -> None:
    """``data`` and ``label`` from ``stages/input.h5`` (copy or link) or from ``source``."""
    if stored.is_file():
        with h5py.File(stored, "r") as handle:
            if "data" not in handle or "label" not in handle or handle["data"].ndim != 4:
                raise StoreError(f"{stored}: no 4-D 'data' and 'label'; cannot export the inputs.")
            if link:
                relative = os.path.relpath(stored, path.parent)
                with atomic_h5(path) as out:
                    for name in ("data", "label", "sample_id"):
                        if name in handle:
                            out[name] = h5py.ExternalLink(relative, name)
                return
            _copy_input(path, handle["data"], handle["label"][...], handle.get("sample_id"))
            return
    if source is None:
        raise StoreError(
            f"{stored} does not exist (only demo audits store their inputs); pass the audited "
            "dataset as `source` to export its images."
        )
    if len(source) != n_samples:
        raise StoreError(f"the source has {len(source)} samples but the audit {n_samples}.")

    class Reader:
        shape = (n_samples, *source.read(np.array([0])).shape[1:])

        def __getitem__(self, window: slice) -> np.ndarray:
            return source.read(np.arange(n_samples)[window])

    _copy_input(path, Reader(), np.asarray(source.labels), None, list(source.sample_ids))


def _copy_input(
    path: Path, data: Any, labels: np.ndarray, ids: Any | None, id_list: list[str] | None = None
) -> None:
    n = int(data.shape[0])
    with atomic_h5(path) as handle:
        target = handle.create_dataset(
            "data", shape=tuple(data.shape), dtype="f4",
            chunks=(min(64, n), *data.shape[1:]), compression="gzip", compression_opts=1,
        )
        for start in range(0, n, COPY_CHUNK):
            stop = min(n, start + COPY_CHUNK)
            target[start:stop] = np.asarray(data[start:stop], dtype=np.float32)
        handle.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
        names = id_list if id_list is not None else (None if ids is None else ids[...].tolist())
        if names is not None:
            texts = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            handle.create_dataset("sample_id", data=np.array(texts, dtype=object), dtype=h5py.string_dtype())


def _write_analysis(path: Path, analyses: list[ClassAnalysis], embedding_name: str) -> None:
    picture = embedding_name if embedding_name != "spectral" else "spectral-2d"
    with atomic_h5(path) as handle:
        for analysis in analyses:
            group = handle.create_group(category_name(analysis.class_index))
            group.attrs["name"] = f"{analysis.class_name} ({analysis.space})"
            rows = np.asarray(analysis.rows, dtype=np.uint32)
            group.create_dataset("index", data=rows)
            embeddings = group.create_group("embedding")
            spectral = embeddings.create_dataset(
                "spectral", data=np.asarray(analysis.spectral_embedding, dtype=np.float32)
            )
            spectral.attrs["eigenvalue"] = np.asarray(analysis.eigenvalues, dtype=np.float32)
            flat = embeddings.create_dataset(
                picture, data=np.asarray(analysis.embedding_2d, dtype=np.float32)
            )
            flat.attrs["base"] = "spectral"
            clusters = group.create_group("cluster")
            labels = np.asarray(analysis.labels, dtype=np.int64)
            spray = clusters.create_dataset(CLUSTERING, data=labels.astype(np.uint32))
            spray.attrs["k"] = int(analysis.n_clusters)
            spray.attrs["embedding"] = "spectral"
            flagged_ids = [int(c.cluster_id) for c in analysis.clusters if c.flagged]
            flags = clusters.create_dataset(
                FLAG_CLUSTERING, data=np.isin(labels, flagged_ids).astype(np.uint32)
            )
            flags.attrs["k"] = 2
            flags.attrs["embedding"] = "spectral"


def _project_yaml(
    summary: dict[str, Any],
    metadata: dict[str, Any],
    shape: tuple[int, ...],
    analyses: list[tuple[str, Path]],
) -> str:
    """The project file; every string is a JSON string literal (valid YAML)."""
    quote = lambda value: json.dumps(str(value), ensure_ascii=True)  # noqa: E731
    height, width = int(shape[-2]), int(shape[-1])
    info = summary.get("metadata") or {}
    strategy = "predicted_label" if metadata.get("target") == "prediction" else "true_label"
    lines = [
        "project:",
        f"  name: {quote(summary.get('job') or 'spray audit')}",
        f"  model: {quote(info.get('model') or metadata.get('model', 'model'))}",
        f"  label_map: {quote(LABEL_MAP_FILE)}",
        "  dataset:",
        f"    name: {quote(info.get('dataset') or 'dataset')}",
        "    type: hdf5",
        f"    path: {quote(INPUT_FILE)}",
        f"    input_width: {width}",
        f"    input_height: {height}",
        "    up_sampling_method: none",
        "    down_sampling_method: none",
        "  attributions:",
        f"    attribution_method: {quote('LRP ' + str(metadata.get('composite', '')))}",
        f"    attribution_strategy: {strategy}",
        "    sources:",
        f"    - {quote(ATTRIBUTION_FILE)}",
    ]
    if analyses:
        lines.append("  analyses:")
        for space, path in analyses:
            lines.append(f"  - analysis_method: {quote('SpRAy ' + space)}")
            lines.append("    sources:")
            lines.append(f"    - {quote(path.name)}")
    return "\n".join(lines) + "\n"


def _file_key(space: str) -> str:
    """A file-name-safe form of a space name (``concept:features.conv4`` -> ``concept-features.conv4``)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", space).strip("-") or "space"
