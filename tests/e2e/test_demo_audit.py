"""The demo audit end to end: the planted tag is the top flag, a clean model raises none."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from spray.audit import run_audit
from spray.cli import main
from spray.correction import Gate, fit_cav, load_job_inputs, r_clarc, run_reaudit
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


def _job_file(folder: Path, spec: JobSpec, extra: str = "") -> Path:
    """A job file for the planted audit's folder (same data, model cache and SpRAy settings)."""
    job = folder / "job.toml"
    job.write_text(
        f'[job]\nname = "{spec.job.name}"\noutput = "{spec.output_dir.parent.as_posix()}"\n[data]\nn_per_class = 200\n'
        f'[analysis]\nembedding = "spectral"\n{extra}'
    )
    return job


@pytest.fixture(scope="module")
def corrected(planted, tmp_path_factory):
    """``spray correct`` with R-ClArC (set in the job's [correct] section) and its re-audit; what it printed."""
    spec, _ = planted
    job = _job_file(tmp_path_factory.mktemp("correct"), spec, '[correct]\nmethod = "r-clarc"\n')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--no-progress", "correct", str(job)])
    folder = spec.output_dir / "correction" / "r-clarc"
    return code, printed.getvalue(), folder, json.loads((folder / "report.json").read_text())


def test_correct_command_recovers_the_attacked_accuracy(corrected) -> None:
    code, _, folder, report = corrected
    assert code == 0
    assert report["recovered_share"] >= 0.7, report["recovered_share"]
    assert report["clean_accuracy_change"] >= -0.02
    assert (folder / "model.torchscript.pt").exists()


def _jaccard(first: list[int], second: list[int]) -> float:
    a, b = set(first), set(second)
    return len(a & b) / len(a | b)


def test_reaudit_of_the_corrected_model_raises_no_flag_on_the_artifact_cluster(planted, corrected) -> None:
    """Observed (200 per class, R-ClArC at features.relu3): the audit flagged the 60 tagged squares
    (score 0.897, threshold 0.75, found in the heatmap and concept spaces); the re-audit of the
    corrected model puts every class, in every space, in one cluster (score 0.0): the square
    cluster that holds the flag's members has Jaccard 0.30 with it, and no flag is raised at all.
    The overlaps are recomputed here from the re-audit's summary.json."""
    spec, result = planted
    code, printed, folder, report = corrected
    flag, threshold = result.summary["flags"][0], result.summary["threshold"]
    assert code == 0 and flag["artifact_score"] >= threshold
    reaudit = json.loads((folder / "reaudit" / "summary.json").read_text())
    square = [(entry["space"], cluster) for entry in reaudit["classes"] if entry["class_index"] == flag["class_index"]
              for cluster in entry["clusters"]]
    assert {space for space, _ in square} >= {"heatmap"}
    overlaps = [(_jaccard(flag["member_rows"], cluster["member_rows"]), cluster) for _, cluster in square]
    assert all(not cluster["flagged"] for _, cluster in square), [(j, c["artifact_score"]) for j, c in overlaps]
    assert max(j for j, _ in overlaps) < 1.0  # the tagged squares no longer form a cluster of their own
    assert all(cluster["artifact_score"] is None or cluster["artifact_score"] < threshold for _, cluster in square)
    outcome = report["reaudit"]
    assert outcome["flag_gone"] is True and outcome["persisting"] == [] and outcome["n_flags_in_class"] == 0
    # re-tested on the corrected model, the members' tag no longer moves other classes' images
    assert outcome["retest"]["follows"] is False and outcome["retest"]["strongest"]["low"] <= 0
    assert outcome["best_match"]["jaccard"] == pytest.approx(max(j for j, _ in overlaps), abs=1e-4)
    assert outcome["original"]["artifact_score"] == pytest.approx(flag["artifact_score"])
    assert outcome["artifact_check"]["flip_rate"] < outcome["artifact_check_before"]["flip_rate"] - 0.2
    assert "re-audit: the flag on class 'square'" in printed
    assert "is gone" in printed and str(folder / "reaudit" / "index.html") in printed
    # Everything stays inside the job's folder; the correction page links the re-audit and the comparison.
    assert (folder / "reaudit" / "index.html").is_file() and (folder / "reaudit" / "stages" / "attributions.h5").is_file()
    page = (folder / "index.html").read_text()
    assert 'href="reaudit/index.html"' in page and 'href="compare.html"' in page and "flag gone" in page
    assert json.loads((folder / "compare.json").read_text())["counts"]["disappeared"] >= 1
    index = (spec.output_dir.parent / "index.html").read_text()
    assert 'href="demo/correction/r-clarc/index.html"' in index and "flag gone" in index


def test_reaudit_finds_the_flag_again_when_the_correction_changes_nothing(planted) -> None:
    """Control for the test above: a ClArC model whose gate never fires computes the original
    logits through the same explainable view, engine and re-audit; the flag must come back
    (observed: the same 60 members, Jaccard 1.0, score as in the audit)."""
    spec, result = planted
    flag = result.summary["flags"][0]
    inputs = load_job_inputs(spec)
    cav = fit_cav(inputs.model, inputs.display, inputs.labels, flag["member_rows"], "features.relu3", pooling="flatten")
    idle = r_clarc(inputs.model, cav, Gate(kind="detector", threshold=math.inf))
    outcome = run_reaudit(spec, inputs.model, idle, flag, spec.output_dir / "correction" / "idle" / "reaudit")
    assert outcome["flag_gone"] is False, outcome["best_match"]
    assert outcome["persisting"][0]["jaccard"] >= 0.9
    assert outcome["persisting"][0]["artifact_score"] >= result.summary["threshold"]
    # and the re-test of the members on the unchanged model still finds the tag moving images
    assert outcome["retest"]["follows"] is True and outcome["retest"]["strongest"]["low"] > 0.2


def test_correct_command_names_a_missing_layer_and_flag(tmp_path, planted, capsys) -> None:
    spec, _ = planted
    job = _job_file(tmp_path, spec)
    assert main(["correct", str(job), "--flag", "9", "--no-reaudit"]) == 2
    assert f"flag 9 does not exist: the audit has {len(planted[1].summary['flags'])} flag(s)" in capsys.readouterr().err
    assert main(["correct", str(job), "--layer", "features.conv9", "--no-reaudit"]) == 2
    error = capsys.readouterr().err
    assert "layer 'features.conv9' not found in the model; valid layers: features, features.conv1" in error
    assert "spray correct --layer" in error


def test_audit_index_lists_the_audit(planted) -> None:
    spec, _ = planted
    index = (spec.output_dir.parent / "index.html").read_text()
    assert "demo/index.html" in index
