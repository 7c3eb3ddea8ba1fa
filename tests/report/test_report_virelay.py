"""ViRelAy export: project YAML, label map, input / attribution / analysis HDF5 in its layout."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from spray.analysis.config import SprayConfig
from spray.data.arrays import ArraySource
from spray.data.h5 import write_input_h5
from spray.report.context import ReportContext
from spray.report.render import render_report
from spray.report.virelay import export_virelay
from spray.store.analysis import write_analysis
from spray.store.attributions import AttributionLayout, AttributionWriter
from spray.store.common import StoreError

yaml = pytest.importorskip("yaml")

SIDE = 16


def _audit(context: ReportContext, folder: Path, with_input: bool) -> tuple[Path, np.ndarray]:
    """An audit folder with stage files made from the synthetic report context."""
    n = len(context.sample_ids)
    stages = folder / "stages"
    images = np.asarray(context.images, dtype=np.float32)
    if with_input:
        write_input_h5(stages / "input.h5", images, np.asarray(context.labels), context.sample_ids, context.class_names)
    layout = AttributionLayout(
        n_samples=n, heatmap_shape=(SIDE, SIDE), n_classes=3, concept_channels={"features.conv4": 4},
        chunk_size=n, fingerprint="f", metadata={
            "model": "Net", "composite": "epsilon_plus_flat", "canonizers": [], "layers": ["features.conv4"],
            "target": "prediction", "class_names": context.class_names,
        },
    )
    writer = AttributionWriter(stages / "attributions.h5", layout, np.asarray(context.labels), context.sample_ids)
    logits = np.eye(3, dtype=np.float32)[np.asarray(context.predictions)]
    writer.write_chunk(0, np.asarray(context.heatmaps, dtype=np.float32), logits, np.asarray(context.predictions), {"features.conv4": np.zeros((n, 4), np.float32)})
    writer.finish()
    write_analysis(stages / "analysis.h5", context.analyses, SprayConfig(embedding="tsne"))
    render_report(context, folder)
    return folder, images


def test_export_writes_the_virelay_layout(report_context: ReportContext, tmp_path: Path) -> None:
    audit, images = _audit(report_context, tmp_path / "audit", with_input=True)
    export = export_virelay(audit)
    assert export.project == audit / "virelay" / "project.yaml"

    project = yaml.safe_load(export.project.read_text(encoding="utf-8"))["project"]
    assert project["name"] == report_context.job_name  # hostile text survives quoting
    assert project["label_map"] == "label-map.json"
    dataset = project["dataset"]
    assert dataset["type"] == "hdf5" and dataset["path"] == "input.h5"
    assert (dataset["input_width"], dataset["input_height"]) == (SIDE, SIDE)
    assert project["attributions"]["attribution_strategy"] == "predicted_label"
    assert project["attributions"]["sources"] == ["attribution.h5"]
    assert project["analyses"] == [{"analysis_method": "SpRAy heatmap", "sources": ["analysis-heatmap.h5"]}]
    for path in [dataset["path"], *project["attributions"]["sources"], project["label_map"]]:
        assert (export.project.parent / path).is_file()

    label_map = json.loads(export.label_map.read_text(encoding="utf-8"))
    assert label_map[0] == {"index": 0, "word_net_id": "0", "name": report_context.class_names[0]}

    with h5py.File(export.input, "r") as handle:
        np.testing.assert_array_equal(handle["data"][...], images)
        np.testing.assert_array_equal(handle["label"][...], report_context.labels)
    with h5py.File(export.attribution, "r") as handle:
        attribution = handle["attribution"]
        assert attribution.shape == (40, 3, SIDE, SIDE)
        # ViRelAy moves a leading channel axis to the back when it is the shortest, then sums it.
        assert int(np.argmin(attribution[0].shape)) == 0
        np.testing.assert_allclose(
            attribution[...].sum(axis=1), np.asarray(report_context.heatmaps, dtype=np.float32), rtol=1e-5, atol=1e-6
        )
        assert handle["prediction"].shape == (40, 3) and handle["label"].dtype == np.int64

    (analysis_path,) = export.analyses
    with h5py.File(analysis_path, "r") as handle:
        assert sorted(handle) == ["0", "1"]  # the not-analysable class is left out
        names = {key: (tuple(sorted(handle[key]["cluster"])), tuple(sorted(handle[key]["embedding"]))) for key in handle}
        assert set(names.values()) == {(("flagged", "spray"), ("spectral", "tsne"))}
        group = handle["0"]
        analysis = next(a for a in report_context.analyses if a.class_index == 0)
        np.testing.assert_array_equal(group["index"][...], analysis.rows)
        np.testing.assert_array_equal(group["cluster"]["spray"][...], analysis.labels)
        assert group["embedding"]["spectral"].attrs["eigenvalue"].shape == analysis.eigenvalues.shape
        assert group["embedding"]["tsne"].shape == (analysis.rows.size, 2)
        flagged = group["cluster"]["flagged"][...]
        artifact = analysis.clusters[0].member_rows
        assert np.array_equal(np.flatnonzero(flagged), np.searchsorted(analysis.rows, artifact))


def test_linked_input_reads_through(report_context: ReportContext, tmp_path: Path) -> None:
    audit, images = _audit(report_context, tmp_path / "audit", with_input=True)
    export = export_virelay(audit, tmp_path / "elsewhere", link_input=True)
    assert export.input.stat().st_size < 10_000
    with h5py.File(export.input, "r") as handle:
        np.testing.assert_array_equal(handle["data"][3], images[3])


def test_audit_without_stored_inputs_needs_the_source(report_context: ReportContext, tmp_path: Path) -> None:
    audit, images = _audit(report_context, tmp_path / "audit", with_input=False)
    with pytest.raises(StoreError, match="pass the audited dataset"):
        export_virelay(audit)
    source = ArraySource(images, np.asarray(report_context.labels), report_context.sample_ids, report_context.class_names)
    export = export_virelay(audit, source=source)
    with h5py.File(export.input, "r") as handle:
        np.testing.assert_array_equal(handle["data"][...], images)
        assert handle["sample_id"][3].decode() == report_context.sample_ids[3]


def test_missing_stage_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="stages/attributions.h5"):
        export_virelay(tmp_path)
