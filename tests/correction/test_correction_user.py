"""``spray correct`` on a user job: an npz dataset with a planted corner patch on one class and an
entry-point model trained on it in under a second, audited once per module."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spray.correction.run as correction_run
from spray.attribution.resolution import pool_heatmaps
from spray.audit import run_audit
from spray.cli import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, main
from spray.correction import CorrectionConfig, CorrectionError
from spray.correction.job import correct_job
from spray.correction.run import job_config
from spray.correction.user import cutout_mask, held_out_split
from spray.jobs import load_job

MODEL_PY = '''
import torch
from torch import nn

def build(num_classes):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes),
    )
'''
STAMP_PY = '''
import numpy as np

def stamp(images):
    out = np.array(images, copy=True)
    out[:, 0, 2:6, 2:6] = 1.0
    out[:, 1, 2:6, 2:6] = 0.0
    out[:, 2, 2:6, 2:6] = 1.0
    return out

def wrong_shape(images):
    return images[:, :, :8, :8]
'''
SIDE = 16
PATCH = (slice(2, 6), slice(2, 6))  # on the 2x2 cells of the 8-grid the analysis pools to
N_PER_CLASS = 200
N_CARRIERS = 80
CLASS_NAMES = ["plain", "tagged <i>"]
JOB = f'''[job]
name = "user"
output = "out"

[data]
source = "npz"
path = "data.npz"
class_names = {json.dumps(CLASS_NAMES)}
mean = [0.4, 0.4, 0.4]
std = [0.2, 0.2, 0.2]

[model]
source = "entrypoint"
entrypoint = "model.py:build"
weights = "weights.pt"

[attribution]
layers = ["4"]

[analysis]
spaces = ["heatmap"]
embedding = "spectral"
pooled_size = 8
'''


def _stamp(images: np.ndarray) -> np.ndarray:
    out = np.array(images, copy=True)
    out[:, :, PATCH[0], PATCH[1]] = np.array([1.0, 0.0, 1.0], np.float32)[:, None, None]
    return out


def _dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat-coloured images with a blob (green: class 1, blue: class 0); the first 80 of class 1 carry a magenta patch."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], N_PER_CLASS)
    images = np.repeat(np.repeat(rng.uniform(0.2, 0.6, size=(len(labels), 3, 1, 1)), SIDE, 2), SIDE, 3)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for row, label in enumerate(labels):
        cy, cx = rng.uniform(7, 9, size=2)
        images[row, 1 if label else 2, (yy - cy) ** 2 + (xx - cx) ** 2 <= 9] += 0.35
    images = np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1).astype(np.float32)
    carriers = np.flatnonzero(labels == 1)[:N_CARRIERS]
    images[carriers] = _stamp(images[carriers])
    return images, labels


def _train(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    """The entry-point model, trained for 15 epochs on the normalised images (under a second)."""
    namespace: dict = {}
    exec(MODEL_PY, namespace)
    model = namespace["build"](2)
    x, y = torch.from_numpy((images - 0.4) / 0.2), torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for epoch in range(15):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def user_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The audited job's file; its audit flags the patched samples of class 1 (observed: 80 samples, score 0.888)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = tmp_path_factory.mktemp("user")
    images, labels = _dataset()
    np.savez(folder / "data.npz", data=images, label=labels)
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "stamp.py").write_text(STAMP_PY)
    torch.manual_seed(0)
    torch.save(_train(images, labels).state_dict(), folder / "weights.pt")
    job = folder / "job.toml"
    job.write_text(JOB)
    result = run_audit(load_job(job), progress=False)
    assert result.summary["flags"], "the planted patch must be flagged for the correction to have work"
    return job


def _job_with(job: Path, name: str, correct: str) -> Path:
    """A copy of ``job`` (same data, model and output) with a ``[correct]`` section."""
    path = job.with_name(name)
    path.write_text(job.read_text() + f"\n[correct]\n{correct}\n")
    return path


def _flag(job: Path) -> dict:
    return json.loads((load_job(job).output_dir / "summary.json").read_text())["flags"][0]


def test_held_out_split_is_seeded_stratified_and_disjoint() -> None:
    labels = np.repeat([0, 1, 2], [40, 8, 1])
    fit, held = held_out_split(labels, 0.25, seed=3)
    assert np.intersect1d(fit, held).size == 0 and np.union1d(fit, held).tolist() == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=3).tolist() == [10, 2, 0]  # a one-sample class stays in the fit
    assert np.array_equal(held, held_out_split(labels, 0.25, seed=3)[1])
    assert not np.array_equal(held, held_out_split(labels, 0.25, seed=4)[1])


def test_the_cut_out_mask_localises_the_planted_patch(user_job: Path) -> None:
    """Observed IoU with the 4x4 patch (placed on the 2x2 cells of the 8-grid): 1.0."""
    import h5py

    spec = load_job(user_job)
    flag = _flag(user_job)
    labels = np.repeat([0, 1], N_PER_CLASS)
    assert len(np.intersect1d(flag["member_rows"], np.arange(N_PER_CLASS, N_PER_CLASS + N_CARRIERS))) >= 0.9 * len(flag["member_rows"])
    fit, _ = held_out_split(labels, 0.25, 0)
    members = np.intersect1d(flag["member_rows"], fit)
    rest = np.setdiff1d(fit[labels[fit] == 1], members)
    with h5py.File(spec.output_dir / "stages" / "attributions.h5", "r") as handle:
        heatmaps = handle["attribution"][...]
    mask = cutout_mask(heatmaps[members], heatmaps[rest], spec.analysis.pooled_size)
    truth = np.zeros((SIDE, SIDE), bool)
    truth[PATCH] = True
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.8
    # Heatmaps stored at half the resolution ([attribution] heatmap_size = [8]): the mask is
    # still given at the images' size, on the same pixels.
    stored = pool_heatmaps(heatmaps, (SIDE // 2, SIDE // 2))
    coarse = cutout_mask(stored[members], stored[rest], spec.analysis.pooled_size, (SIDE, SIDE))
    assert coarse.shape == (SIDE, SIDE)
    assert np.array_equal(coarse, mask)
    with pytest.raises(CorrectionError, match=r"\[correct\] stamp"):
        cutout_mask(heatmaps[rest], heatmaps[rest], spec.analysis.pooled_size)  # no excess anywhere: nothing to cut out


def test_spray_correct_on_the_user_job_writes_export_page_report_and_reaudit(user_job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Observed: attacked accuracy (the flagged members' evidence pasted) 63% -> 97% (recovered share 0.93), clean
    accuracy 100% unchanged, artifact relevance 40.7% -> 10.1%; the re-audit raises no flag (best match Jaccard 0.33)."""
    root = user_job.parent
    outside = {p for p in root.rglob("*") if "out" not in p.relative_to(root).parts}
    assert main(["--no-progress", "correct", str(user_job)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "attacked set: one of " in printed and "flagged members' evidence" in printed
    assert "flagged members held out of the correction: not measured: the unseen members keep their class" in printed
    folder = load_job(user_job).output_dir / "correction" / "r-clarc"
    assert {p.name for p in folder.iterdir()} >= {
        "correction.json", "weights.pt", "cav.pt", "model.torchscript.pt", "report.json", "index.html",
        "artifact_mask.png", "reaudit", "compare.html",
    }
    report = json.loads((folder / "report.json").read_text())
    held = report["evaluation_set"]["held_out"]
    assert (held["n_fit"], held["n_held_out"]) == (300, 100)
    assert held["n_evaluated"] == 100 - held["n_flagged_held_out"] == report["before"]["n_clean"]  # flagged members not "clean"
    assert report["cav"]["n_artifact"] == held["n_flagged"] - held["n_flagged_held_out"] < held["n_flagged"]
    assert report["config"]["layer"] == "4"  # the audit's concept layer, a cut point of the Sequential
    attack = report["evaluation_set"]["attack"]
    # the members' own evidence, from at most half of the fitting members; the relevance share is measured where
    # their relevance exceeds the class's most: the tag's 4x4 square
    assert attack["kind"] == "evidence" and attack["mask_box"] == [2, 2, 5, 5] and attack["pictures"] == ["artifact_mask.png"]
    assert 0 < attack["n_donors_with_evidence"] <= attack["n_donors"] <= attack["n_members"] // 2
    assert report["before"]["clean_accuracy"] - report["before"]["attacked_accuracy"] >= 0.3
    assert report["recovered_share"] >= 0.8 and report["clean_accuracy_change"] >= -0.03
    assert report["after"]["artifact_relevance"] < report["before"]["artifact_relevance"]
    assert report["after"]["gate_precision"] >= 0.9
    assert report["reaudit"]["flag_gone"] is True and (folder / report["reaudit"]["report"]).is_file()
    assert (report["outcome"]["verdict"], report["outcome"]["unmet"], report["outcome"]["unchecked"]) == ("fixed", [], [])
    # the attack exercised the artifact: it moved enough of the other classes' images into the class to test the fix
    moved = report["before"]["attacked_to_class"] - report["before"]["clean_to_class"]
    assert report["outcome"]["attack_moves"] == pytest.approx(moved) and moved >= report["config"]["min_attack_moves"] == 0.3
    raised = report["before"]["attacked_class_probability"] - report["before"]["clean_class_probability"]
    assert report["outcome"]["attack_raise"] == pytest.approx(raised) and raised > 0 and report["config"]["min_attack_raise"] == 0.2
    # the flagged members held out of the correction are the class's own tagged objects: nothing to release, said so
    unseen = report["unseen_members"]
    assert unseen["applies"] is False and "class's own objects" in unseen["reason"] and unseen["n"] == held["n_flagged_held_out"] > 0
    assert report["outcome"]["unmet"] == [] and "Flagged members held out of the correction: not measured" in (folder / "index.html").read_text()
    # only the rows a step used were read: the held-out part (its flagged members for that check), the class's fitting
    # rows (CAV, the attack's evidence) and the search's validation split; never another class's fitting rows outside it
    labels = np.load(root / "data.npz")["label"]
    fit, held_out = held_out_split(labels, 0.25, 0)
    _, validation = held_out_split(labels[fit], 0.2, 1)
    members = _flag(user_job)["member_rows"]
    expected = set(held_out.tolist()) | set(fit[labels[fit] == 1].tolist()) | set(fit[validation].tolist())
    assert (report["images_read"]["distinct"], report["images_read"]["audited"]) == (len(expected), 400) and len(expected) < 400
    # the validation leaves the flagged members out too (positions in the fitting part)
    assert report["search"]["n_validation"] == len(np.setdiff1d(validation, np.searchsorted(fit, np.intersect1d(members, fit))))
    page = (folder / "index.html").read_text()
    assert '<div class="clear" id="outcome"><dt>outcome</dt><dd>fixed</dd></div>' in page
    assert 'id="attack-moves"' in page and 'id="unchecked"' not in page
    # the attack's moves into the flagged class, apart from errors elsewhere: most stamped images before, few after
    assert report["before"]["attacked_to_class"] >= 0.3 > 0.1 >= report["after"]["attacked_to_class"]
    assert "attacked images given the flagged class" in page
    # each model format with its file and how closely it matched, read from correction.json
    export = json.loads((folder / "correction.json").read_text())
    assert '<table class="wide" id="exports">' in page and "<td>torch.export program</td><td>model.pt2</td>" in page
    assert f"{export['torch_export']['max_abs_diff']:.1e}" in page
    assert page.count("data:image/png;base64,") == 1 and "tagged &lt;i&gt;" in page and "tagged <i>" not in page
    assert {p for p in root.rglob("*") if "out" not in p.relative_to(root).parts} == outside


def test_a_stamp_entry_point_makes_the_attacked_set(user_job: Path) -> None:
    """Observed with P-ClArC: attacked accuracy 50% -> 100%, the mask exactly the function's 4x4 square."""
    job = _job_with(user_job, "stamp.toml", 'method = "p-clarc"\nreaudit = false\nstamp = "stamp.py:stamp"\nrelevance_samples = 8')
    # no re-audit checked that the strategy is gone: however good the numbers, the outcome is "unverified" (exit 3)
    assert main(["--no-progress", "correct", str(job)]) == EXIT_INCOMPLETE
    folder = load_job(job).output_dir / "correction" / "p-clarc"
    report = json.loads((folder / "report.json").read_text())
    attack = report["evaluation_set"]["attack"]
    assert attack["kind"] == "stamp" and "stamp.py:stamp" in attack["description"]
    assert (attack["mask_pixels"], attack["mask_box"], attack["pictures"]) == (16, [2, 2, 5, 5], ["artifact_mask.png"])
    assert report["before"]["attacked_accuracy"] <= 0.6 and report["recovered_share"] > 0.5
    page = (folder / "index.html").read_text()
    assert report["reaudit"] is None and page.count("data:image/png;base64,") == 1 and "the patch" not in page
    assert report["outcome"]["verdict"] == "unverified" and report["outcome"]["exit_code"] == EXIT_INCOMPLETE


def test_rr_clarc_fine_tunes_on_the_fitting_rows_only(user_job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = correction_run.rr_clarc

    def recording(model, cav, images, labels, **options):
        seen.append(len(images))
        return original(model, cav, images, labels, **options)

    monkeypatch.setattr(correction_run, "rr_clarc", recording)
    config = CorrectionConfig(method="rr-clarc", layer="4", rr_epochs=1, rr_max_samples=120, relevance_samples=0, torchscript=False, reaudit=False)
    report = correct_job(load_job(user_job), _flag(user_job), config)
    # the search fine-tunes once per strength on its fitting part, then the correction once on all fitting rows
    assert seen == [120] * 4 and report.history is not None and len(report.history.val_loss) == 1
    assert [item["rr_lambda"] for item in report.search["candidates"]] == [10.0, 100.0, 1000.0]
    assert report.config.rr_lambda == next(item["rr_lambda"] for item in report.search["candidates"] if item["chosen"])
    assert report.history.val_penalty[0] < report.history.initial_val_penalty  # observed 0.035 < 0.039
    assert type(report.model) is nn.Sequential and report.export is not None and report.export.weights.is_file()


@pytest.mark.parametrize(
    ("stamp", "message"),
    [
        ("stamp.py:wrong_shape", r"\[correct\] stamp 'stamp.py:wrong_shape' must take and return an \(N, C, H, W\) float array in \[0, 1\].*returned shape \(\d+, 3, 8, 8\)"),
        ("stamp.py:absent", r"\[correct\] stamp: entry point 'stamp.py:absent': .* has no function 'absent'"),
    ],
)
def test_a_bad_stamp_is_a_clear_error_naming_the_fix(user_job: Path, stamp: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job_with(user_job, "bad.toml", f'method = "p-clarc"\nreaudit = false\nstamp = "{stamp}"')
    assert main(["--no-progress", "correct", str(job)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("spray: error: ") and re.search(message, err), err
    with pytest.raises(CorrectionError, match=message):
        spec = load_job(job)
        correct_job(spec, _flag(job), job_config(spec, layer="4"))


def test_a_missing_stamp_file_is_refused_by_the_job_spec(user_job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spray.jobs import JobSpecError

    job = _job_with(user_job, "missing.toml", 'method = "p-clarc"\nreaudit = false\nstamp = "missing.py:stamp"')
    message = r"missing\.toml:\d+: correct\.stamp: entry point file .*missing\.py not found; give its path relative to the job file"
    assert main(["--no-progress", "correct", str(job)]) == EXIT_ERROR
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(JobSpecError, match=message):
        load_job(job)


def test_a_stamp_that_is_not_an_entry_point_is_refused_by_the_job_spec(user_job: Path) -> None:
    from spray.jobs import JobSpecError

    with pytest.raises(JobSpecError, match=r"bad-form.toml:\d+: correct\.stamp must be 'package\.module:function' or 'file\.py:function'; got 'stamp\.py'"):
        load_job(_job_with(user_job, "bad-form.toml", 'stamp = "stamp.py"'))


def test_counterfactual_fine_tuning_fixes_the_user_job_and_ships_the_validated_candidate(user_job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, float, int]] = []
    original = correction_run.counterfactual_finetune

    def recording(model, images, labels, member_rows, evidence, **options):
        calls.append((options["learning_rate"], options["paste_share"], len(evidence)))
        return original(model, images, labels, member_rows, evidence, **options)

    monkeypatch.setattr(correction_run, "counterfactual_finetune", recording)
    config = CorrectionConfig(method="counterfactual", layer="4", relevance_samples=0, torchscript=False, reaudit=False)
    report = correct_job(load_job(user_job), _flag(user_job), config)
    candidates = report.search["candidates"]
    assert [(item["learning_rate"], item["paste_share"]) for item in candidates] == [
        (pytest.approx(3e-4 * factor), share) for factor in (0.3, 1.0, 3.0) for share in (0.1, 0.5)
    ]
    # one fine-tuning per candidate, on the fitting split's members' evidence only, the attacked set's donors left out
    # (the correction is not judged on evidence it was shown); the chosen one is shipped, not refitted
    held = report.evaluation_set["held_out"]
    fit_members = held["n_flagged"] - held["n_flagged_held_out"]
    donors = report.evaluation_set["attack"]["n_donors"]
    assert donors > 0 and len(calls) == 6 and all(0 < masks <= fit_members - donors for _, _, masks in calls)
    chosen = next(item for item in candidates if item["chosen"])
    assert (report.history.learning_rate, report.history.paste_share) == (pytest.approx(chosen["learning_rate"]), chosen["paste_share"])
    assert report.history.epochs * math.ceil(report.history.images_per_epoch / 128) >= 64  # small sets get more epochs
    assert report.seconds["correction"] == report.history.seconds > 0  # the validated candidate's own time
    assert report.history.pasted_per_epoch == round(chosen["paste_share"] * report.history.images_per_epoch)
    # the shortcut is gone on the held-out images (the evidence attack costs the original model 37 pt)
    assert report.before.clean_accuracy - report.before.attacked_accuracy >= 0.3
    assert report.recovered >= 0.8 and report.clean_change >= -0.005
    assert type(report.model) is nn.Sequential and report.export is not None and report.export.weights.is_file()
    page = (load_job(user_job).output_dir / "correction" / "counterfactual" / "index.html").read_text()
    assert "counterfactual fine-tuning uses no CAV" in page and f"{report.history.epochs} epoch(s) at learning rate" in page and "of them hold their class with their evidence removed" in page
    assert "blurred against" in page and "of the rest of the class" in page



def _as_overlay(flag: dict) -> dict:
    """``flag`` as if the causal test had confirmed it at an overlay setting (its regions rejected)."""
    settings = [
        {"status": "rejected", "evidence": {"area": 0.3, "mass": 0.5}},
        {"status": "confirmed", "evidence": {"area": 1.0, "mass": 1.0, "overlay": True, "reference": "hosts", "statistic": "median"}},
    ]
    return {**flag, "confirmation": {**(flag.get("confirmation") or {}), "settings": settings}}


def test_a_flag_confirmed_as_an_overlay_is_searched_on_the_donors_median_overlay(
    user_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search validates on the same donors' evidence with their median overlay on every
    other image (the verdict's attack keeps the signature there); a flag confirmed by a pasted
    region is searched on the verdict's own attack."""
    import spray.correction.job as correction_job
    from spray.confirm.resolve import confirmed_as_overlay
    from spray.correction.job import load_job_inputs
    from spray.correction.user import held_out_evaluation

    spec = load_job(user_job)
    flag = _flag(user_job)
    assert not confirmed_as_overlay(flag.get("confirmation")) and confirmed_as_overlay(_as_overlay(flag)["confirmation"])
    members = np.unique(np.asarray(flag["member_rows"], dtype=np.int64))
    config = job_config(spec)
    with load_job_inputs(spec) as inputs:
        plain = held_out_evaluation(spec, inputs.display, inputs.labels, members, 1, config, tmp_path / "a")
        overlaid = held_out_evaluation(spec, inputs.display, inputs.labels, members, 1, config, tmp_path / "b", overlay=True)
    assert plain.search_stamp is None and overlaid.search_stamp is not None
    assert "search_description" in overlaid.facts["attack"] and "search_description" not in plain.facts["attack"]
    assert np.array_equal(plain.attack_donors, overlaid.attack_donors)  # the same donors: the fine-tuning is kept from them alike
    hosts = plain.test_images[plain.test_labels == 0][:8]
    verdict, searched = plain.stamp(hosts), overlaid.search_stamp(hosts)
    assert np.array_equal(verdict[0::2], searched[0::2])  # the donors' own evidence on every other image
    # on the others the overlay in the signature's place: the patch's magenta (red and blue up, where the hosts are not)
    added = searched[1::2] - hosts[1::2]
    assert not np.array_equal(verdict[1::2], searched[1::2])
    assert added[:, 0, PATCH[0], PATCH[1]].mean() > 0.2 and added[:, 2, PATCH[0], PATCH[1]].mean() > 0.2
    assert abs(added[:, 1, PATCH[0], PATCH[1]].mean()) < 0.05 and abs(added[:, :, 10:, 10:]).mean() < 0.05  # little elsewhere

    # spray correct hands the search the overlay attack for such a flag, and the verdict's attack to the evaluation
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def spying_search(model, images, labels, rows, config, layers, stamp, build, **kwargs):
        seen["stamp"] = stamp
        raise Stop

    monkeypatch.setattr(correction_job, "search", spying_search)
    for name, given in (("plain", flag), ("overlay", _as_overlay(flag))):
        with pytest.raises(Stop):
            correct_job(spec, given, dataclasses_replace(config, method="counterfactual"))
        probe = np.clip(hosts[:4] * 0 + 0.5, 0, 1)
        seen[name] = seen.pop("stamp")(probe)
    assert not np.array_equal(seen["plain"], seen["overlay"])
