"""Audits of users' own data and models: folders, HDF5, entry points, weights, safety, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from spray.audit import run_audit
from spray.cli import EXIT_ERROR, EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK, main
from spray.jobs import JobSpecError, load_job

MODEL_PY = '''
import torch
from torch import nn

def build(num_classes):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, num_classes),
    )
'''


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, size=(n, 16, 16, 3)) * 255).astype(np.uint8)


def _write_job(folder: Path, data: str, model_extra: str = "", job_extra: str = "") -> Path:
    (folder / "model.py").write_text(MODEL_PY)
    torch.save(_build_model().state_dict(), folder / "weights.pt")
    job = folder / "job.toml"
    job.write_text(
        f'[job]\nname = "user"\noutput = "out"\n{job_extra}\n'
        f"[data]\n{data}\n"
        f'[model]\nsource = "entrypoint"\nentrypoint = "model.py:build"\nweights = "weights.pt"\n{model_extra}\n'
        '[attribution]\nlayers = ["3"]\nbatch_size = 16\n'
        '[analysis]\nembedding = "spectral"\npooled_size = 8\n'
    )
    return job


def _build_model() -> torch.nn.Module:
    namespace: dict = {}
    exec(MODEL_PY, namespace)
    return namespace["build"](2)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for label, name in enumerate(["cat", "dog <b>"]):
        (root / name).mkdir(parents=True)
        for index, pixels in enumerate(_images(24, label)):
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    return root


def test_audit_of_an_image_folder_with_entry_point_model_and_weights(tmp_path: Path, image_folder: Path) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"')
    result = run_audit(load_job(job), progress=False)
    summary = result.summary
    assert result.report == tmp_path / "out" / "user" / "index.html"
    assert summary["class_names"] == ["cat", "dog <b>"]
    assert summary["n_samples"] == 48
    assert {c["class_index"] for c in summary["classes"]} == {0, 1}
    ids = [i for c in summary["classes"] for k in c["clusters"] for i in k["member_ids"]]
    assert "cat/000.png" in ids and "cat/broken.png" not in ids
    # The corrupt file is skipped, counted and listed in the report and the summary.
    assert result.facts["skipped_images"] == 1
    assert "cat/broken.png" in summary["metadata"]["skipped unreadable images"]
    assert "cat/broken.png" in result.report.read_text()
    assert "dog &lt;b&gt;" in result.report.read_text()


def test_strict_folder_makes_a_corrupt_image_fatal(tmp_path: Path, image_folder: Path) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"\nstrict = true')
    assert main(["--no-progress", "audit", str(job)]) == EXIT_ERROR


def test_audit_of_an_hdf5_file_in_channels_last_uint8(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["data"] = np.concatenate([_images(24, 0), _images(24, 1)])
        handle["label"] = np.repeat([0, 1], 24)
    job = _write_job(tmp_path, 'source = "h5"\npath = "data.h5"\nclass_names = ["a", "b"]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]')
    result = run_audit(load_job(job), progress=False)
    assert result.summary["class_names"] == ["a", "b"]
    assert result.summary["n_samples"] == 48
    with h5py.File(tmp_path / "out" / "user" / "stages" / "attributions.h5", "r") as stored:
        assert stored["attribution"].shape == (48, 16, 16)
        model = _build_model().eval()
        x = (torch.from_numpy(np.concatenate([_images(24, 0), _images(24, 1)])).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        with torch.no_grad():
            np.testing.assert_allclose(stored["prediction"][...], model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_pickled_model_is_refused_without_trust_pickle(tmp_path: Path, image_folder: Path) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"')
    torch.save(_build_model(), tmp_path / "whole.pt")
    text = job.read_text().replace('source = "entrypoint"\nentrypoint = "model.py:build"\nweights = "weights.pt"', 'source = "pickle"\nweights = "whole.pt"')
    job.write_text(text)
    assert main(["--no-progress", "audit", str(job)]) == EXIT_ERROR
    job.write_text(text.replace('weights = "whole.pt"', 'weights = "whole.pt"\ntrust_pickle = true'))
    assert main(["--no-progress", "audit", str(job)]) == EXIT_OK


def test_weights_file_holding_a_pickle_names_the_opt_in(tmp_path: Path, image_folder: Path, capsys) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"')
    torch.save(_build_model(), tmp_path / "weights.pt")  # a whole model where a state dict belongs
    assert main(["--no-progress", "audit", str(job)]) == EXIT_ERROR
    assert "trust_pickle" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_stops_the_audit_before_any_work(tmp_path: Path, image_folder: Path, capsys) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"')
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    job.write_text(job.read_text().replace('output = "out"', 'output = "blocker/reports"'))
    assert main(["--no-progress", "audit", str(job)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "blocker" in err and "cannot write here" in err and "[job] output" in err
    assert (tmp_path / "blocker").read_text() == "a file where the output folder should be"


def test_output_never_leaves_the_output_folder(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "../escape"\n')
    with pytest.raises(JobSpecError, match="job.name"):
        load_job(job)
    job.write_text('[job]\nname = "ok"\noutput = "out"\n')
    assert load_job(job).output_dir == tmp_path / "out" / "ok"


def test_dated_runs_keep_the_newest(tmp_path: Path, image_folder: Path) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"', job_extra="dated = true\nkeep_runs = 2")
    spec = load_job(job)
    reports = [run_audit(spec, progress=False).report for _ in range(3)]
    runs = sorted(p.name for p in (tmp_path / "out" / "user" / "runs").iterdir())
    assert runs == sorted(r.parent.name for r in reports[1:])
    assert json.loads((reports[-1].parent / "summary.json").read_text())["job"] == "user"


def test_the_latest_report_of_a_dated_job_is_found_and_a_missing_one_named(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``spray correct`` reads the flags of the newest dated run; before any audit it says what to run."""

    job = _write_job(tmp_path, 'source = "folder"\npath = "images"', job_extra="dated = true")
    spec = load_job(job)
    with pytest.raises(FileNotFoundError, match="run 'spray audit' on the job first"):
        spec.folders.latest_report(spec.job.dated)
    reports = [run_audit(spec, progress=False).report for _ in range(2)]
    (spec.output_dir / "runs" / "29991231T000000Z").mkdir()  # a newer run that never finished
    assert spec.folders.latest_report(spec.job.dated) == reports[-1].parent
    # the flags are read from that run: a random model has none, which is what correct reports
    assert main(["--no-progress", "correct", str(job)]) == EXIT_ERROR
    assert "flagged no cluster" in capsys.readouterr().err


def test_check_exit_codes(tmp_path: Path, image_folder: Path) -> None:
    job = _write_job(tmp_path, 'source = "folder"\npath = "images"')
    # Random images and a random model: nothing to flag unless the threshold is 0. The folder
    # holds one corrupt image, so the audit is incomplete until the job accepts skipped images.
    assert main(["--no-progress", "check", str(job)]) == EXIT_INCOMPLETE
    job.write_text(job.read_text() + "\n[check]\nallow_skipped_images = true\n")
    assert main(["--no-progress", "check", str(job)]) == EXIT_OK
    job.write_text(job.read_text().replace('[analysis]\n', "[analysis]\nthreshold = 0.0\nmax_clusters = 4\n"))
    code = main(["--no-progress", "check", str(job)])
    summary = json.loads((tmp_path / "out" / "user" / "summary.json").read_text())
    assert code == (EXIT_FLAGGED if summary["flags"] else EXIT_OK)
    job.write_text(job.read_text().replace('path = "images"', 'path = "missing"'))
    assert main(["check", str(job)]) == EXIT_ERROR


def _completed_batches(partial: Path) -> int:
    """Batches the audit writing ``partial`` has completed (0 when unreadable now), read in
    a child process: HDF5 reading a file that another process is writing can read half-written
    metadata, and a library state corrupted that way must not outlive the read (under load,
    the in-process read once made a later file close of this test segfault)."""
    script = "import h5py, sys\nwith h5py.File(sys.argv[1], 'r', locking=False) as handle:\n    print(int(handle['complete'][...].sum()))"
    result = subprocess.run([sys.executable, "-c", script, str(partial)], capture_output=True, text=True, timeout=60)
    try:
        return int(result.stdout.strip())
    except ValueError:
        return 0


def test_killed_audit_resumes_to_the_same_summary(tmp_path: Path) -> None:
    """SIGKILL during the attribution pass, rerun: same flags and clusters as an uninterrupted run."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(800, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", data=images, label=np.repeat([0, 1], 400))
    job = _write_job(tmp_path, 'source = "npz"\npath = "data.npz"')
    job.write_text(job.read_text().replace("batch_size = 16", "batch_size = 4"))
    partial = tmp_path / "out" / "user" / "stages" / "attributions.h5.partial"
    command = [sys.executable, "-m", "spray.cli", "--no-progress", "audit", str(job)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists() and _completed_batches(partial) >= 20:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the audit finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out" / "user" / "summary.json").exists()
    assert main(["--no-progress", "audit", str(job)]) == EXIT_OK
    resumed = json.loads((tmp_path / "out" / "user" / "summary.json").read_text())
    reference_job = tmp_path / "ref.toml"
    reference_job.write_text(job.read_text().replace('name = "user"', 'name = "reference"'))
    assert main(["--no-progress", "audit", str(reference_job)]) == EXIT_OK
    reference = json.loads((tmp_path / "out" / "reference" / "summary.json").read_text())
    assert resumed["classes"] == reference["classes"]
    assert resumed["flags"] == reference["flags"]
