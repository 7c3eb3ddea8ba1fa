"""summary.json: documented shape, flag order, member ids, no NaN, determinism, atomicity."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spray.analysis.result import ClassAnalysis
from spray.report.context import ReportContext
from spray.findings import jaccard
from spray.report.summary import SCHEMA_VERSION, build_summary, write_summary

TOP_KEYS = {
    "schema_version", "job", "created", "threshold", "n_samples", "class_names", "metadata",
    "artifact_check", "ground_truth", "classes", "flags", "verdict", "complete", "unanalysed", "skipped_images",
    "untested_flags", "untested_low_score", "one_strategy",
}
CHECK_KEYS = {
    "target_class", "target_class_name", "n_images", "flip_rate", "mean_prob_before",
    "mean_prob_after", "description",
}
CLASS_KEYS = {
    "class_index", "class_name", "space", "analysable", "reason", "n_samples", "n_clusters",
    "comparable_clusters", "accuracy", "eigenvalues", "clusters",
}
CLUSTER_KEYS = {
    "cluster_id", "size", "artifact_score", "flagged", "score_components", "member_ids",
    "member_rows", "accuracy", "candidate", "confirmation",
}
FLAG_KEYS = {
    "class_index", "class_name", "space", "cluster_id", "size", "artifact_score", "member_ids",
    "member_rows", "accuracy", "revealed_by", "candidate", "confirmation",
}
EVIDENCE_KEYS = {"class_index", "space", "cluster_id", "artifact_score", "jaccard"}
TRUTH_KEYS = {"precision", "recall"}
CONFIRMATION_KEYS = {"status", "reason", "target_class", "evidence_area"}
TEST_PARTS = {
    "paste": {"n", "moved", "rate", "low", "high", "gain"},
    "control": {"n", "moved", "rate", "low", "high", "gain"},
    "removal": {"n", "lost", "rate", "low", "high", "drop"},
}


def _is_number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_confirmation(record: object) -> None:
    """A cluster's or flag's ``confirmation``: null or the documented causal-test record."""
    if record is None:
        return
    assert isinstance(record, dict) and CONFIRMATION_KEYS <= set(record)
    assert record["status"] in {"confirmed", "rejected", "untested"}
    assert isinstance(record["reason"], str) and isinstance(record["target_class"], int)
    assert _is_number_or_null(record["evidence_area"])
    assert set(record) - CONFIRMATION_KEYS <= set(TEST_PARTS)
    if record["status"] != "untested":
        assert set(record) == CONFIRMATION_KEYS | set(TEST_PARTS)
    for name, keys in TEST_PARTS.items():
        if name in record:
            assert set(record[name]) == keys
            assert all(_is_number_or_null(value) for value in record[name].values())


def check_shape(summary: dict, with_truth: bool) -> None:
    """Validate ``summary`` against the schema documented in ``spray.report.summary``."""
    extra = TRUTH_KEYS if with_truth else set()
    assert set(summary) == TOP_KEYS
    assert isinstance(summary["untested_flags"], int)
    assert summary["untested_flags"] == sum(
        (flag["confirmation"] or {}).get("status") == "untested" for flag in summary["flags"]
    )
    assert summary["schema_version"] == SCHEMA_VERSION == 1
    assert isinstance(summary["job"], str) and isinstance(summary["created"], str)
    assert _is_number_or_null(summary["threshold"])
    assert list(summary["metadata"]) == sorted(summary["metadata"])
    if summary["artifact_check"] is not None:
        assert set(summary["artifact_check"]) == CHECK_KEYS
    for entry in summary["classes"]:
        assert set(entry) == CLASS_KEYS
        assert isinstance(entry["analysable"], bool) and isinstance(entry["reason"], str)
        assert all(_is_number_or_null(value) for value in entry["eigenvalues"])
        for cluster in entry["clusters"]:
            assert set(cluster) == CLUSTER_KEYS | extra
            assert isinstance(cluster["candidate"], bool)
            check_confirmation(cluster["confirmation"])
            assert cluster["size"] == len(cluster["member_rows"]) == len(cluster["member_ids"])
            assert cluster["member_rows"] == sorted(cluster["member_rows"])
            assert list(cluster["score_components"]) == sorted(cluster["score_components"])
            assert all(_is_number_or_null(v) for v in cluster["score_components"].values())
    for flag in summary["flags"]:
        assert set(flag) == FLAG_KEYS | extra
        check_confirmation(flag["confirmation"])
        assert all(set(item) == EVIDENCE_KEYS for item in flag["revealed_by"])
        own = flag["revealed_by"][0]
        assert (own["space"], own["cluster_id"], own["jaccard"]) == (flag["space"], flag["cluster_id"], 1.0)


def test_summary_matches_documented_shape(report_context: ReportContext) -> None:
    check_shape(build_summary(report_context), with_truth=True)


def test_summary_without_ground_truth_has_no_precision(report_context: ReportContext) -> None:
    summary = build_summary(dataclasses.replace(report_context, ground_truth_rows=None))
    check_shape(summary, with_truth=False)
    assert summary["ground_truth"] is None


def test_flags_are_every_flagged_cluster_by_score_descending(report_context: ReportContext) -> None:
    summary = build_summary(report_context)
    scores = [flag["artifact_score"] for flag in summary["flags"]]
    assert scores == sorted(scores, reverse=True) == [0.9, 0.75]
    flagged = {
        (entry["class_index"], cluster["cluster_id"])
        for entry in summary["classes"]
        for cluster in entry["clusters"]
        if cluster["flagged"]
    }
    assert {(flag["class_index"], flag["cluster_id"]) for flag in summary["flags"]} == flagged


def test_member_ids_match_rows(report_context: ReportContext) -> None:
    summary = build_summary(report_context)
    for entry in summary["classes"]:
        for cluster in entry["clusters"]:
            expected = [report_context.sample_ids[row] for row in cluster["member_rows"]]
            assert cluster["member_ids"] == expected
    top = summary["flags"][0]
    assert top["member_rows"] == [1, 3, 4, 8, 13, 17]
    assert top["member_ids"][1] == report_context.sample_ids[3]


def test_classes_sorted_and_not_analysable_kept(report_context: ReportContext) -> None:
    summary = build_summary(report_context)
    assert [entry["class_index"] for entry in summary["classes"]] == [0, 1, 2]
    cat = summary["classes"][2]
    assert cat["analysable"] is False and "at least 10" in cat["reason"]
    assert cat["clusters"] == [] and cat["n_samples"] == 3


def test_clusters_in_a_class_by_score_with_missing_last(report_context: ReportContext) -> None:
    clusters = build_summary(report_context)["classes"][1]["clusters"]
    assert [cluster["artifact_score"] for cluster in clusters] == [0.75, 0.1, None]


def test_precision_and_recall_against_ground_truth(report_context: ReportContext) -> None:
    flags = build_summary(report_context)["flags"]
    assert flags[0]["precision"] == 1.0 and flags[0]["recall"] == 1.0
    assert flags[1]["precision"] == pytest.approx(1 / 6) and flags[1]["recall"] == 1.0


def test_written_json_is_strict_and_has_nulls_for_nan(
    report_context: ReportContext, tmp_path: Path
) -> None:
    path = write_summary(tmp_path / "summary.json", build_summary(report_context))

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    check_shape(loaded, with_truth=True)
    assert loaded["metadata"]["bad"] is None
    assert loaded["classes"][0]["clusters"][0]["score_components"]["outside_object"] is None
    assert not math.isnan(loaded["threshold"])


def test_summary_is_deterministic(report_context: ReportContext, tmp_path: Path) -> None:
    first = write_summary(tmp_path / "a.json", build_summary(report_context)).read_bytes()
    second = write_summary(tmp_path / "b.json", build_summary(report_context)).read_bytes()
    assert first == second


def test_write_is_atomic_and_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_summary(path, {"schema_version": 1})
    with pytest.raises(ValueError):
        write_summary(path, {"schema_version": 1, "bad": float("nan")})
    assert json.loads(path.read_text()) == {"schema_version": 1}
    assert [child.name for child in tmp_path.iterdir()] == ["summary.json"]


def test_accuracy_per_class_and_cluster(report_context: ReportContext) -> None:
    summary = build_summary(report_context)
    class0, class1, cat = summary["classes"]
    assert class0["accuracy"] == pytest.approx(19 / 20)
    by_id = {cluster["cluster_id"]: cluster for cluster in class0["clusters"]}
    assert by_id[1]["accuracy"] == 1.0 and by_id[0]["accuracy"] == pytest.approx(13 / 14)
    assert class1["clusters"][0]["accuracy"] == pytest.approx(5 / 6)
    assert summary["flags"][1]["accuracy"] == pytest.approx(5 / 6)
    assert cat["accuracy"] == 1.0


def test_unlabelled_rows_do_not_count_toward_accuracy(report_context: ReportContext) -> None:
    labels = report_context.labels.copy()
    labels[20:37] = -1
    summary = build_summary(dataclasses.replace(report_context, labels=labels))
    class1 = summary["classes"][1]
    assert class1["accuracy"] is None
    assert all(cluster["accuracy"] is None for cluster in class1["clusters"])


def _concept_copy(analysis: ClassAnalysis, space: str, drop_rows: int, score: float) -> ClassAnalysis:
    """``analysis`` as if found again in ``space``: the flagged cluster loses ``drop_rows`` members."""
    clusters = []
    for cluster in analysis.clusters:
        rows = cluster.member_rows[drop_rows:] if cluster.flagged else cluster.member_rows
        clusters.append(replace(cluster, member_rows=rows, artifact_score=score if cluster.flagged else cluster.artifact_score))
    return replace(analysis, space=space, clusters=clusters)


def test_one_finding_seen_in_two_spaces_is_one_flag_listing_both(report_context: ReportContext) -> None:
    """The class-0 artifact flagged again in a concept space (5 of its 6 members) folds into
    the heatmap flag; a flag in another space with other members stays its own."""
    class0 = next(a for a in report_context.analyses if a.class_index == 0)
    class1 = next(a for a in report_context.analyses if a.class_index == 1)
    again = _concept_copy(class0, "concept:layer4", drop_rows=1, score=0.8)
    other = _concept_copy(class1, "concept:layer4", drop_rows=4, score=0.7)
    context = replace(report_context, analyses=[*report_context.analyses, again, other])
    summary = build_summary(context)
    flagged_clusters = sum(c["flagged"] for entry in summary["classes"] for c in entry["clusters"])
    assert flagged_clusters == 4
    assert [(f["class_index"], f["space"]) for f in summary["flags"]] == [
        (0, "heatmap"), (1, "heatmap"), (1, "concept:layer4"),
    ]
    evidence = summary["flags"][0]["revealed_by"]
    assert [(e["space"], e["artifact_score"]) for e in evidence] == [("heatmap", 0.9), ("concept:layer4", 0.8)]
    assert evidence[1]["jaccard"] == round(5 / 6, 4)
    # class 1's concept cluster keeps 2 of 6 members: Jaccard 1/3 < SAME_FINDING_JACCARD, its own flag
    assert [e["space"] for e in summary["flags"][1]["revealed_by"]] == ["heatmap"]


def test_jaccard_of_row_sets() -> None:
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 0.0
    assert jaccard([5, 5, 6], [6, 5]) == 1.0


def test_the_verdict_names_every_class_that_was_not_analysed(report_context: ReportContext) -> None:
    summary = build_summary(report_context)
    assert summary["verdict"] == "flagged" and summary["complete"] is False
    assert summary["unanalysed"] == [
        {"class_index": 2, "class_name": "cat", "space": "heatmap", "reason": "only 3 samples, at least 10 needed", "allowed": False}
    ]
    cat = next(entry for entry in summary["classes"] if entry["class_index"] == 2)
    assert cat["n_samples"] == int(np.count_nonzero(np.asarray(report_context.labels) == 2)) > 0


def test_without_flags_an_unanalysed_class_makes_the_verdict_incomplete_unless_accepted(report_context: ReportContext) -> None:
    from spray.verdict import CheckConfig

    quiet = [dataclasses.replace(a, clusters=[dataclasses.replace(c, flagged=False) for c in a.clusters]) for a in report_context.analyses]
    context = dataclasses.replace(report_context, analyses=quiet)
    assert (build_summary(context)["verdict"], build_summary(context)["complete"]) == ("incomplete", False)
    accepted = dataclasses.replace(context, check=CheckConfig(allow_unanalysed=("cat",)))
    assert (build_summary(accepted)["verdict"], build_summary(accepted)["complete"]) == ("clean", True)
    missing_space = dataclasses.replace(accepted, expected_spaces=["heatmap", "concept:layer4"])
    summary = build_summary(missing_space)
    assert summary["verdict"] == "incomplete"
    assert {item["reason"] for item in summary["unanalysed"] if item["space"] == "concept:layer4"} == {"no analysis of this class in this space"}


def test_a_class_seen_as_one_strategy_is_listed_as_not_compared_within(report_context: ReportContext) -> None:
    """A class whose clustering leaves no two strategies to compare (one cluster, or one
    whose rest is fewer than min_cluster_size outliers) is named in ``one_strategy``, and
    the scope line says a whole-class shortcut is not ruled out; the verdict is unchanged."""
    from spray.verdict import describe_scope

    summary = build_summary(report_context)
    counts = {entry["class_index"]: entry["comparable_clusters"] for entry in summary["classes"]}
    assert counts == {0: 2, 1: 3, 2: 0}  # class 1's clusters of 6, 6 and 5 of 17 each leave 11-12
    assert summary["one_strategy"] == []  # the unanalysable class is listed as unanalysed, not here
    # class 0 (20 samples, clusters of 14 and 6): with min_cluster_size 7 its cluster of 6 is
    # outliers, and the cluster of 14 has only those 6 to be compared with
    strict = build_summary(dataclasses.replace(report_context, min_cluster_size=7))
    assert {entry["class_index"]: entry["comparable_clusters"] for entry in strict["classes"]} == {0: 0, 1: 0, 2: 0}
    assert [(item["class_index"], item["n_samples"]) for item in strict["one_strategy"]] == [(0, 20), (1, 17)]
    assert strict["verdict"] == summary["verdict"]
    lines = describe_scope(strict)
    assert len(lines) == 2 and all("shortcut shared by the whole class" in line for line in lines)
    assert describe_scope(summary) == []


def test_summary_carries_the_causal_tests(tested_context: ReportContext, tmp_path: Path) -> None:
    """candidate and confirmation on every cluster and flag; a rejected candidate is kept in
    its class but is no flag; untested flags are counted."""
    summary = build_summary(tested_context)
    check_shape(summary, with_truth=True)
    first, second = summary["flags"]
    assert (first["class_index"], first["cluster_id"], first["candidate"]) == (0, 1, True)
    assert first["confirmation"]["status"] == "confirmed"
    assert first["confirmation"]["paste"] == {"n": 20, "moved": 17, "rate": 0.85, "low": 0.64, "high": 0.948, "gain": 0.412}
    assert first["confirmation"]["removal"]["lost"] == 5
    assert first["confirmation"]["control"]["gain"] is None  # NaN in, null out
    assert second["confirmation"] == {
        "status": "untested", "reason": "no held-out images of other classes were available",
        "target_class": 1, "evidence_area": 0.0625,
    }
    assert summary["untested_flags"] == 1
    class1 = next(entry for entry in summary["classes"] if entry["class_index"] == 1)
    rejected = next(cluster for cluster in class1["clusters"] if cluster["cluster_id"] == 1)
    assert rejected["candidate"] is True and rejected["flagged"] is False
    assert rejected["confirmation"]["status"] == "rejected"
    assert (1, 1) not in {(flag["class_index"], flag["cluster_id"]) for flag in summary["flags"]}
    plain = next(cluster for cluster in class1["clusters"] if cluster["cluster_id"] == 2)
    assert plain["candidate"] is False and plain["confirmation"] is None
    loaded = json.loads(write_summary(tmp_path / "summary.json", summary).read_text(encoding="utf-8"))
    assert loaded["flags"][0]["confirmation"] == summary["flags"][0]["confirmation"]


def test_untested_flags_count_only_untested_tests(tested_context: ReportContext) -> None:
    assert build_summary(replace(tested_context, analyses=[
        a for a in tested_context.analyses if a.class_index != 1
    ]))["untested_flags"] == 0


def test_precision_is_null_for_a_class_without_planted_rows(report_context: ReportContext) -> None:
    """Ground truth only in class 0: class 1's clusters have no precision or recall, class 0's
    have numbers (0.0 included, for its clean cluster)."""
    context = replace(report_context, ground_truth_rows=np.array([1, 3, 4, 8, 13, 17]))
    classes = {entry["class_index"]: entry for entry in build_summary(context)["classes"]}
    assert all(c["precision"] is None and c["recall"] is None for c in classes[1]["clusters"])
    by_id = {c["cluster_id"]: c for c in classes[0]["clusters"]}
    assert (by_id[1]["precision"], by_id[1]["recall"]) == (1.0, 1.0)
    assert (by_id[0]["precision"], by_id[0]["recall"]) == (0.0, 0.0)
