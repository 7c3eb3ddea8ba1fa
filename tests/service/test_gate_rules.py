"""The gate with reviews (``spray.service.gate``) and the matching rule behind it."""

from __future__ import annotations

import pytest

from spray.service.gate import CONFIRMED, FIXED, LEGITIMATE, NEEDS_LOOK, Review, evaluate
from spray.service.matching import Fingerprint, match, material_changes
from spray.verdict import EXIT_ERROR, EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK

from .conftest import flag, summary


def review(entry: dict, status: str, created: str = "2026-01-02T00:00:00+00:00", subject: str = "demo/runs/1#1/heatmap/1", **extra: str) -> Review:
    return Review(
        subject=subject, job="demo", run="demo/runs/1", status=status, reviewer="Ada", created=created,
        fingerprint=Fingerprint.of_flag(entry), reason=extra.get("reason", "side views" if status == LEGITIMATE else ""),
        fixed_by=extra.get("fixed_by", ""),
    )


REVIEWED = flag(range(0, 100), score=0.9)


def test_an_unreviewed_flag_fails() -> None:
    result = evaluate(summary("demo", "t", [flag(range(0, 100))]), [])
    assert (result.verdict, result.exit_code) == ("flagged", EXIT_FLAGGED)
    assert result.flags[0].status == "unreviewed" and not result.flags[0].passes


def test_a_legitimate_waiver_passes_and_names_the_review() -> None:
    later = flag(range(10, 105), cluster_id=4, score=0.93)
    result = evaluate(summary("demo", "t", [later]), [review(REVIEWED, LEGITIMATE)])
    assert (result.verdict, result.exit_code) == ("waived", EXIT_OK)
    reading = result.flags[0]
    assert reading.status == "waived" and reading.passes
    assert reading.review["reviewer"] == "Ada" and reading.review["reason"] == "side views"
    assert reading.match["by"] == "members" and reading.match["jaccard"] == pytest.approx(90 / 105, abs=1e-4)
    assert "waived" in result.lines()[0] and "Ada" in result.lines()[1]
    assert result.as_json()["n_waived"] == 1


@pytest.mark.parametrize(
    ("later", "why"),
    [
        (flag(range(0, 130), score=0.9), "size changed"),              # +30 % > 25 %
        (flag(range(0, 100), score=1.01), "artifact score rose"),       # +0.11 > 0.1
        (flag(range(60, 160), score=0.9, concepts=[("l4", 3)]), "Jaccard"),  # matched by concepts only
    ],
)
def test_a_materially_changed_flag_fails_again(later: dict, why: str) -> None:
    reviewed = flag(range(0, 100), score=0.9, concepts=[("l4", 3)])
    result = evaluate(summary("demo", "t", [later]), [review(reviewed, LEGITIMATE)])
    assert result.exit_code == EXIT_FLAGGED
    assert result.flags[0].status == "waiver_lapsed"
    assert any(why in change for change in result.flags[0].changes)


def test_small_changes_keep_the_waiver() -> None:
    later = flag(range(5, 120), score=0.99)  # size +15 %, score +0.09, Jaccard 95/120
    assert material_changes(Fingerprint.of_flag(later), Fingerprint.of_flag(REVIEWED)) == []
    assert evaluate(summary("demo", "t", [later]), [review(REVIEWED, LEGITIMATE)]).exit_code == EXIT_OK


@pytest.mark.parametrize(("status", "reading"), [(CONFIRMED, "confirmed_shortcut"), (FIXED, "fixed_but_found"), (NEEDS_LOOK, "needs_look")])
def test_other_decisions_fail(status: str, reading: str) -> None:
    result = evaluate(summary("demo", "t", [flag(range(0, 100))]), [review(REVIEWED, status, fixed_by="demo/correction/r-clarc")])
    assert result.exit_code == EXIT_FLAGGED and result.flags[0].status == reading


def test_the_newest_review_of_a_flag_decides() -> None:
    waiver = review(REVIEWED, LEGITIMATE, created="2026-01-02T00:00:00+00:00")
    revoked = review(REVIEWED, NEEDS_LOOK, created="2026-01-03T00:00:00+00:00")
    assert evaluate(summary("demo", "t", [REVIEWED]), [waiver]).exit_code == EXIT_OK
    assert evaluate(summary("demo", "t", [REVIEWED]), [revoked, waiver]).exit_code == EXIT_FLAGGED


def test_an_incomplete_audit_stays_incomplete_whatever_the_reviews() -> None:
    result = evaluate(summary("demo", "t", [REVIEWED], complete=False), [review(REVIEWED, LEGITIMATE)])
    assert (result.verdict, result.exit_code) == ("incomplete", EXIT_INCOMPLETE)
    assert result.flags[0].passes
    assert evaluate(summary("demo", "t", [], complete=False), []).exit_code == EXIT_INCOMPLETE


def test_an_incomplete_audit_names_what_was_not_checked() -> None:
    unchecked = {**summary("demo", "t", [], complete=False), "skipped_images": 2, "untested_low_score": 5}
    message = evaluate(unchecked, []).message
    assert "class 'circle' (heatmap) not analysed: too few" in message
    assert "2 unreadable image(s) skipped" in message and "5 cluster(s) scoring under the threshold not tested" in message
    accepted = {**unchecked, "unanalysed": [{**unchecked["unanalysed"][0], "allowed": True}] * 5}
    assert "circle" not in evaluate(accepted, []).message  # accepted ones are not what failed
    many = {**unchecked, "unanalysed": unchecked["unanalysed"] * 4}
    assert "and 3 more" in evaluate(many, []).message


def test_errors_and_clean_audits_keep_their_codes() -> None:
    failed = {"schema_version": 1, "job": "demo", "created": "t", "verdict": "error", "complete": False, "error": "boom"}
    assert evaluate(failed, [review(REVIEWED, LEGITIMATE)]).exit_code == EXIT_ERROR
    clean = evaluate(summary("demo", "t", []), [])
    assert (clean.verdict, clean.exit_code) == ("clean", EXIT_OK)


def test_matching_needs_the_same_class_and_meeting_spaces() -> None:
    reviewed = Fingerprint.of_flag(flag(range(0, 100)))
    assert match(Fingerprint.of_flag(flag(range(0, 100), class_index=0)), reviewed) is None
    other_space = flag(range(0, 100), space="concept:l4")
    assert match(Fingerprint.of_flag(other_space), reviewed) is None
    other_space["revealed_by"].append({"class_index": 1, "space": "heatmap", "cluster_id": 2, "artifact_score": 0.8, "jaccard": 0.9})
    assert match(Fingerprint.of_flag(other_space), reviewed) is not None
    assert match(Fingerprint.of_flag(flag(range(49, 149))), reviewed) is None  # Jaccard 51/149 < 0.5
    same_concepts = flag(range(500, 600), concepts=[("l4", 3), ("l4", 9)])
    hit = match(Fingerprint.of_flag(same_concepts), Fingerprint.of_flag(flag(range(0, 100), concepts=[("l4", 9), ("l4", 3)])))
    assert hit is not None and hit.by == "concepts"


def test_each_flag_is_read_on_its_own() -> None:
    waived, new = flag(range(0, 100)), flag(range(300, 350), class_index=0, class_name="circle")
    result = evaluate(summary("demo", "t", [waived, new]), [review(REVIEWED, LEGITIMATE)])
    assert result.exit_code == EXIT_FLAGGED
    assert [item.status for item in result.flags] == ["waived", "unreviewed"]
    assert result.message.startswith("1 of 2")
