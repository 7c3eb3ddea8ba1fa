"""The demo audit end to end: the planted tag is the top flag, a clean model raises none."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from spray.audit import run_audit
from spray.cli import main
from spray.jobs import JobSpec, demo_job

pytestmark = pytest.mark.slow


def _small_demo(output: Path, fraction: float) -> JobSpec:
    """The demo at a third of its size, with the cheap spectral picture instead of UMAP."""
    spec = demo_job(output, n_per_class=200, artifact_fraction=fraction)
    spec.analysis.embedding = "spectral"
    return spec


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    spec = _small_demo(tmp_path_factory.mktemp("planted"), 0.3)
    return spec, run_audit(spec, progress=False)


def test_top_flag_is_the_planted_tag_cluster(planted) -> None:
    spec, result = planted
    flags = result.summary["flags"]
    assert flags, "the planted artifact raised no flag"
    top = flags[0]
    assert top["class_index"] == spec.data.artifact_class
    with h5py.File(spec.output_dir / "stages" / "input.h5", "r") as inputs:
        stamped = set(np.flatnonzero(inputs["stamped"][...]).tolist())
    members = set(top["member_rows"])
    precision = len(members & stamped) / len(members)
    recall = len(members & stamped) / len(stamped)
    assert precision >= 0.9, f"precision {precision:.3f}"
    assert recall >= 0.8, f"recall {recall:.3f}"
    # The ids in the summary are the dataset's ids of those rows.
    ids = json.loads((spec.output_dir / "summary.json").read_text())["flags"][0]["member_ids"]
    assert all(i.startswith("train/") and i.endswith("_square") for i in ids)


def test_model_really_uses_the_tag(planted) -> None:
    _, result = planted
    check = result.summary["artifact_check"]
    assert check["flip_rate"] >= 0.3, check
    assert check["mean_prob_after"] > check["mean_prob_before"] + 0.2, check


def test_report_lists_the_flag_first(planted) -> None:
    spec, result = planted
    html = result.report.read_text()
    assert result.report == spec.output_dir / "index.html"
    assert 'id="flag-0"' in html
    assert html.index('id="flag-0"') < html.index('id="class-0"')
    assert "http://" not in html and "https://" not in html


def test_rerun_reuses_model_and_attributions(planted) -> None:
    spec, result = planted
    attributions = spec.output_dir / "stages" / "attributions.h5"
    before = attributions.stat().st_mtime_ns
    again = run_audit(spec, progress=False)
    assert again.facts["model_trained_now"] is False
    assert attributions.stat().st_mtime_ns == before
    assert [f["member_rows"] for f in again.summary["flags"]] == [f["member_rows"] for f in result.summary["flags"]]


def test_clean_model_raises_no_flag(tmp_path) -> None:
    spec = _small_demo(tmp_path, 0.0)
    result = run_audit(spec, progress=False)
    assert result.summary["flags"] == []
    assert result.facts["test_accuracy"] >= 0.8


def test_check_exit_code_follows_the_flags(tmp_path, planted) -> None:
    spec, _ = planted
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "{spec.job.name}"\noutput = "{spec.output_dir.parent.as_posix()}"\n'
        '[data]\nn_per_class = 200\n[attribution]\nlayers = ["features.conv3", "features.conv4"]\n'
        '[analysis]\nembedding = "spectral"\n'
    )
    assert main(["--no-progress", "check", str(job)]) == 1
    job.write_text('[job]\nname = "x"\n[data]\nn_per_clas = 1\n')
    assert main(["check", str(job)]) == 2


def test_correct_command_recovers_the_attacked_accuracy(tmp_path, planted, capsys) -> None:
    spec, _ = planted
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "{spec.job.name}"\noutput = "{spec.output_dir.parent.as_posix()}"\n[data]\nn_per_class = 200\n')
    assert main(["correct", str(job), "--method", "r-clarc"]) == 0
    report = json.loads((spec.output_dir / "correction" / "r-clarc" / "report.json").read_text())
    assert report["recovered_share"] >= 0.7, report["recovered_share"]
    assert report["clean_accuracy_change"] >= -0.02
    assert (spec.output_dir / "correction" / "r-clarc" / "model.torchscript.pt").exists()


def test_audit_index_lists_the_audit(planted) -> None:
    spec, _ = planted
    index = (spec.output_dir.parent / "index.html").read_text()
    assert "demo/index.html" in index
