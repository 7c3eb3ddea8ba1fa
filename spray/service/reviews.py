"""Reviews in the database: posting one, reading a job's, and the gate they give a run.

A review is appended, never changed: posting a new review of the same flag (its
``subject``) makes it the current decision and keeps the old one in the history. A
``legitimate`` review needs a reason; a ``fixed`` review names what fixed it (a correction
run's folder or any path) in ``fixed_by``. The gate (``spray.service.gate``) reads every
review of the job and keeps each subject's newest.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, defer

from spray.service.gate import FIXED, LEGITIMATE, STATUSES, GateResult, Review, evaluate, flag_fingerprints
from spray.service.matching import Fingerprint
from spray.service.models import Flag, Job, ReviewRow, Run
from spray.service.scan import DATED, LATEST

#: Longest reviewer name, reason and comment accepted.
MAX_NAME, MAX_TEXT = 200, 10000


class ReviewError(ValueError):
    """A review that cannot be recorded (unknown status, missing reason...)."""


@dataclass(frozen=True)
class ReviewInput:
    """What a reviewer submits for one flag."""

    status: str
    reviewer: str
    reason: str = ""
    comment: str = ""
    fixed_by: str = ""


def utc_now_text() -> str:
    """The current UTC time as ISO-8601 with microseconds (reviews sort by it)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_input(review: ReviewInput) -> ReviewInput:
    """``review`` with its texts stripped; ReviewError when it cannot be recorded."""
    cleaned = ReviewInput(
        status=review.status.strip(), reviewer=review.reviewer.strip(), reason=review.reason.strip(),
        comment=review.comment.strip(), fixed_by=review.fixed_by.strip(),
    )
    if cleaned.status not in STATUSES:
        raise ReviewError(f"status must be one of {', '.join(STATUSES)}; got {review.status!r}")
    if not cleaned.reviewer:
        raise ReviewError("a review needs the reviewer's name")
    if len(cleaned.reviewer) > MAX_NAME or max(len(cleaned.reason), len(cleaned.comment), len(cleaned.fixed_by)) > MAX_TEXT:
        raise ReviewError(f"reviewer names are at most {MAX_NAME} characters, texts at most {MAX_TEXT}")
    if cleaned.status == LEGITIMATE and not cleaned.reason:
        raise ReviewError("a 'legitimate' review needs a reason (why this strategy is acceptable)")
    if cleaned.status == FIXED and not cleaned.fixed_by:
        raise ReviewError("a 'fixed' review names what fixed it in fixed_by (a correction run's folder or path)")
    return cleaned


def fingerprint_json(fingerprint: Fingerprint) -> dict[str, Any]:
    """A fingerprint as the JSON stored with a review."""
    return {
        "class_index": fingerprint.class_index, "class_name": fingerprint.class_name, "space": fingerprint.space,
        "cluster_id": fingerprint.cluster_id, "size": fingerprint.size, "artifact_score": fingerprint.artifact_score,
        "member_ids": sorted(fingerprint.member_ids), "spaces": sorted(fingerprint.all_spaces()),
        "concepts": sorted(fingerprint.concepts),
    }


def fingerprint_of(data: dict[str, Any]) -> Fingerprint:
    """The fingerprint stored with a review (:func:`fingerprint_json`)."""
    score = data.get("artifact_score")
    return Fingerprint(
        class_index=int(data["class_index"]), class_name=str(data.get("class_name", "")), space=str(data["space"]),
        cluster_id=int(data.get("cluster_id", -1)), size=int(data["size"]),
        artifact_score=None if score is None else float(score),
        member_ids=frozenset(str(item) for item in data.get("member_ids", [])),
        spaces=frozenset(str(item) for item in data.get("spaces", [])),
        concepts=frozenset(str(item) for item in data.get("concepts", [])),
    )


def as_review(row: ReviewRow, fingerprint: Fingerprint | None = None) -> Review:
    """The gate's view of a stored review (``fingerprint``: its parsed fingerprint, when known)."""
    return Review(
        subject=row.subject, job=row.job_key, run=row.run_path, status=row.status, reviewer=row.reviewer,
        created=row.created, fingerprint=fingerprint if fingerprint is not None else fingerprint_of(row.fingerprint), reason=row.reason,
        comment=row.comment, fixed_by=row.fixed_by,
    )


def post_review(session: Session, flag: Flag, review: ReviewInput, token_name: str = "") -> ReviewRow:
    """Append a review of ``flag``; ReviewError when it cannot be recorded."""
    review = check_input(review)
    run = flag.run
    row = ReviewRow(
        job_key=run.job.key, subject=flag.subject, run_path=run.path, status=review.status, reviewer=review.reviewer,
        reason=review.reason, comment=review.comment, fixed_by=review.fixed_by, created=utc_now_text(),
        token_name=token_name, source="service", fingerprint=fingerprint_json(Fingerprint.of_flag(flag.entry)),
    )
    session.add(row)
    session.commit()
    return row


def job_reviews(session: Session, job_key: str | None = None) -> list[Review]:
    """Every review (of one job, or all), oldest first."""
    query = select(ReviewRow).order_by(ReviewRow.created, ReviewRow.id)
    if job_key is not None:
        query = query.where(ReviewRow.job_key == job_key)
    return [as_review(row) for row in session.scalars(query)]


#: A name per engine for the caches below, so that entries of one database are never
#: read for another (a database deleted and made again at the same path has a new engine).
_SCOPES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_SCOPES_LOCK = threading.Lock()


def cache_scope(session: Session) -> str:
    """The name of the session's engine in the service's caches."""
    engine = session.get_bind()
    engine = getattr(engine, "engine", engine)  # a Connection bound session: its engine
    with _SCOPES_LOCK:
        if engine not in _SCOPES:
            _SCOPES[engine] = uuid.uuid4().hex
        return _SCOPES[engine]


#: Fingerprints of stored reviews, by ``(engine, review id, subject, created)``: a review
#: row is never changed, so its fingerprint (thousands of member ids) is parsed once.
_FINGERPRINTS: OrderedDict[tuple[str, int, str, str], Fingerprint] = OrderedDict()
_FINGERPRINTS_KEPT = 256
_FINGERPRINTS_LOCK = threading.Lock()


def current_reviews(session: Session, job_key: str) -> list[Review]:
    """The newest review of every reviewed flag of a job (the decisions the gate reads),
    chosen in SQL so that the superseded history is not even loaded; the fingerprint of a
    review seen before is not loaded again either."""
    rank = func.row_number().over(partition_by=ReviewRow.subject, order_by=(ReviewRow.created.desc(), ReviewRow.id.desc()))
    ranked = select(ReviewRow.id.label("id"), rank.label("rank")).where(ReviewRow.job_key == job_key).subquery()
    query = (
        select(ReviewRow).options(defer(ReviewRow.fingerprint)).join(ranked, ranked.c.id == ReviewRow.id)
        .where(ranked.c.rank == 1).order_by(ReviewRow.created, ReviewRow.id)
    )
    scope = cache_scope(session)
    found = []
    for row in session.scalars(query):
        key = (scope, row.id, row.subject, row.created)
        with _FINGERPRINTS_LOCK:
            fingerprint = _FINGERPRINTS.get(key)
            if fingerprint is not None:
                _FINGERPRINTS.move_to_end(key)
        if fingerprint is None:
            fingerprint = fingerprint_of(row.fingerprint)  # loads the deferred column
            with _FINGERPRINTS_LOCK:
                _FINGERPRINTS[key] = fingerprint
                while len(_FINGERPRINTS) > _FINGERPRINTS_KEPT:
                    _FINGERPRINTS.popitem(last=False)
        found.append(as_review(row, fingerprint))
    return found


def history(session: Session, subject: str, limit: int | None = None) -> list[ReviewRow]:
    """The reviews of one flag, newest first (the newest ``limit`` of them, when given),
    without the reviewed flag's fingerprint (its member ids make a row large, and a history
    is read to be shown)."""
    query = select(ReviewRow).options(defer(ReviewRow.fingerprint)).where(ReviewRow.subject == subject)
    return list(session.scalars(query.order_by(ReviewRow.created.desc(), ReviewRow.id.desc()).limit(limit)))


def review_counts(session: Session, subjects: Sequence[str]) -> dict[str, int]:
    """How many reviews each of ``subjects`` has (absent: none)."""
    if not subjects:
        return {}
    query = select(ReviewRow.subject, func.count(ReviewRow.id)).where(ReviewRow.subject.in_(list(subjects))).group_by(ReviewRow.subject)
    return {subject: int(count) for subject, count in session.execute(query)}


def import_reviews(session: Session, reviews: Sequence[Review]) -> int:
    """Add the reviews of a waiver file that the database does not hold yet; returns how many."""
    added = 0
    for review in reviews:
        duplicate = session.scalar(select(ReviewRow.id).where(
            ReviewRow.subject == review.subject, ReviewRow.created == review.created,
            ReviewRow.status == review.status, ReviewRow.reviewer == review.reviewer,
        ))
        if duplicate is not None:
            continue
        session.add(ReviewRow(
            job_key=review.job, subject=review.subject, run_path=review.run, status=review.status,
            reviewer=review.reviewer, reason=review.reason, comment=review.comment, fixed_by=review.fixed_by,
            created=review.created, token_name="", source="import", fingerprint=fingerprint_json(review.fingerprint),
        ))
        added += 1
    session.commit()
    return added


def latest_run(session: Session, job: Job) -> Run | None:
    """The job's newest audit (its latest report or newest dated run; re-audits aside)."""
    return session.scalar(
        select(Run).where(Run.job_id == job.id, Run.kind.in_((LATEST, DATED))).order_by(Run.created.desc(), Run.id.desc()).limit(1)
    )


#: Parsed gate inputs of recent runs: ``(engine, id, folder, created)`` -> the summary's
#: verdict, completeness, error and flags, with the flags' fingerprints. A run row's summary never changes once stored,
#: and ``(folder, created)`` is unique in a database, so an entry can never be stale.
_GATE_INPUTS: OrderedDict[tuple[str, int, str, str], tuple[dict[str, Any], list[Fingerprint]]] = OrderedDict()
_GATE_INPUTS_KEPT = 32
_GATE_INPUTS_LOCK = threading.Lock()


def gate_input(session: Session, run: Run) -> tuple[dict[str, Any], list[Fingerprint]]:
    """What the gate reads of a run's summary and its flags' fingerprints, made once per
    run (pages ask often)."""
    key = (cache_scope(session), run.id, run.path, run.created)
    with _GATE_INPUTS_LOCK:
        if key in _GATE_INPUTS:
            _GATE_INPUTS.move_to_end(key)
            return _GATE_INPUTS[key]
    summary = run.summary
    parsed = {name: summary[name] for name in ("verdict", "complete", "error", "flags") if name in summary}
    entry = (parsed, flag_fingerprints(parsed))
    with _GATE_INPUTS_LOCK:
        _GATE_INPUTS[key] = entry
        while len(_GATE_INPUTS) > _GATE_INPUTS_KEPT:
            _GATE_INPUTS.popitem(last=False)
    return entry


def review_state(session: Session, job_key: str) -> tuple[int, int]:
    """How many reviews the job has and the highest review id: reviews are only ever added,
    so any new review (posted or imported, committed in any order) changes the pair."""
    count, highest = session.execute(
        select(func.count(ReviewRow.id), func.max(ReviewRow.id)).where(ReviewRow.job_key == job_key)
    ).one()
    return int(count or 0), int(highest or 0)


#: Gate verdicts of recent runs: ``(engine, run id, folder, created, review state)`` ->
#: the result. A run's summary never changes once stored and the review state changes with
#: every new review, so an entry is never stale; pages and the API read the gate of the
#: same run over and over between reviews.
_GATES: OrderedDict[tuple[str, int, str, str, int, int], GateResult] = OrderedDict()
_GATES_KEPT = 64
#: Held while a verdict is computed: concurrent requests for it wait for the one result.
_GATES_LOCK = threading.Lock()


def run_gate(session: Session, run: Run) -> GateResult:
    """The gate's verdict on ``run`` given every review of its job (each flag's newest).

    The review state is read before the reviews, so a verdict filed under a state was made
    from at least that state's reviews; a review committed in between makes a newer state,
    which the next request asks for and misses.
    """
    job_key = run.job.key
    key = (cache_scope(session), run.id, run.path, run.created, *review_state(session, job_key))
    with _GATES_LOCK:
        result = _GATES.get(key)
        if result is None:
            summary, fingerprints = gate_input(session, run)
            result = evaluate(summary, current_reviews(session, job_key), fingerprints)
            _GATES[key] = result
            while len(_GATES) > _GATES_KEPT:
                _GATES.popitem(last=False)
        else:
            _GATES.move_to_end(key)
    return result
