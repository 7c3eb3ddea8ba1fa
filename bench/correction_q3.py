"""Q2 on the held-out cases: find, fix and verify on the test split of Q3's case generator.

For every planted case of a draw of the test split (``bench/cases.py``, the cases
``bench/detection.py --split test [--draw N] --planted 30`` ran) whose model relies on its
artifact:

1. **find**: the audit's top finding under spray's default rule, read from the detection
   record (``bench/detection.py`` computes it once; ``.bench-cache/detection-q3``). A case
   whose audit flags nothing cannot be corrected and counts as not fixed;
2. **fix**: the correction is fitted on the audited (training) images only, with the CAV from
   the top finding's members, never from the stamped rows. ``auto`` is R-ClArC (class gate)
   with its layer and CAV estimator chosen on a validation split of the audited images
   (``spray.correction.search``); P-ClArC uses the same search; RR-ClArC searches its
   penalty at the chosen layer;
3. **verify**: clean and attacked accuracy on the case's test images, which neither the
   model's training nor any step of the correction saw. The attacked set (``--attack``) is
   the **true stamp** on every test image of the other classes (the ceiling), or the
   finding's **evidence** (no ground truth: ``spray.confirm``'s evidence masks of up to 64
   members, pasted into the other classes' images, members cycled; where the members share a
   pixel signature, every other image gets the signature instead, ``evidence_stamp``: the
   attack ``spray correct`` makes for a user job, :mod:`spray.correction.attack`), or the
   **cut-out** that ``spray correct`` made before (``cutout_stamp``, to measure it). Without
   the true stamp, the search's validation attack is made the same way, and every corrected
   model is also evaluated on the true stamp (the column beside the goal). Where the finding
   was confirmed as an overlay, the search validates on the same donors with their median
   overlay in place of the signature's pastes, as ``spray correct`` does (``--search-attack``).

``--methods cf`` measures **counterfactual fine-tuning** instead (``spray correct --method
counterfactual``, :mod:`spray.correction.counterfactual`): the top finding's members' evidence
(``spray.confirm``'s masks) is pasted into images of every class under their own labels, the
members are left out, and the model is fine-tuned; the search chooses the learning rate and
the share of pasted images on the validation split, and the validated candidate is the
correction. With ``--attack evidence``, the fine-tuning never sees the evidence of the
members whose evidence makes the attacked test set (at most half of the members are those
donors).

A case reaches the goal when the correction recovers at least 80 % of the attacked-accuracy
loss with at most 0.5 pt of clean accuracy lost. Prints one row per case and method, then the
share of cases reaching the goal per method, artifact kind, fraction, regime and
architecture. Each corrected model is **re-audited** (``--no-reaudit`` skips it): spray's
analysis and causal test of the finding's class on the corrected model's explanations of the
class's audited images; the flag is gone when no flagged cluster of the class shares half the
finding's members (``spray correct``'s rule). The summary counts the cases reaching the goal
*and* clearing the flag, and the flags gone where the goal was missed (a re-audit that
clears an unfixed model would be a wrong last word). Each correction is also given spray's
check of the **unseen members** (:mod:`spray.correction.unseen`): the finding's members in
the search's validation split, which the validated fine-tuning never trained on, carry the
artifact as it was stamped; where they are other classes' objects, the share of them the
corrected model releases from the class. spray's verdict ("fixed": goal on its attack, flag
gone, unseen members not released below the goal beyond chance) is counted against the
true stamp, beside the verdict without that check.

    python3 bench/correction_q3.py                  # every relied-on test case (draw 0)
    python3 bench/correction_q3.py --draw 1 --attack evidence   # the current detector's draw, evidence attack
    python3 bench/correction_q3.py --cases 4        # the first four (a quick look)
    python3 bench/correction_q3.py --draw 1 --attack evidence --methods cf   # counterfactual fine-tuning

Dev only, ``--probe FILE``: every search candidate is measured on the case's test images as
well and written to ``FILE`` (JSON lines), for ``bench/correction_rules.py`` to compare rules
for choosing among the candidates; the search itself never sees these numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cases import Case, CaseSpec, build_case, extra_dev_cases, generate_cases  # noqa: E402
from bench.detection import CORRECTION_PLANTED, default_rule, findings, package_versions, run_case, select  # noqa: E402
from spray.confirm.config import OVERLAY_STATISTICS  # noqa: E402
from spray.confirm.resolve import confirmed_as_overlay  # noqa: E402
from spray.correction.attack import EVIDENCE_DONORS, SEARCH_OVERLAY_STATISTIC, donor_limit  # noqa: E402
from spray.correction.config import CorrectionConfig  # noqa: E402
from spray.correction.errors import CorrectionError  # noqa: E402
from spray.correction.outcome import FIXED, ROUNDING, UNVERIFIED, judge, unseen_miss, weak_attack  # noqa: E402
from spray.correction.run import build_correction, correct_model  # noqa: E402
from spray.correction.search import search  # noqa: E402

GOAL_RECOVERED, MAX_CLEAN_LOSS = 0.8, 0.005
METHODS = {
    "auto (R-ClArC)": CorrectionConfig(method="r-clarc", gate="class", relevance_samples=0, torchscript=False),
    "P-ClArC": CorrectionConfig(method="p-clarc", relevance_samples=0, torchscript=False),
    "RR-ClArC": CorrectionConfig(method="rr-clarc", relevance_samples=0, torchscript=False, rr_epochs=2, rr_max_samples=2000),
}


CLARC_METHODS = list(METHODS)
METHODS["counterfactual"] = CorrectionConfig(method="counterfactual", relevance_samples=0, torchscript=False)


def cf_evidence(case: Case, members: np.ndarray, class_id: int, heatmaps: np.ndarray, exclude: np.ndarray):
    """The members' evidence that counterfactual fine-tuning pastes
    (``spray.correction.counterfactual.sampled_evidence``), from the members not in ``exclude``
    (the evaluation attack's donors: the fine-tuning must not see the evidence it is judged on)."""
    from spray.correction.counterfactual import sampled_evidence

    rest = np.setdiff1d(np.flatnonzero(case.train_labels == class_id), members)
    return sampled_evidence(
        np.setdiff1d(members, exclude), rest, lambda rows: heatmaps[rows], lambda rows: case.train_images[rows], case.spec.seed
    )


def evidence_stamp(
    case: Case, members: np.ndarray, class_id: int, heatmaps: np.ndarray, limit: int = EVIDENCE_DONORS, overlay: bool = False,
    overlay_statistic: str = "mean", overlay_over_signature: bool = False, overlay_only: bool = False,
):
    """The attack made from the flag's evidence, with no ground truth, and its donors' rows:
    ``spray correct``'s own (:func:`spray.correction.attack.evidence_attack`) on the case's
    audited images, with the donors' mean overlay where ``overlay`` (the finding confirmed as
    an overlay; summed up by ``overlay_statistic``, and in place of a signature's pastes with
    ``overlay_over_signature``, on every image with ``overlay_only``). (None, donors) when no
    donor has evidence."""
    from spray.correction.attack import evidence_attack

    rest = np.setdiff1d(np.flatnonzero(case.train_labels == class_id), members)
    hosts = np.flatnonzero(case.train_labels != class_id) if overlay else None
    attack = evidence_attack(
        members, rest, lambda rows: heatmaps[rows], lambda rows: case.train_images[rows], case.spec.seed, limit, hosts,
        overlay_statistic, overlay_over_signature, overlay_only,
    )
    return (None if attack.empty else attack.stamp), attack.donors


def cutout_stamp(case: Case, members: np.ndarray, class_id: int, heatmaps: np.ndarray):
    """The attack ``spray correct`` made for a user job with no ``[correct] stamp``
    (before :mod:`spray.correction.attack`): one mask where the members' pooled relevance
    exceeds the rest of their class's most, and the members' median pixels there, pasted on
    every attacked image; the fine-tuning saw every member's evidence (no donors were held
    back). None when the members exceed their class nowhere."""
    from spray.analysis.config import SprayConfig
    from spray.correction.user import MAX_REFERENCE_HEATMAPS, cutout_mask, cutout_patch, paste

    rest = np.setdiff1d(np.flatnonzero(case.train_labels == class_id), members)
    if len(rest) > MAX_REFERENCE_HEATMAPS:
        rest = np.sort(np.random.default_rng([case.spec.seed, 11]).choice(rest, MAX_REFERENCE_HEATMAPS, replace=False))
    try:
        mask = cutout_mask(heatmaps[members], heatmaps[rest], SprayConfig().pooled_size, tuple(case.train_images.shape[-2:]))
    except CorrectionError:
        return None
    return paste(cutout_patch(case.train_images[members], mask), mask)


def top_finding(spec: CaseSpec) -> dict | None:
    """The audit's top finding of ``spec`` under spray's default rule (None: nothing flagged)."""
    record = run_case(spec)
    found = findings(default_rule().flags(record))
    return found[0] if found else None


def reaudit(case: Case, model: torch.nn.Module, finding: dict) -> dict:
    """The audit again on the corrected ``model``, in the finding's class: the detection bench's
    explanation of the class's audited (training) images (the other classes are hosts of the
    causal test, read as images only), spray's analysis in the audit's spaces and
    its causal test at spray's defaults (as ``spray.audit.analyse``). The flag is **gone** when
    no flagged cluster of the class shares at least ``SAME_FINDING_JACCARD`` of its members
    with the finding (``spray correct``'s rule, ``spray.correction.reaudit.match_flag``).
    Beside it (measured, not part of the goal): the finding's own members causally tested
    again on the corrected model (``spray.correction.retest``, as ``spray correct`` shows it):
    ``follows`` (beyond chance at the narrow or an overlay setting), ``follows_any_setting``,
    the audit's own status ``retest``, and the intervals' lower ends."""
    from bench.detection import explain
    from spray.analysis.config import HEATMAP_SPACE, SprayConfig, concept_space
    from spray.analysis.pipeline import analyze_spaces
    from spray.attribution.settings import AttributionSettings
    from spray.confirm.config import ConfirmConfig
    from spray.confirm.predictor import model_predictor
    from spray.confirm.run import confirm_analyses
    from spray.correction.reaudit import explainable_model
    from spray.correction.retest import retest_members
    from spray.findings import SAME_FINDING_JACCARD, jaccard

    class_id, members = int(finding["class"]), np.asarray(finding["members"], dtype=np.int64)
    explained = dataclasses.replace(case, model=explainable_model(model))
    heatmaps, concepts = explain(explained, rows=np.flatnonzero(case.train_labels == class_id))
    spaces = (HEATMAP_SPACE, *(concept_space(layer) for layer in case.concept_layers))
    config = SprayConfig(embedding="spectral", random_state=case.spec.seed, spaces=spaces)
    analyses = analyze_spaces(heatmaps, case.train_labels, case.class_names, config, concepts=concepts, classes=[class_id])
    confirm = ConfirmConfig(random_state=case.spec.seed)
    predict = model_predictor(model, AttributionSettings(device="cpu"), confirm.batch_size)
    confirm_analyses(analyses, heatmaps, case.train_labels, lambda rows: case.train_images[rows], predict, confirm,
                     min_size=config.min_cluster_size)
    flagged = [cluster for analysis in analyses for cluster in analysis.clusters if cluster.flagged]
    overlap = max((jaccard(members, cluster.member_rows) for cluster in flagged), default=0.0)
    # the finding's own members tested again on the corrected model, whatever the clustering
    # now makes of them: does their evidence still move other classes' images?
    retest = retest_members(heatmaps, case.train_labels, lambda rows: case.train_images[rows], predict, confirm, members, class_id)
    strongest = retest["strongest"] or {}
    return {"flag_gone": overlap < SAME_FINDING_JACCARD, "overlap_gone": overlap < SAME_FINDING_JACCARD,
            "jaccard": overlap, "flags_in_class": len(flagged), "retest": retest["status"], "follows": retest["follows"],
            # the variants the judging settings were chosen among (dev): every setting judging, the audit's own bars
            "follows_any_setting": any(facts["low"] > 0 for facts in retest["settings"]),
            "retest_lows": {facts["kind"]: facts["low"] for facts in retest["settings"]},
            "retest_lift": strongest.get("difference"), "retest_low": strongest.get("low")}


def true_stamp(case: Case):
    """The case's own stamp, with the same draws on every call: the attacked images before
    and after a correction carry marks at the same places (random-position kinds)."""
    return lambda images: case.stamp(images, np.random.default_rng([case.spec.seed, 7]))


def probing_build(case: Case, members: np.ndarray, class_id: int, stamp, seed: int, probes: list[dict]):
    """Dev only (``--probe``): ``build_correction`` that also measures every search candidate
    on the case's test images (the attack ``stamp`` and the true stamp) and counts, on the
    search's own validation images, the images whose prediction turned right or wrong: the
    numbers a selection rule is chosen on, never used by the search itself."""
    from spray.correction.evaluate import evaluate, recovered_share
    from spray.correction.search import validation_split
    from spray.models.demo import predict

    truth = true_stamp(case)
    before = evaluate(case.model, case.test_images, case.test_labels, class_id, stamp, relevance_samples=0)
    truth_before = evaluate(case.model, case.test_images, case.test_labels, class_id, truth, relevance_samples=0)
    _, held = validation_split(case.train_labels, seed)
    held = np.setdiff1d(held, members)

    def right(model) -> np.ndarray:
        with torch.no_grad():
            return predict(model, case.train_images[held]).argmax(1) == case.train_labels[held]

    right_before = right(case.model)
    carriers = case.stamped[held] & (case.train_labels[held] == class_id)

    def build(model, cav, images, labels, rows, settings, evidence):
        built = build_correction(model, cav, images, labels, rows, settings, evidence)
        model = built[0]
        after = evaluate(model, case.test_images, case.test_labels, class_id, stamp, relevance_samples=0)
        true_after = evaluate(model, case.test_images, case.test_labels, class_id, truth, relevance_samples=0)
        right_after = right(model)
        probes.append({
            "learning_rate": settings.cf_learning_rate, "paste_share": settings.cf_paste_share,
            "test_recovered": recovered_share(before, after), "test_true_recovered": recovered_share(truth_before, true_after),
            "test_clean_change": after.clean_accuracy - before.clean_accuracy,
            "val_turned_wrong": int((right_before & ~right_after).sum()), "val_turned_right": int((~right_before & right_after).sum()),
            "n_validation": int(len(held)),
            # the stamped validation images the finding missed: in a backdoor their flagged label is false, and "losing" them is no loss
            "val_carriers": int(carriers.sum()), "val_carriers_turned_wrong": int((carriers & right_before & ~right_after).sum()),
        })
        return built

    return build


def correct_case(
    case: Case, members: np.ndarray, class_id: int, config: CorrectionConfig, layer: str | None, stamp, truth_before=None,
    evidence=None, show_search: bool = False, probe: list | None = None, finding: dict | None = None, search_stamp=None,
) -> dict:
    """One method on one case: search and fit on the audited images with the attack ``stamp``
    (the finding's evidence, or the true stamp), evaluate on the test images with that attack
    and, when ``truth_before`` (the original model on the true stamp, evaluated once per
    case) is given, with the true stamp as well; with ``finding``, :func:`reaudit` the
    corrected model (``reaudit`` in the result, else None). ``search_stamp``: the search
    validates on this attack instead of ``stamp``, and the corrected model is evaluated on
    it as well (``search_recovered``, ``search_goal``)."""
    from spray.correction.evaluate import evaluate, recovered_share

    truth = true_stamp(case)
    n_classes = len(case.class_names)
    started = time.perf_counter()
    config = dataclasses.replace(config, layer=layer or case.concept_layers[-1])
    probes: list[dict] = []
    build = build_correction if probe is None else probing_build(case, members, class_id, stamp, config.seed, probes)
    config, searched, chosen = search(
        case.model, case.train_images, case.train_labels, members, config,
        [config.layer] if config.method in ("rr-clarc", "counterfactual") else list(case.concept_layers),
        stamp if search_stamp is None else search_stamp, build,
        class_id=class_id, n_classes=n_classes, evidence=evidence,
    )
    if probe is not None:  # each measured candidate with its probe, matched by its settings (a candidate that failed has none)
        measured = {(test["learning_rate"], test["paste_share"]): test for test in probes}
        probe.extend(
            dict(candidate) | measured[candidate["learning_rate"], candidate["paste_share"]]
            for candidate in searched["candidates"] if not candidate["error"]
        )
    report = correct_model(
        case.model, case.train_images, case.train_labels, case.test_images, case.test_labels, members,
        stamp=stamp, config=config, n_classes=n_classes, class_id=class_id, evidence=evidence, corrected=chosen,
    )
    seconds = time.perf_counter() - started
    if show_search:  # every candidate's validation numbers (--show-search)
        for candidate in searched["candidates"]:
            numbers = "failed" if candidate["error"] else f"recovered {candidate['recovered']:.2f}, clean {100 * candidate['clean_change']:+.1f} pt"
            print(f"    search: lr {candidate['learning_rate']:g}, share {candidate['paste_share']:g}: {numbers}"
                  f"{' (chosen)' if candidate['chosen'] else ''}", flush=True)
    recovered = None if math.isnan(report.recovered) else float(report.recovered)
    moves = moves_recovered(report.before, report.after)
    if truth_before is None:
        true_recovered, true_moves = recovered, moves
    else:
        after = evaluate(report.model, case.test_images, case.test_labels, class_id, truth, relevance_samples=0)
        share = recovered_share(truth_before, after)
        true_recovered, true_moves = None if math.isnan(share) else float(share), moves_recovered(truth_before, after)
    clean_ok = report.clean_change >= -MAX_CLEAN_LOSS - ROUNDING
    search_recovered = None
    if search_stamp is not None:
        share = recovered_share(
            evaluate(case.model, case.test_images, case.test_labels, class_id, search_stamp, relevance_samples=0),
            evaluate(report.model, case.test_images, case.test_labels, class_id, search_stamp, relevance_samples=0),
        )
        search_recovered = None if math.isnan(share) else float(share)
    if config.method == "counterfactual":
        layer, estimator = f"{len(evidence)} masks{'' if evidence.overlay is None else ' + overlay'}", (
            f"lr {config.cf_learning_rate:g}, share {config.cf_paste_share:g}, {report.history.epochs} ep., "
            f"members {'kept' if report.history.members_kept else 'out'} (survival {report.history.member_survival:.2f}"
            f", blurred {report.history.blurred_survival:.2f} vs {report.history.blurred_control:.2f}"
            f", overlay off {report.history.unoverlaid_survival:.2f} vs {report.history.unoverlaid_control:.2f}"
            f"{', ' + str(report.history.relabelled) + ' relabelled' if report.history.relabelled else ''})"
        )
    else:
        layer, estimator = config.layer, config.estimator
    audited = None if finding is None else reaudit(case, report.model, finding)
    unseen = unseen_members(case, report.model, members, class_id, config.seed)
    outcome = judge(  # spray's verdict, with the bench's re-audit in place of spray's
        recovered, report.clean_change, None if audited is None else {"flag_gone": audited["flag_gone"]}, GOAL_RECOVERED,
        MAX_CLEAN_LOSS, unseen, attack_moves=report.before.moved_to_class, min_attack_moves=config.min_attack_moves,
        attack_raise=report.before.raised_class_probability, min_attack_raise=config.min_attack_raise,
    )
    return {
        "verdict": outcome.verdict,
        "weak_attack": weak_attack(
            outcome.attack_moves, config.min_attack_moves, recovered, outcome.attack_raise, config.min_attack_raise,
        ) is not None,
        "raised_before": outcome.attack_raise,
        "layer": layer, "estimator": estimator, "rr_lambda": config.rr_lambda if config.method == "rr-clarc" else None,
        "clean_before": report.before.clean_accuracy, "attacked_before": report.before.attacked_accuracy,
        "clean_after": report.after.clean_accuracy, "attacked_after": report.after.attacked_accuracy,
        "recovered": recovered, "clean_change": report.clean_change,
        "goal": recovered is not None and recovered >= GOAL_RECOVERED and clean_ok,
        "true_recovered": true_recovered,
        "true_goal": true_recovered is not None and true_recovered >= GOAL_RECOVERED and clean_ok,
        "moves_recovered": moves, "true_moves_recovered": true_moves,
        "moved_before": report.before.moved_to_class, "true_moved_before": (truth_before or report.before).moved_to_class,
        "moves_goal": moves is not None and moves >= GOAL_RECOVERED and clean_ok,
        "search_recovered": search_recovered,
        "search_goal": None if search_stamp is None else search_recovered is not None and search_recovered >= GOAL_RECOVERED and clean_ok,
        "seconds": seconds, "n_candidates": len(searched["candidates"]), "reaudit": audited,
        "members_kept": bool(getattr(report.history, "members_kept", True)), "unseen": unseen,
    }


def moves_recovered(before, after) -> float | None:
    """The share of the attack's moves to the flagged class that a correction undid: the
    attacked images given the class less the unstamped ones (``EvaluationResult.moved_to_class``),
    before and after. The attacked accuracy counts errors into other classes too, which a
    pasted member's evidence (part of another object, in a backdoor) can cause whatever the
    model learned about the artifact. None where the attack moved nothing."""
    if before is None or after is None or before.moved_to_class is None or after.moved_to_class is None:
        return None
    moved_before = before.moved_to_class
    return None if not moved_before > 0 else float(1.0 - after.moved_to_class / moved_before)


def unseen_members(case: Case, corrected: torch.nn.Module, members: np.ndarray, class_id: int, seed: int) -> dict:
    """spray's check of the finding's members that no step of the correction saw
    (:func:`spray.correction.unseen.unseen_members_check`): here those in the search's
    validation split, which the validated fine-tuning never trained on, against a sample of
    the rest of their class. ``stamped``: how many of them carry the true stamp (ground truth,
    for the reader)."""
    from bench.detection import explain
    from spray.correction.counterfactual import MAX_REST
    from spray.correction.search import validation_split
    from spray.correction.unseen import unseen_members_check

    _, held = validation_split(case.train_labels, seed)
    rows = np.intersect1d(members, held)
    rest = np.setdiff1d(np.flatnonzero(case.train_labels == class_id), members)
    rest = np.sort(np.random.default_rng(seed).choice(rest, size=min(MAX_REST, len(rest)), replace=False))
    heatmaps = explain(case, rows=np.union1d(rows, rest))[0]  # only these rows
    check = unseen_members_check(
        case.model, corrected, case.train_images[rows], heatmaps[rows], case.train_images[rest], heatmaps[rest], class_id
    )
    return check | {"stamped": int(case.stamped[rows].sum())}


def unseen_cell(check: dict) -> str:
    """spray's line for the unseen members' check, with how many of them carry the true stamp."""
    from spray.correction.unseen import describe

    return f"{describe(check)}; {check['n']} unseen given the class, {check['stamped']} stamped"


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def reaudit_cell(audited: dict | None) -> str:
    """The re-audit's column: whether the flag is gone, with the best overlap of a flagged cluster."""
    if audited is None:
        return "-"
    follows = {True: "still moves images", False: "no response", None: "not measured"}[audited.get("follows")]
    lift, low = audited.get("retest_lift"), audited.get("retest_low")
    verdict = "gone" if audited["flag_gone"] else "persists"
    lows = "/".join(f"{kind} {value:+.2f}" for kind, value in audited.get("retest_lows", {}).items())
    return (f"{verdict} (J {audited['jaccard']:.2f}, {audited['flags_in_class']} flags; members re-tested: {follows}"
            f"{'' if lift is None else f' {lift:+.2f}, low {low:+.2f}'}; lows {lows})")


def summary(rows: list[dict], methods: list[str]) -> None:
    def share(items: list[dict]) -> str:
        return f"{sum(item['goal'] for item in items)}/{len(items)}"

    def true_share(items: list[dict]) -> str:
        return f"{sum(bool(item.get('true_goal', item['goal'])) for item in items)}/{len(items)}"

    def gone(item: dict) -> bool | None:
        return None if item.get("reaudit") is None else bool(item["reaudit"]["flag_gone"])

    def with_reaudit(items: list[dict], goal: str) -> str:
        if any(gone(item) is None and item.get("recovered") is not None for item in items):
            return "not checked"
        return f"{sum(bool(item.get(goal, item['goal'])) and bool(gone(item)) for item in items)}/{len(items)}"

    print("\n| method | cases reaching the goal (its attack) | and the re-audit clears the flag | on the true stamp | "
          "and the re-audit clears the flag | flag gone where the goal is missed (its attack; true stamp) | median recovered | median clean change pt | median s |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        items = [row for row in rows if row["method"] == method]
        recovered = [row["recovered"] for row in items if row["recovered"] is not None]
        missed = [row for row in items if gone(row) is not None and not row["goal"]]
        missed_true = [row for row in items if gone(row) is not None and not row.get("true_goal", row["goal"])]
        print(f"| {method} | {share(items)} | {with_reaudit(items, 'goal')} | {true_share(items)} | {with_reaudit(items, 'true_goal')} | "
              f"{sum(bool(gone(row)) for row in missed)}/{len(missed)}; {sum(bool(gone(row)) for row in missed_true)}/{len(missed_true)} | {np.median(recovered) if recovered else float('nan'):.2f} | "
              f"{100 * np.median([row['clean_change'] for row in items]):+.1f} | {np.median([row['seconds'] for row in items]):.0f} |")
    def unseen_held(row: dict) -> bool:
        return unseen_miss(row.get("unseen"), GOAL_RECOVERED) is not None

    rules = {
        "spray's verdict (goal on its attack, flag gone, unseen members released, the attack moving enough images to test)":
            lambda row: row.get("verdict") == FIXED,
        "goal on its attack, flag gone, unseen members released (the verdict before the attack's floor)":
            lambda row: row["goal"] and gone(row) and not unseen_held(row),
        "goal on its attack, flag gone (the verdict before the unseen members' check)": lambda row: row["goal"] and gone(row),
        "goal on its attack and on the search's attack where it differs, flag gone, unseen members released (--search-attack overlay)":
            lambda row: row["goal"] and row.get("search_goal") is not False and gone(row) and not unseen_held(row),
        "its attack's moves to the flagged class undone (>= 80 %, clean within 0.5 pt), flag gone (not spray's verdict: "
        "what it would say on moves instead of accuracy)": lambda row: row.get("moves_goal") and gone(row),
    }
    for method in methods:
        verdicts = [row for row in rows if row["method"] == method and gone(row) is not None and "true_goal" in row]
        for name, fixed in rules.items() if verdicts else ():
            said_fixed = [row for row in verdicts if fixed(row)]
            broken = sum(not row["true_goal"] for row in said_fixed)
            # spray's verdict says "unverified" where its attack was too weak to test: not a claim either way
            unverified = [row for row in verdicts if name.startswith("spray's") and row.get("verdict") == UNVERIFIED]
            undersold = sum(bool(row["true_goal"]) for row in verdicts if not fixed(row) and row not in unverified)
            weak = (f"; 'unverified' {len(unverified)} (the attack too weak to test), of them reaching the goal on the true "
                    f"stamp {sum(bool(row['true_goal']) for row in unverified)}") if name.startswith("spray's") else ""
            print(f"\n{method}: {name}, against the true stamp: 'fixed' "
                  f"{len(said_fixed)}/{len(verdicts)}, of them missing the goal on the true stamp {broken} (a broken promise); "
                  f"'not fixed' though the true stamp reaches the goal {undersold}{weak}")
    retested = [row for row in rows if row["method"] == methods[0] and (row.get("reaudit") or {}).get("retest") is not None]
    if retested:
        print("\n| re-audit of the corrected model | goal reached on the true stamp | goal missed on the true stamp |\n|---|---|---|")
        checks = {
            "overlap rule alone: flag gone": lambda audited: audited["overlap_gone"],
            "members re-tested: confirmed at the audit's bars": lambda audited: audited["retest"] == "confirmed",
            "members re-tested: beyond chance at any setting": lambda audited: audited.get("follows_any_setting"),
            "members re-tested: beyond chance at the narrow or an overlay setting": lambda audited: audited["follows"] is True,
            "members re-tested: not measured": lambda audited: audited["follows"] is None,
        }
        for name, check in checks.items():
            reached = sum(bool(check(row["reaudit"])) and bool(row.get("true_goal", row["goal"])) for row in retested)
            missed = sum(bool(check(row["reaudit"])) and not row.get("true_goal", row["goal"]) for row in retested)
            print(f"| {name} | {reached} | {missed} |")
    for field in ("kind", "fraction", "regime", "arch"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row["method"] == methods[0]:
                groups[str(row[field])].append(row)
        print(f"\n{methods[0]} by {field}: " + ", ".join(f"{key} {share(items)}" for key, items in sorted(groups.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=None, help="at most this many relied-on cases")
    parser.add_argument("--methods", choices=("clarc", "cf"), default="clarc", help="ClArC methods, or counterfactual fine-tuning")
    parser.add_argument("--split", choices=("dev", "test"), default="test", help="dev: choose constants here; test: run once and report")
    parser.add_argument("--draw", type=int, default=0, help="test only: the draw of the test split (bench/detection.py --draw)")
    parser.add_argument(
        "--attack", choices=("stamp", "evidence", "cutout"), default="stamp",
        help="the attacked set the search and evaluation use: the true stamp (the ceiling), the finding's evidence, or "
        "the cut-out that spray correct makes for a user job without [correct] stamp (no ground truth for either; every "
        "correction is then also evaluated on the true stamp)",
    )
    parser.add_argument(
        "--attack-overlay", action="store_true",
        help="dev only, with --attack evidence: add the donors' mean overlay to every other attacked image where the finding "
        "was confirmed as an overlay and the members share no signature (spray.correction.attack.donor_overlay; spray "
        "correct does not)",
    )
    parser.add_argument("--attack-overlay-statistic", choices=OVERLAY_STATISTICS, default="mean",
                        help="dev only, with --attack-overlay: the donors' overlay from per-pixel means or medians")
    parser.add_argument("--attack-overlay-over-signature", action="store_true",
                        help="dev only, with --attack-overlay: the overlay also where the members share a signature, "
                             "in place of the signature's pastes")
    parser.add_argument("--attack-overlay-only", action="store_true",
                        help="dev only, with --attack-overlay: the overlay on every attacked image, no region pasted")
    parser.add_argument(
        "--search-attack", choices=("overlay", "verdict"), default="overlay",
        help="with --attack evidence: 'overlay' (spray correct's): where the finding was confirmed as an overlay, the search "
             "validates on the attack with the donors' median overlay in place of the signature's pastes, the goal column "
             "stays on --attack's set, and every correction is also evaluated on the search's attack (the column 'search "
             "attack'); 'verdict': the search validates on the goal column's attack (spray before draw 18)",
    )
    parser.add_argument("--kinds", nargs="+", default=None, help="only the cases of these artifact kinds (e.g. frame watermark)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="only the cases of these fractions (e.g. 0.6 0.9)")
    parser.add_argument("--cf-learning-rate", type=float, default=None, help="dev only: try another fine-tuning learning rate")
    parser.add_argument("--cf-scope", choices=("auto", "member", "signature"), default=None, help="dev only: try another evidence scope")
    parser.add_argument("--cf-max-class-weight", type=float, default=None, help="dev only: try another class-weight cap (1: off)")
    parser.add_argument("--cf-distill", type=float, default=None, help="dev only: try a distillation weight")
    parser.add_argument("--cf-signature-effect", type=float, default=None, help="dev only: try another signature effect size")
    parser.add_argument("--cf-blur-control", type=float, default=None, help="dev only: try another blur control ratio (0: off)")
    parser.add_argument("--cf-overlay-control", type=float, default=None, help="dev only: try another overlay-subtraction control ratio (0: off)")
    parser.add_argument("--cf-overlay-share", type=float, default=None, help="dev only: try another share of overlay pastes (0: off)")
    parser.add_argument("--cf-relabel", type=int, choices=(0, 1), default=None, help="dev only: relabel left-out members (1) or not (0)")
    parser.add_argument("--extra", choices=("add", "only"), default=None,
                        help="dev only: add the extra dev watermark cases (bench/cases.py extra_dev_cases), or run them alone")
    parser.add_argument("--show-search", action="store_true", help="print every search candidate's validation numbers")
    parser.add_argument("--no-reaudit", action="store_true", help="skip the re-audit of each corrected model (about 20 s a case)")
    parser.add_argument("--probe", type=Path, default=None, help="dev only: measure every search candidate on the test images too "
                        "and write them as JSON lines to this file (to choose a selection rule on)")
    args = parser.parse_args()
    dev_settings = (args.cf_scope, args.cf_max_class_weight, args.cf_signature_effect, args.cf_distill, args.cf_relabel, args.cf_blur_control,
                    args.cf_overlay_control, args.cf_overlay_share)
    if any(setting is not None for setting in dev_settings) and args.split != "dev":
        parser.error("the --cf-* settings are for choosing on the dev split; the test split runs with the defaults.")
    from spray.correction import counterfactual

    if args.attack_overlay and args.split != "dev":
        parser.error("--attack-overlay is for choosing on the dev split; the test split runs with the defaults.")
    if args.cf_scope:
        counterfactual.EVIDENCE_SCOPE = args.cf_scope
    if args.cf_max_class_weight is not None:
        counterfactual.MAX_CLASS_WEIGHT = args.cf_max_class_weight
    if args.cf_distill is not None:
        counterfactual.DISTILL_WEIGHT = args.cf_distill
    if args.cf_signature_effect is not None:
        counterfactual.SIGNATURE_EFFECT = args.cf_signature_effect
    if args.cf_blur_control is not None:
        counterfactual.BLUR_CONTROL = args.cf_blur_control
    if args.cf_overlay_control is not None:
        counterfactual.OVERLAY_CONTROL = args.cf_overlay_control
    if args.cf_overlay_share is not None:
        counterfactual.OVERLAY_SHARE = args.cf_overlay_share
    if args.cf_relabel is not None:
        counterfactual.RELABEL_MEMBERS = bool(args.cf_relabel)
    if args.cf_learning_rate is not None:
        if args.split != "dev":
            parser.error("--cf-learning-rate is for choosing on the dev split; the test split runs with the default.")
        METHODS["counterfactual"] = dataclasses.replace(METHODS["counterfactual"], cf_learning_rate=args.cf_learning_rate)
    methods = CLARC_METHODS if args.methods == "clarc" else ["counterfactual"]
    torch.set_num_threads(2)
    if args.draw and args.split != "test":
        parser.error("--draw picks a draw of the test split.")
    if args.probe is not None and (args.split != "dev" or args.methods != "cf"):
        parser.error("--probe looks at the test images of every candidate: it is for the dev split and --methods cf only.")
    if args.extra and args.split != "dev":
        parser.error("--extra adds dev-split cases.")
    specs = [] if args.extra == "only" else select(generate_cases(args.split, "full", args.draw), CORRECTION_PLANTED, 0, 0)
    if args.extra:
        specs += extra_dev_cases()
    if args.kinds:
        specs = [spec for spec in specs if spec.kind in args.kinds]
    if args.fractions:
        specs = [spec for spec in specs if spec.fraction in args.fractions]
    rows: list[dict] = []
    done = 0
    print("| case | kind | fraction | regime | arch | found in target | method | layer / est. | clean before -> after | attacked before -> after | recovered | goal | re-audit | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        if args.cases is not None and done >= args.cases:
            break
        case = build_case(spec)
        if not case.relied:
            continue
        done += 1
        finding = top_finding(spec)
        base = {"case": f"{spec.dataset}-{spec.arch}-{spec.kind}-v{spec.variant}-t{spec.target}-s{spec.seed}", "kind": spec.kind,
                "fraction": spec.fraction, "regime": spec.regime, "arch": spec.arch}
        if finding is None:
            for method in methods:
                rows.append(base | {"method": method, "goal": False, "recovered": None, "clean_change": 0.0, "seconds": 0.0})
            print(f"| {base['case']} | {spec.kind} | {spec.fraction} | {spec.regime} | {spec.arch} | nothing flagged | all | - | - | - | - | no | - | - |", flush=True)
            continue
        members = np.asarray(sorted(finding["members"]), dtype=np.int64)
        in_target = finding["class"] == case.target_label
        layer = None
        stamp, truth_before, attack_donors, search_stamp = true_stamp(case), None, np.zeros(0, dtype=np.int64), None
        if args.attack in ("evidence", "cutout"):
            from bench.detection import explain
            from spray.correction.evaluate import evaluate

            truth_before = evaluate(
                case.model, case.test_images, case.test_labels, int(finding["class"]), stamp, relevance_samples=0
            )
            if args.attack == "cutout":
                stamp = cutout_stamp(case, members, int(finding["class"]), explain(case)[0])
            else:
                # counterfactual fine-tuning must not see the evidence it is judged on: half the members at most are donors
                limit = EVIDENCE_DONORS if args.methods == "clarc" else donor_limit(len(members))
                stamp, attack_donors = evidence_stamp(
                    case, members, int(finding["class"]), explain(case)[0], limit,
                    args.attack_overlay and confirmed_as_overlay(finding.get("confirmation")),
                    args.attack_overlay_statistic, args.attack_overlay_over_signature, args.attack_overlay_only,
                )
                if args.search_attack == "overlay" and confirmed_as_overlay(finding.get("confirmation")):
                    search_stamp, _ = evidence_stamp(
                        case, members, int(finding["class"]), explain(case)[0], limit, True, SEARCH_OVERLAY_STATISTIC, True,
                    )
            if stamp is None:
                for method in methods:
                    rows.append(base | {"method": method, "goal": False, "recovered": None, "clean_change": 0.0, "seconds": 0.0})
                print(f"| {base['case']} | {spec.kind} | {spec.fraction} | {spec.regime} | {spec.arch} | no evidence to paste | all | - | - | - | - | no | - | - |", flush=True)
                continue
        for method in methods:
            try:
                evidence = None
                if method == "counterfactual":
                    from bench.detection import explain

                    evidence = cf_evidence(case, members, int(finding["class"]), explain(case)[0], attack_donors)
                probe: list[dict] | None = None if args.probe is None else []
                result = correct_case(
                    case, members, int(finding["class"]), METHODS[method], layer, stamp, truth_before, evidence, args.show_search, probe,
                    None if args.no_reaudit else finding, search_stamp,
                )
                if probe is not None:
                    with args.probe.open("a") as out:
                        out.write(json.dumps(base | {"method": method, "chosen": result, "candidates": probe}) + "\n")
            except CorrectionError as error:  # e.g. a finding that leaves too few clean samples, or no evidence: not fixed
                print(f"| {base['case']} | {spec.kind} | {spec.fraction} | {spec.regime} | {spec.arch} | - | {method} | {error} |", flush=True)
                rows.append(base | {"method": method, "goal": False, "recovered": None, "clean_change": 0.0, "seconds": 0.0})
                continue
            if method == "auto (R-ClArC)":
                layer = result["layer"]  # RR-ClArC fine-tunes against the CAV at the layer the search chose
            rows.append(base | {"method": method} | result)
            print(f"| {base['case']} | {spec.kind} | {spec.fraction} | {spec.regime} | {spec.arch} | {'yes' if in_target else 'no'} | {method} | "
                  f"{result['layer']} / {result['estimator'] if result['rr_lambda'] is None else 'λ ' + format(result['rr_lambda'], 'g')} | "
                  f"{100 * result['clean_before']:.1f} -> {100 * result['clean_after']:.1f} | "
                  f"{100 * result['attacked_before']:.1f} -> {100 * result['attacked_after']:.1f} | "
                  f"{'n/a' if result['recovered'] is None else format(result['recovered'], '.2f')}"
                  f"{'' if args.attack == 'stamp' or result.get('true_recovered') is None else ' (true stamp ' + format(result['true_recovered'], '.2f') + ')'}"
                  f"; moves {cell(result['moves_recovered'])} of {cell(result['moved_before'])}, P raised {cell(result['raised_before'])}"
                  f"{'' if args.attack == 'stamp' else ' (true stamp ' + cell(result['true_moves_recovered']) + ' of ' + cell(result['true_moved_before']) + ')'} | "
                  f"{'yes' if result['goal'] else 'no'} (spray: {result['verdict']}{', attack too weak' if result['weak_attack'] else ''}) | "
                  f"{reaudit_cell(result['reaudit'])} | {result['seconds']:.0f} |"
                  f"{'' if result['search_recovered'] is None else ' search attack ' + format(result['search_recovered'], '.2f') + ','}"
                  f" {unseen_cell(result['unseen'])},"
                  f" members {'kept' if result['members_kept'] else 'out'}",
                  flush=True)
    summary(rows, methods)
    attack = {
        "stamp": "the true stamp (the ceiling)", "evidence": "the finding's evidence (no ground truth)",
        "cutout": "the cut-out of spray correct for a user job (no ground truth)",
    }[args.attack]
    print(f"\nattacked set of the search and of the goal column: {attack}. "
          + ("No re-audit here (--no-reaudit)." if args.no_reaudit else "Re-audit: spray's analysis and causal test of the finding's class on the corrected model."))
    print("packages: " + ", ".join(f"{name} {version}" for name, version in package_versions().items()))


if __name__ == "__main__":
    main()
