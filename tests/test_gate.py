"""The deployment gate: ``spray check`` says "clean" (exit 0) only when it checked everything.

Each bad input runs after a clean audit of the same job folder, so every case also shows
that no earlier result was lost (it is kept as ``summary.previous.json``) or left looking
current (``summary.json`` carries this run's verdict, never the previous one's).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spray.cli import EXIT_BUSY, EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, main
from spray.report.failed import PREVIOUS_SUMMARY

MODEL_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))

    def forward(self, x):
        return self.head(self.features(x))

def build(num_classes):
    return Net(num_classes)
'''

JOB = """[job]
name = "gate"
output = "out"

[data]
source = "npz"
path = "data.npz"

[model]
source = "entrypoint"
entrypoint = "model.py:build"
weights = "weights.pt"

[attribution]
layers = ["features.0"]
batch_size = 16

[analysis]
embedding = "spectral"
pooled_size = 8

# The data are noise and the model untrained: pasted pixels move its predictions whichever
# cluster they come from, so the clusters under the score threshold would be flagged too.
# These tests are about the gate's bookkeeping; the candidates by score stay tested, and the
# gate accepts the untested clusters under the threshold (the [check] table comes last, so
# a test appends its own keys to it).
[confirm]
max_low_score = 0

[check]
allow_untested_low_score = true
"""


def _dataset(n_per_class: int = 40, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(n_per_class * classes, 3, 16, 16)).astype(np.float32)
    return images, np.repeat(np.arange(classes), n_per_class)


@dataclass
class Workspace:
    folder: Path

    @property
    def job(self) -> Path:
        return self.folder / "job.toml"

    @property
    def out(self) -> Path:
        return self.folder / "out" / "gate"

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def check(self, *extra: str) -> int:
        return main(["--no-progress", "check", *extra, str(self.job)])


def _save_weights(folder: Path, classes: int) -> None:
    """Build ``folder/model.py``'s net for ``classes`` classes and save its weights."""
    spec = importlib.util.spec_from_file_location(f"gate_model_{time.monotonic_ns()}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build(classes).state_dict(), folder / "weights.pt")


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A job folder whose first audit was clean (exit 0)."""
    (tmp_path / "model.py").write_text(MODEL_PY)
    _save_weights(tmp_path, 2)
    images, labels = _dataset()
    np.savez(tmp_path / "data.npz", data=images, label=labels)
    (tmp_path / "job.toml").write_text(JOB)
    space = Workspace(tmp_path)
    assert space.check() == EXIT_OK
    assert space.summary()["verdict"] == "clean" and space.summary()["complete"] is True
    return space


def _replace_data(space: Workspace, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez(space.folder / "data.npz", data=images, label=labels)


def _nan_weight(space: Workspace) -> None:
    weights = torch.load(space.folder / "weights.pt", weights_only=True)
    weights["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, space.folder / "weights.pt")


def _tiny_class(space: Workspace) -> None:
    images, labels = _dataset()
    _replace_data(space, np.concatenate([images, images[:2]]), np.concatenate([labels, [2, 2]]))
    _save_weights(space.folder, 3)


def _empty_class(space: Workspace) -> None:
    space.job.write_text(space.job.read_text().replace("[data]\n", '[data]\nclass_names = ["a", "b", "never seen"]\n'))
    _save_weights(space.folder, 3)


def _zero_class(space: Workspace) -> None:
    """Class 1 all zeros through a net without a first-layer bias: its heatmaps are all zero."""
    images, labels = _dataset()
    images[labels == 1] = 0.0
    _replace_data(space, images, labels)
    (space.folder / "model.py").write_text(MODEL_PY.replace("nn.Conv2d(3, 8, 3, padding=1)", "nn.Conv2d(3, 8, 3, padding=1, bias=False)"))
    _save_weights(space.folder, 2)


def _exit_in_forward(code: str) -> Callable[[Workspace], None]:
    def change(space: Workspace) -> None:
        (space.folder / "model.py").write_text(MODEL_PY.replace("        return self.head(", f"        import sys; sys.exit({code})\n        return self.head("))

    return change


def _exit_in_builder(code: str) -> Callable[[Workspace], None]:
    def change(space: Workspace) -> None:
        (space.folder / "model.py").write_text(MODEL_PY.replace("    return Net(num_classes)", f"    import sys; sys.exit({code})"))

    return change


def _job_line(old: str, new: str) -> Callable[[Workspace], None]:
    def change(space: Workspace) -> None:
        text = space.job.read_text()
        assert old in text
        space.job.write_text(text.replace(old, new))

    return change


def _missing_data(space: Workspace) -> None:
    (space.folder / "data.npz").unlink()


def _truncated_data(space: Workspace) -> None:
    path = space.folder / "data.npz"
    path.write_bytes(path.read_bytes()[:200])


@dataclass
class Case:
    name: str
    change: Callable[[Workspace], None]
    code: int
    message: str  # a regular expression the printed error or the verdict lines must match
    verdict: str  # what summary.json says afterwards


CASES = [
    Case("one NaN weight", _nan_weight, EXIT_INCOMPLETE, r"not analysed: .*NaN", "incomplete"),
    Case("a class with 2 samples", _tiny_class, EXIT_INCOMPLETE, r"class '2' \(heatmap\) not analysed: 2 analysable samples", "incomplete"),
    Case("an empty class", _empty_class, EXIT_INCOMPLETE, r"class 'never seen' \(heatmap\) not analysed: no samples", "incomplete"),
    Case("an all-zero class", _zero_class, EXIT_INCOMPLETE, r"class '1' \(heatmap\) not analysed: .*constant", "incomplete"),
    Case("sys.exit() in forward", _exit_in_forward(""), EXIT_ERROR, r"sys\.exit\(None\)", "error"),
    Case("sys.exit(0) in forward", _exit_in_forward("0"), EXIT_ERROR, r"sys\.exit\(0\)", "error"),
    Case("sys.exit('message') in the model builder", _exit_in_builder("'no model today'"), EXIT_ERROR, r"no model today", "error"),
    Case("missing data file", _missing_data, EXIT_ERROR, r"data\.npz", "error"),
    Case("truncated data file", _truncated_data, EXIT_ERROR, r"data\.npz", "error"),
    Case("threshold = nan", _job_line("[analysis]\n", "[analysis]\nthreshold = nan\n"), EXIT_ERROR, r"job\.toml:\d+: analysis\.threshold must be a finite number", "error"),
    Case("threshold = inf", _job_line("[analysis]\n", "[analysis]\nthreshold = inf\n"), EXIT_ERROR, r"analysis\.threshold must be a finite number", "error"),
    Case("seed = -1", _job_line('output = "out"\n', 'output = "out"\nseed = -1\n'), EXIT_ERROR, r"job\.toml:\d+: job\.seed must be at least 0", "error"),
    Case("workers = 0", _job_line("[analysis]\n", "[cluster]\nworkers = 0\n[analysis]\n"), EXIT_ERROR, r"cluster\.workers must be at least 1", "error"),
    Case("memory_limit = lots", _job_line("[analysis]\n", '[cluster]\nmemory_limit = "lots"\n[analysis]\n'), EXIT_ERROR, r"cluster\.memory_limit must be a memory size", "error"),
    Case("max_clusters above n_eigen", _job_line("[analysis]\n", "[analysis]\nmax_clusters = 40\n"), EXIT_ERROR, r"analysis\.max_clusters \(40\) must be below n_eigen", "error"),
    Case("unknown normalisation", _job_line("[analysis]\n", '[analysis]\nnormalisation = "foo"\n'), EXIT_ERROR, r"analysis\.normalisation must be one of", "error"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_its_exit_code_a_named_message_and_never_a_stale_verdict(
    workspace: Workspace, case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    before = workspace.summary()
    case.change(workspace)
    code = workspace.check()
    printed = capsys.readouterr()
    assert code == case.code, printed.err + printed.out
    assert re.search(case.message, printed.err + printed.out), printed.err + printed.out
    after = workspace.summary()
    assert after["verdict"] == case.verdict
    assert after["created"] >= before["created"]
    previous = workspace.out / PREVIOUS_SUMMARY
    assert previous.is_file() and json.loads(previous.read_text())["verdict"] == before["verdict"]
    if case.verdict == "error":
        assert "this run did not finish" in (workspace.out / "index.html").read_text()


def test_concept_spaces_only_and_no_layers_is_refused_before_anything_runs(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    workspace.job.write_text(workspace.job.read_text().replace('layers = ["features.0"]', "layers = []").replace("[analysis]\n", '[analysis]\nspaces = ["concept:*"]\n'))
    assert main(["validate", str(workspace.job)]) == EXIT_ERROR
    assert "analysis.spaces names only concept spaces" in capsys.readouterr().err


def test_accepted_unanalysed_classes_and_skipped_images_pass_the_gate(workspace: Workspace) -> None:
    _tiny_class(workspace)
    assert workspace.check() == EXIT_INCOMPLETE
    workspace.job.write_text(workspace.job.read_text() + 'allow_unanalysed = ["2"]\n')
    assert workspace.check() == EXIT_OK
    summary = workspace.summary()
    assert summary["verdict"] == "clean" and summary["complete"] is True
    assert [(item["class_name"], item["allowed"]) for item in summary["unanalysed"]] == [("2", True), ("2", True)]
    assert [entry["n_samples"] for entry in summary["classes"] if entry["class_index"] == 2] == [2, 2]


def test_skipped_unreadable_images_make_the_verdict_incomplete_unless_accepted(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL_PY)
    _save_weights(tmp_path, 2)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(30):
            Image.fromarray((rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('source = "npz"\npath = "data.npz"', 'source = "folder"\npath = "images"'))
    assert main(["--no-progress", "check", str(job)]) == EXIT_INCOMPLETE
    summary = json.loads((tmp_path / "out" / "gate" / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["complete"] is False and summary["unanalysed"] == []
    job.write_text(job.read_text() + "allow_skipped_images = true\n")
    assert main(["--no-progress", "check", str(job)]) == EXIT_OK


def test_clusters_under_the_threshold_left_untested_make_the_verdict_incomplete_unless_accepted(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.job.write_text(workspace.job.read_text().replace("allow_untested_low_score = true", "allow_untested_low_score = false"))
    assert workspace.check() == EXIT_INCOMPLETE
    summary = workspace.summary()
    untested = [
        cluster for entry in summary["classes"] for cluster in entry["clusters"]
        if (cluster["confirmation"] or {}).get("low_score")
    ]
    assert summary["untested_low_score"] == len(untested) > 0
    assert all(c["confirmation"]["status"] == "untested" and not c["flagged"] and not c["candidate"] for c in untested)
    assert all("[confirm] max_low_score" in c["confirmation"]["reason"] for c in untested)
    assert summary["flags"] == [] and summary["complete"] is False and summary["unanalysed"] == []
    assert "allow_untested_low_score" in capsys.readouterr().out
    page = (workspace.out / "index.html").read_text()
    assert "<strong>incomplete</strong>" in page and f"{len(untested)} cluster(s) scoring under the threshold not tested" in page
    workspace.job.write_text(workspace.job.read_text().replace("allow_untested_low_score = false", "allow_untested_low_score = true"))
    assert workspace.check() == EXIT_OK
    assert workspace.summary()["untested_low_score"] == len(untested)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from spray.store.lock import job_lock
    with job_lock(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("held")
        time.sleep(float(sys.argv[3]))
    """
)


def _hold(folder: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), str(ready), str(seconds)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return process


def test_a_second_run_is_refused_while_one_holds_the_folder_and_waits_with_wait(
    workspace: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = workspace.summary()
    holder = _hold(workspace.out, 3.0, tmp_path)
    try:
        capsys.readouterr()
        assert workspace.check() == EXIT_BUSY
        message = capsys.readouterr().err
        assert f"pid {holder.pid}" in message and "--wait" in message
        assert workspace.summary() == before  # the refused run touched nothing
        assert workspace.check("--wait") == EXIT_OK  # waits until the holder is done
    finally:
        holder.kill()
        holder.wait()
    assert workspace.summary()["created"] >= before["created"]


def test_a_lock_left_by_a_killed_run_is_taken_over(workspace: Workspace, tmp_path: Path) -> None:
    holder = _hold(workspace.out, 60.0, tmp_path)
    holder.kill()  # SIGKILL: the holder cannot clean up
    holder.wait()
    lock = json.loads((workspace.out / ".spray.lock").read_text())
    assert lock["pid"] == holder.pid  # the dead run's record is still there
    assert workspace.check() == EXIT_OK


def test_an_interrupted_run_leaves_verdict_error(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import spray.audit

    def interrupt(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spray.audit, "attribute_dataset", interrupt)
    workspace.job.write_text(workspace.job.read_text().replace("batch_size = 16", "batch_size = 8"))
    assert workspace.check() == 130
    summary = workspace.summary()
    assert summary["verdict"] == "error" and "interrupted" in summary["error"]


def test_the_reports_index_lists_a_failed_run(workspace: Workspace) -> None:
    _missing_data(workspace)
    assert workspace.check() == EXIT_ERROR
    index = (workspace.folder / "out" / "index.html").read_text()
    assert "run failed" in index


def test_a_spec_error_in_a_new_folder_writes_nothing(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "fresh"\noutput = "out"\n[analysis]\nthreshold = nan\n')
    assert main(["check", str(job)]) == EXIT_ERROR
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["job.toml"]


def test_two_concurrent_runs_give_one_result_and_one_refusal(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    workspace.job.write_text(workspace.job.read_text().replace("batch_size = 16", "batch_size = 1"))  # a slower first run
    first = subprocess.Popen([sys.executable, "-m", "spray.cli", "--no-progress", "check", str(workspace.job)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock, deadline = workspace.out / ".spray.lock", time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    capsys.readouterr()
    assert workspace.check() == EXIT_BUSY
    assert f"pid {first.pid}" in capsys.readouterr().err
    assert first.wait(timeout=300) == EXIT_OK, first.stderr.read()
    assert workspace.summary()["verdict"] == "clean"
