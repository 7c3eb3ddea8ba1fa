"""Re-audit plumbing on small random nets and synthetic summaries (no training): explaining a
corrected model, matching the corrected flag, the audit settings it reuses, and the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spray.attribution.lrp import AttributionConfigError
from spray.audit import run_audit
from spray.attribution.select import make_explainer
from spray.attribution.settings import AttributionSettings
from spray.correction.cav import CAV
from spray.correction.clarc import ClarcModel, Gate
from spray.correction.evaluate import EvaluationResult
from spray.correction.page import write_correction_files
from spray.correction.reaudit import describe_outcome, explainable_model, match_flag, reaudit_spec
from spray.correction.run import CorrectionConfig, CorrectionReport
from spray.jobs import demo_job
from spray.models.demo import DEMO_CONCEPT_LAYERS, DemoNet
from spray.report.index import write_index

HOSTILE = "<script>alert(1)</script>"


def _flat_cav(seed: int) -> CAV:
    v = torch.randn(32 * 8 * 8, generator=torch.Generator().manual_seed(seed))
    return CAV(
        layer="features.relu3", pooling="flatten", direction=v / v.norm(), clean_mean=torch.zeros(v.numel()),
        reference=torch.tensor(0.0), artifact_reference=torch.tensor(5.0), intercept=0.0, estimator="pattern",
        auc=1.0, n_artifact=10, n_clean=10, class_id=1, activation_shape=(32, 8, 8),
    )


def _explain(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, engine: str = "auto"):
    settings = AttributionSettings(
        composite="epsilon_plus_flat", canonizers=("merge_batchnorm",), layers=DEMO_CONCEPT_LAYERS, engine=engine, device="cpu"
    )
    with make_explainer(model, settings) as explainer:
        return explainer.engine, explainer.explain(x, targets)


def test_corrected_models_keep_layer_names_and_are_explained_at_the_audits_concept_layers() -> None:
    """The audit's concept layers (which run again, without gradient, in the gate pass) are
    explained on the view; where the class gate stays closed, heatmaps and concept relevances
    are the uncorrected model's, where it fires (and for P-ClArC) they change."""
    torch.manual_seed(0)
    net = DemoNet(4).eval()
    x = torch.rand(12, 3, 32, 32)
    with torch.no_grad():
        predicted = net(x).argmax(1)
    target = int(predicted[0])
    targets = torch.full((len(x),), target, dtype=torch.long)
    r_view = explainable_model(ClarcModel(net, _flat_cav(1), Gate(kind="class", target_classes=(target,))))
    p_view = explainable_model(ClarcModel(net, _flat_cav(1), Gate(kind="always")))
    assert {name for name, _ in net.named_modules()} <= {name for name, _ in r_view.named_modules()}

    _, plain = _explain(net, x, targets)
    engine, gated = _explain(r_view, x, targets)
    _, projected = _explain(p_view, x, targets)
    assert engine == "zennit"  # the fast engine cannot trace the gate: the fallback explains the view
    assert set(gated.concepts) == set(DEMO_CONCEPT_LAYERS)
    closed, fired = predicted != target, predicted == target
    assert 0 < int(closed.sum()) < len(x)
    torch.testing.assert_close(gated.heatmaps[closed], plain.heatmaps[closed], rtol=1e-5, atol=1e-6)
    for layer in DEMO_CONCEPT_LAYERS:
        torch.testing.assert_close(gated.concepts[layer][closed], plain.concepts[layer][closed], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gated.concepts["features.conv4"][fired], plain.concepts["features.conv4"][fired])
    assert not torch.allclose(projected.heatmaps, plain.heatmaps)
    with pytest.raises(AttributionConfigError, match="fast LRP engine cannot explain this model"):
        _explain(r_view, x, targets, engine="fast")
    assert explainable_model(net) is net


def test_reaudit_settings_are_those_the_original_model_was_audited_with() -> None:
    spec = demo_job("reports")
    net = DemoNet(4)
    gated = reaudit_spec(spec, net, ClarcModel(net, _flat_cav(2), Gate(kind="always"))).attribution
    assert (gated.composite, gated.canonizers, gated.layers, gated.engine) == (
        "epsilon_plus_flat", ("merge_batchnorm",), DEMO_CONCEPT_LAYERS, "zennit"
    )
    assert reaudit_spec(spec, net, DemoNet(4)).attribution.engine == spec.attribution.engine
    assert spec.attribution.layers == ("auto",)  # the job's own spec is left as it was


def _summary(clusters: list[tuple[int, str, list[int], float | None, bool]]) -> dict:
    """A summary.json with the given (class, space, members, score, flagged) clusters."""
    classes: dict[tuple[int, str], list[dict]] = {}
    for class_index, space, rows, score, flagged in clusters:
        group = classes.setdefault((class_index, space), [])
        group.append({"cluster_id": len(group), "size": len(rows), "member_rows": rows, "artifact_score": score, "flagged": flagged})
    flags = [
        {"class_index": c, "space": s, "cluster_id": i, "member_rows": k["member_rows"]}
        for (c, s), group in classes.items() for i, k in enumerate(group) if k["flagged"]
    ]
    return {"threshold": 0.75, "classes": [{"class_index": c, "space": s, "clusters": g} for (c, s), g in classes.items()], "flags": flags}


FLAG = {"class_index": 1, "class_name": "square", "space": "heatmap", "cluster_id": 1, "artifact_score": 0.9, "member_rows": list(range(10))}


def test_a_flagged_cluster_with_most_of_the_members_means_the_flag_persists() -> None:
    summary = _summary([
        (1, "heatmap", list(range(10, 40)), 0.1, False),
        (1, "heatmap", list(range(1, 11)), 0.8, True),  # 9 of 11 members shared: Jaccard 9/11
        (1, "concept:features.conv4", list(range(40)), 0.0, False),
    ])
    outcome = match_flag(FLAG, summary)
    assert outcome["flag_gone"] is False
    assert [(c["space"], c["cluster_id"], c["jaccard"]) for c in outcome["persisting"]] == [("heatmap", 1, round(9 / 11, 4))]
    assert outcome["best_match"]["cluster_id"] == 1 and outcome["top_score_in_class"] == pytest.approx(0.8)
    assert (outcome["n_flags_in_class"], outcome["n_flags"]) == (1, 1)
    assert "persists" in describe_outcome(outcome)


def test_the_flag_is_gone_when_no_flagged_cluster_of_its_class_overlaps_it_enough() -> None:
    summary = _summary([
        (1, "heatmap", list(range(40)), 0.0, False),            # the members, in one unflagged cluster: Jaccard 0.25
        (1, "concept:features.conv4", list(range(6, 26)), 0.8, True),  # flagged, but 4 of 26 shared
        (2, "heatmap", list(range(10)), 0.95, True),            # same rows, another class: not this flag
    ])
    outcome = match_flag(FLAG, summary)
    assert outcome["flag_gone"] is True and outcome["persisting"] == []
    assert outcome["best_match"]["space"] == "heatmap" and outcome["best_match"]["jaccard"] == 0.25
    assert outcome["top_score_in_class"] == pytest.approx(0.8)
    assert (outcome["n_flags_in_class"], outcome["n_flags"]) == (1, 2)
    assert outcome["original"] == {"space": "heatmap", "cluster_id": 1, "size": 10, "artifact_score": 0.9}
    assert "is gone" in describe_outcome(outcome)


def _report(tmp_path: Path) -> CorrectionReport:
    before = EvaluationResult("original", 0.96, 0.5, 0.56, n_clean=200, n_attacked=150)
    after = EvaluationResult("r-clarc", 0.95, 0.93, 0.26, gate_rate_attacked=0.6, gate_rate_clean=0.03, gate_precision=0.95)
    return CorrectionReport(
        method="r-clarc", config=CorrectionConfig(), cav=_flat_cav(3), before=before, after=after,
        recovered=(0.93 - 0.5) / (0.96 - 0.5), clean_change=-0.01, seconds={"cav": 0.5}, model=torch.nn.Identity(),
    )


def test_correction_page_shows_before_after_and_the_reaudit_escaped_and_linked(tmp_path: Path) -> None:
    folder = tmp_path / "job" / "correction" / "r-clarc"
    (folder / "reaudit").mkdir(parents=True)
    (folder / "reaudit" / "index.html").write_text("re-audit")
    (tmp_path / "job" / "index.html").write_text("audit")
    report = _report(tmp_path)
    outcome = match_flag({**FLAG, "class_name": HOSTILE}, _summary([(1, "heatmap", list(range(40)), 0.0, False)]))
    report.reaudit = {**outcome, "report": "reaudit/index.html", "seconds": 1.0, "test_accuracy": 0.95,
                      "artifact_check": None, "artifact_check_before": None, "compare": None}
    record, page = write_correction_files(report.to_dict(), folder, job=HOSTILE)
    html = page.read_text()
    assert json.loads(record.read_text())["reaudit"]["flag_gone"] is True
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    for text in ("96.0%", "50.0%", "93.0%", "+43.0 pt", "-30.0 pt", "93.5%", "gate precision", "95.0%", "is gone"):
        assert text in html, text
    assert 'href="reaudit/index.html"' in html and 'href="../../index.html"' in html
    assert 'href="compare.html"' not in html  # no comparison was written: no dead link
    index = write_index(tmp_path).read_text()
    section = index[index.index('id="corrections"'):]
    assert 'href="job/correction/r-clarc/index.html"' in section and "93.5%" in section and "flag gone" in section


def test_an_audit_into_a_folder_outside_the_job_is_refused(tmp_path: Path) -> None:
    spec = demo_job(tmp_path / "reports")
    with pytest.raises(ValueError, match="lies outside the output folder"):
        run_audit(spec, model=DemoNet(4), output=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "reports").exists()


def test_correction_page_says_what_a_weak_attack_could_not_check_and_names_the_searchs_attack(tmp_path: Path) -> None:
    """An attacked set that moved few images into the class: the page says "unverified", lists
    the recovery as not checked with the share moved, and shows the search's own attack."""
    folder = tmp_path / "job" / "correction" / "counterfactual"
    report = _report(tmp_path)
    report.before.attacked_to_class, report.before.clean_to_class = 0.12, 0.02  # the attack moved 10 % into the class
    report.before.attacked_class_probability, report.before.clean_class_probability = 0.15, 0.05  # and raised P(class) by 0.10
    report.clean_change = 0.0  # nothing else fails
    report.reaudit = {**match_flag(FLAG, _summary([(1, "heatmap", list(range(40)), 0.0, False)])), "report": None, "seconds": 1.0,
                      "test_accuracy": 0.95, "artifact_check": None, "artifact_check_before": None, "compare": None}
    report.evaluation_set = {
        "held_out": {"n_fit": 300, "n_held_out": 100, "share": 0.25, "seed": 0, "n_flagged": 30, "n_flagged_held_out": 8,
                     "n_evaluated": 92},
        "attack": {"kind": "evidence", "description": "the flag's own evidence", "mask_pixels": 0,
                   "search_description": f"the donors' median overlay {HOSTILE}"},
    }
    outcome = report.judge()
    assert (outcome.verdict, outcome.attack_moves, outcome.attack_raise) == ("unverified", pytest.approx(0.1), pytest.approx(0.1))
    _, page = write_correction_files(report.to_dict(), folder, job="job")
    html = page.read_text()
    assert '<div class="alert" id="outcome"><dt>outcome</dt><dd>unverified</dd></div>' in html
    unchecked = html[html.index('id="unchecked"'):]
    assert "moved only 10% of the other classes&#39; held-out images" in unchecked and "[correct] stamp" in unchecked
    assert 'id="attack-moves">Before the correction the attacked set moved 10.0%' in html
    assert "raised their mean probability of it by 0.10 (its recovery judges the fix from 30.0% moved or a raise of 0.20)" in html
    assert "raised their probability of the class by only 0.10 (under 0.20)" in unchecked
    assert "<th>the search's attack</th>" in html and HOSTILE not in html and "&lt;script&gt;" in html
