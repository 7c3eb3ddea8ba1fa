"""Reviews in the database: posting one, reading a job's, and the gate they give a run.

A review is appended, never changed: posting a new review of the same flag (its
``subject``) makes it the current decision and keeps the old one in the history. A
``legitimate`` review needs a reason; a ``fixed`` review names what fixed it (a correction
run's folder or any path) in ``fixed_by``. The gate (``spray.service.gate``) reads every
review of the job and keeps each subject's newest.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, Row, Select, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from spray.service.gate import FIXED, LEGITIMATE, STATUSES, GateResult, Review, evaluate, flag_fingerprints
from spray.service.matching import Fingerprint
from spray.service.memo import Memo
from spray.service.models import FingerprintRow, Flag, Job, ReviewRow, Run
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


def fingerprint_digest(body: dict[str, Any]) -> str:
    """The SHA-256 of a stored fingerprint's canonical JSON: one ``fingerprints`` row each."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_fingerprint(session: Session, fingerprint: Fingerprint) -> int:
    """The id of ``fingerprint``'s row, added when the database does not hold it yet.

    Two writers may add the same fingerprint at once (the service's worker processes): the
    row is committed on its own (nothing else is pending: the review is added after it),
    and the loser of the unique digest reads the winner's row.
    """
    body = fingerprint_json(fingerprint)
    digest = fingerprint_digest(body)
    found = session.scalar(select(FingerprintRow.id).where(FingerprintRow.digest == digest))
    if found is not None:
        return found
    row = FingerprintRow(digest=digest, body=body)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # another process stored it meanwhile
        session.rollback()
        return session.scalars(select(FingerprintRow.id).where(FingerprintRow.digest == digest)).one()
    return row.id


#: Parsed fingerprints, by ``(engine, fingerprint id)``: a stored fingerprint is never
#: changed, so its thousands of member ids are parsed once per process.
_FINGERPRINTS: Memo[Fingerprint] = Memo(256)


def stored_fingerprints(session: Session, ids: Sequence[int]) -> dict[int, Fingerprint]:
    """The parsed fingerprints of ``ids``; those parsed before are not even loaded again."""
    scope = cache_scope(session)
    found = {fingerprint_id: _FINGERPRINTS.get((scope, fingerprint_id)) for fingerprint_id in set(ids)}
    missing = sorted(fingerprint_id for fingerprint_id, fingerprint in found.items() if fingerprint is None)
    if missing:
        rows = session.execute(select(FingerprintRow.id, FingerprintRow.body).where(FingerprintRow.id.in_(missing)))
        for fingerprint_id, body in rows:
            found[fingerprint_id] = _FINGERPRINTS.put((scope, fingerprint_id), fingerprint_of(body))
    return {fingerprint_id: fingerprint for fingerprint_id, fingerprint in found.items() if fingerprint is not None}


#: Flags' summary entries and their fingerprints' ids, by ``(engine, flag id, subject, run
#: folder, run created)``: a flag row is made from its run's summary, which never changes
#: once stored, and its entry lists thousands of member ids (parsed once, not per page).
_FLAG_ENTRIES: Memo[dict[str, Any]] = Memo(256)
_FLAG_FINGERPRINTS: Memo[int] = Memo(1024)


def _flag_key(session: Session, flag: Flag) -> tuple[str, int, str, str, str]:
    return (cache_scope(session), flag.id, flag.subject, flag.run.path, flag.run.created)


def flag_entry(session: Session, flag: Flag) -> dict[str, Any]:
    """The flag's ``summary.json`` entry (its ``entry`` column is loaded only when needed)."""
    return _FLAG_ENTRIES.get_or_make(_flag_key(session, flag), lambda: flag.entry)


def flag_fingerprint_id(session: Session, flag: Flag) -> int:
    """The id of the flag's stored fingerprint (stored on its first review)."""
    return _FLAG_FINGERPRINTS.get_or_make(
        _flag_key(session, flag), lambda: store_fingerprint(session, Fingerprint.of_flag(flag_entry(session, flag)))
    )


def as_reviews(session: Session, rows: Sequence[ReviewRow]) -> list[Review]:
    """The gate's view of stored reviews, each with its reviewed flag's fingerprint."""
    fingerprints = stored_fingerprints(session, [row.fingerprint_id for row in rows])
    return [
        Review(
            subject=row.subject, job=row.job_key, run=row.run_path, status=row.status, reviewer=row.reviewer,
            created=row.created, fingerprint=fingerprints[row.fingerprint_id], reason=row.reason,
            comment=row.comment, fixed_by=row.fixed_by,
        )
        for row in rows
    ]


def post_review(session: Session, flag: Flag, review: ReviewInput, token_name: str = "") -> ReviewRow:
    """Append a review of ``flag``; ReviewError when it cannot be recorded."""
    review = check_input(review)
    run = flag.run
    row = ReviewRow(
        job_key=run.job.key, subject=flag.subject, run_path=run.path, status=review.status, reviewer=review.reviewer,
        reason=review.reason, comment=review.comment, fixed_by=review.fixed_by, created=utc_now_text(),
        token_name=token_name, source="service", fingerprint_id=flag_fingerprint_id(session, flag),
    )
    session.add(row)
    session.commit()
    return row


def job_reviews(session: Session, job_key: str | None = None) -> list[Review]:
    """Every review (of one job, or all), oldest first."""
    query = select(ReviewRow).order_by(ReviewRow.created, ReviewRow.id)
    if job_key is not None:
        query = query.where(ReviewRow.job_key == job_key)
    return as_reviews(session, session.scalars(query).all())


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


def _newest_review_of_each_subject() -> Select[tuple[ReviewRow]]:
    """The newest review of each reviewed flag of the job ``:job_key``, oldest first. The
    job's subjects come from an index, and each subject's newest review from one seek in
    ``(subject, created, id)``: the cost grows with the flags reviewed, not with the reviews
    (a window over all of them grew with every review posted)."""
    newer = aliased(ReviewRow)
    subjects = select(ReviewRow.subject).where(ReviewRow.job_key == bindparam("job_key")).distinct().subquery()
    newest = (
        select(newer.id).where(newer.subject == subjects.c.subject)
        .order_by(newer.created.desc(), newer.id.desc()).limit(1).correlate(subjects).scalar_subquery()
    )
    return select(ReviewRow).where(ReviewRow.id.in_(select(newest).select_from(subjects))).order_by(ReviewRow.created, ReviewRow.id)


#: The service's frequent queries, built once: building a statement costs SQLAlchemy more
#: than SQLite needs to run it.
_CURRENT_REVIEWS = _newest_review_of_each_subject()
_HISTORY = (
    select(*ReviewRow.__table__.columns).where(ReviewRow.subject == bindparam("subject"))
    .order_by(ReviewRow.created.desc(), ReviewRow.id.desc())
)
_HISTORY_NEWEST = _HISTORY.limit(bindparam("limit"))
_REVIEW_COUNTS = (
    select(ReviewRow.subject, func.count(ReviewRow.id)).where(ReviewRow.subject.in_(bindparam("subjects", expanding=True)))
    .group_by(ReviewRow.subject)
)
_REVIEW_STATE = select(func.count(ReviewRow.id), func.max(ReviewRow.id)).where(ReviewRow.job_key == bindparam("job_key"))
_LATEST_RUN = (
    select(Run).where(Run.job_id == bindparam("job_id"), Run.kind.in_((LATEST, DATED)))
    .order_by(Run.created.desc(), Run.id.desc()).limit(1)
)


def current_reviews(session: Session, job_key: str) -> list[Review]:
    """The newest review of every reviewed flag of a job (the decisions the gate reads)."""
    return as_reviews(session, session.scalars(_CURRENT_REVIEWS, {"job_key": job_key}).all())


def history(session: Session, subject: str, limit: int | None = None) -> list[Row[Any]]:
    """The reviews of one flag, newest first (the newest ``limit`` of them, when given), as
    read-only rows with the review's columns as attributes: a history is read to be shown,
    and plain rows cost a fraction of ORM objects."""
    if limit is None:
        return list(session.execute(_HISTORY, {"subject": subject}))
    return list(session.execute(_HISTORY_NEWEST, {"subject": subject, "limit": limit}))


def histories(session: Session, subjects: Sequence[str], limit: int) -> dict[str, list[Row[Any]]]:
    """The newest ``limit`` reviews of each of ``subjects``, newest first (absent: none): a
    run page shows every flag's history. One indexed query per subject reads just its newest
    rows; a window over all of them would read every review of every flag."""
    found = {subject: history(session, subject, limit) for subject in dict.fromkeys(subjects)}
    return {subject: rows for subject, rows in found.items() if rows}


def review_counts(session: Session, subjects: Sequence[str]) -> dict[str, int]:
    """How many reviews each of ``subjects`` has (absent: none)."""
    if not subjects:
        return {}
    return {subject: int(count) for subject, count in session.execute(_REVIEW_COUNTS, {"subjects": list(subjects)})}


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
            created=review.created, token_name="", source="import", fingerprint_id=store_fingerprint(session, review.fingerprint),
        ))
        added += 1
    session.commit()
    return added


def latest_run(session: Session, job: Job) -> Run | None:
    """The job's newest audit (its latest report or newest dated run; re-audits aside)."""
    return session.scalar(_LATEST_RUN, {"job_id": job.id})


#: What the gate reads of a summary: the verdict, completeness, error and flags, and what was
#: not checked (named in an incomplete run's message).
GATE_KEYS = ("verdict", "complete", "error", "flags", "unanalysed", "skipped_images", "untested_low_score")
#: Parsed gate inputs of recent runs: ``(engine, id, folder, created)`` -> the summary's
#: :data:`GATE_KEYS`, with the flags' fingerprints. A run row's summary never changes once stored,
#: and ``(folder, created)`` is unique in a database, so an entry can never be stale.
_GATE_INPUTS: Memo[tuple[dict[str, Any], list[Fingerprint]]] = Memo(32)


def gate_input(session: Session, run: Run) -> tuple[dict[str, Any], list[Fingerprint]]:
    """What the gate reads of a run's summary and its flags' fingerprints, made once per
    run (pages ask often)."""

    def make() -> tuple[dict[str, Any], list[Fingerprint]]:
        summary = run.summary
        parsed = {name: summary[name] for name in GATE_KEYS if name in summary}
        return parsed, flag_fingerprints(parsed)

    return _GATE_INPUTS.get_or_make((cache_scope(session), run.id, run.path, run.created), make)


def review_state(session: Session, job_key: str) -> tuple[int, int]:
    """How many reviews the job has and the highest review id: reviews are only ever added,
    so any new review (posted or imported, committed in any order) changes the pair."""
    count, highest = session.execute(_REVIEW_STATE, {"job_key": job_key}).one()
    return int(count or 0), int(highest or 0)


#: Gate verdicts of recent runs: ``(engine, run id, folder, created, review state)`` ->
#: the result. A run's summary never changes once stored and the review state changes with
#: every new review, so an entry is never stale; pages and the API read the gate of the
#: same run over and over between reviews. Concurrent requests for a verdict wait for the
#: one result.
_GATES: Memo[GateResult] = Memo(64, single_flight=True)


def run_gate(session: Session, run: Run) -> GateResult:
    """The gate's verdict on ``run`` given every review of its job (each flag's newest).

    The review state is read before the reviews, so a verdict filed under a state was made
    from at least that state's reviews; a review committed in between makes a newer state,
    which the next request asks for and misses.
    """
    job_key = run.job.key
    key = (cache_scope(session), run.id, run.path, run.created, *review_state(session, job_key))

    def make() -> GateResult:
        summary, fingerprints = gate_input(session, run)
        return evaluate(summary, current_reviews(session, job_key), fingerprints)

    return _GATES.get_or_make(key, make)
