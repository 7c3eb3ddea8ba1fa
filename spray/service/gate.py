"""The gate with reviews: which flags of an audit a reviewer's decision lets through.

``spray.verdict`` says what an audit found; this module says what a deployment may do about
it once people have reviewed the flags. It is pure (no database, no web framework): the
service feeds it the reviews from its database, ``spray check`` the reviews of a waiver
file (``spray.service.waivers``), and both get the same answer for the same reviews.

Each flag of the audit is matched to the reviewed flags (``spray.service.matching``) and
takes the status of the latest review of the one it matches:

======================== ====== ========================================================
flag                     gate   why
======================== ====== ========================================================
no matching review       fails  ``unreviewed``: nobody has looked at it
``needs_look``           fails  ``needs_look``: someone must still decide
``confirmed_shortcut``   fails  ``confirmed_shortcut``: a real shortcut, not fixed
``fixed``                fails  ``fixed_but_found``: a fix means the flag is gone;
                                finding it again means the fix did not hold
``legitimate``           passes ``waived``, naming the review, unless the flag changed
                                materially since the review (``waiver_lapsed``: fails)
======================== ====== ========================================================

Exit codes stay those of ``spray.verdict``: an audit that failed is 2, an incomplete audit
stays 3 whatever the reviews (a waiver covers a finding, not a class that was never
analysed), and an audit with at least one failing flag is 1. An audit whose every flag is
waived exits 0 with the verdict ``waived`` (never ``clean``): the result lists every
waived flag with the review that waived it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from spray.service.matching import Fingerprint, best_match, material_changes
from spray.verdict import CLEAN, ERROR, EXIT_ERROR, EXIT_FLAGGED, EXIT_INCOMPLETE, EXIT_OK, FLAGGED, INCOMPLETE, describe_incomplete

CONFIRMED, LEGITIMATE, FIXED, NEEDS_LOOK = "confirmed_shortcut", "legitimate", "fixed", "needs_look"
#: The statuses a review can give a flag.
STATUSES = (CONFIRMED, LEGITIMATE, FIXED, NEEDS_LOOK)
#: What an incomplete audit's message names of what was not checked, at most.
UNCHECKED_SHOWN = 3
#: The gate's verdict when flags were raised and every one of them is waived (exit 0).
WAIVED = "waived"
UNREVIEWED, WAIVER_LAPSED, FIXED_BUT_FOUND = "unreviewed", "waiver_lapsed", "fixed_but_found"


@dataclass(frozen=True)
class Review:
    """One review of one flag: what was decided, by whom, when, and the flag as it was then.

    ``subject`` identifies the reviewed flag (``<run folder>@<created>#<class>/<space>/<cluster>``);
    several reviews of one subject form its history, the newest being the decision.
    """

    subject: str
    job: str
    run: str
    status: str
    reviewer: str
    created: str
    fingerprint: Fingerprint
    reason: str = ""
    comment: str = ""
    fixed_by: str = ""

    def describe(self) -> str:
        """A one-line account of the review for people."""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.status} by {self.reviewer} at {self.created}{why}"

    def public(self) -> dict[str, Any]:
        """The review as JSON (the fingerprint without its member ids). Built field by field:
        ``asdict`` would deep-copy the thousands of member ids only to drop them."""
        entry: dict[str, Any] = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "fingerprint"}
        entry["flag"] = {
            "class_index": self.fingerprint.class_index,
            "class_name": self.fingerprint.class_name,
            "space": self.fingerprint.space,
            "cluster_id": self.fingerprint.cluster_id,
            "size": self.fingerprint.size,
            "artifact_score": self.fingerprint.artifact_score,
        }
        return entry


def latest_reviews(reviews: Sequence[Review]) -> list[Review]:
    """The newest review of every subject (the current decisions), oldest subject first."""
    newest: dict[str, Review] = {}
    for review in sorted(reviews, key=lambda item: item.created):
        newest[review.subject] = review
    return sorted(newest.values(), key=lambda item: item.created)


@dataclass
class FlagGate:
    """The gate's reading of one flag."""

    index: int
    class_index: int
    class_name: str
    space: str
    cluster_id: int
    size: int
    artifact_score: float | None
    status: str
    passes: bool
    message: str
    review: dict[str, Any] | None = None
    match: dict[str, Any] | None = None
    changes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The reading as JSON: ``asdict`` would deep-copy through the generic machinery,
        and the service serves cached readings on every page."""
        entry = {item.name: getattr(self, item.name) for item in fields(self)}
        entry["review"] = None if self.review is None else dict(self.review)
        entry["match"] = None if self.match is None else dict(self.match)
        entry["changes"] = list(self.changes)
        return entry


@dataclass
class GateResult:
    """The gate's answer for one audit: verdict, exit code and every flag's reading."""

    verdict: str
    exit_code: int
    audit_verdict: str
    complete: bool
    flags: list[FlagGate]
    message: str

    @property
    def waived(self) -> list[FlagGate]:
        return [flag for flag in self.flags if flag.passes]

    @property
    def failing(self) -> list[FlagGate]:
        return [flag for flag in self.flags if not flag.passes]

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "audit_verdict": self.audit_verdict,
            "complete": self.complete,
            "message": self.message,
            "n_flags": len(self.flags),
            "n_waived": len(self.waived),
            "n_failing": len(self.failing),
            "flags": [flag.as_json() for flag in self.flags],
        }

    def lines(self) -> list[str]:
        """What ``spray check`` prints: the verdict, then one line per flag."""
        lines = [f"gate: {self.verdict} (exit {self.exit_code}): {self.message}"]
        for flag in self.flags:
            lines.append(f"  flag {flag.index} class {flag.class_name!r} {flag.space} cluster {flag.cluster_id}: {flag.message}")
        return lines


def flag_fingerprints(summary: dict[str, Any]) -> list[Fingerprint]:
    """The fingerprints of a summary's flags, in the order :func:`evaluate` reads them."""
    return [Fingerprint.of_flag(flag) for flag in summary.get("flags") or [] if isinstance(flag, dict)]


def read_flag(index: int, flag: dict[str, Any], reviews: Sequence[Review], current: Fingerprint | None = None) -> FlagGate:
    """The gate's reading of one ``summary.json`` flag given the current decisions ``reviews``
    (``current``: the flag's fingerprint when the caller has it already)."""
    current = current if current is not None else Fingerprint.of_flag(flag)
    base = {
        "index": index, "class_index": current.class_index, "class_name": current.class_name,
        "space": current.space, "cluster_id": current.cluster_id, "size": current.size,
        "artifact_score": current.artifact_score,
    }
    found = best_match(current, [(review.fingerprint, review.created) for review in reviews])
    if found is None:
        return FlagGate(**base, status=UNREVIEWED, passes=False, message="unreviewed: fails until someone reviews it")
    position, matched = found
    review = reviews[position]
    details = {"review": review.public(), "match": {"by": matched.by, "jaccard": round(matched.jaccard, 4)}}
    if review.status == LEGITIMATE:
        changes = material_changes(current, review.fingerprint)
        if changes:
            return FlagGate(
                **base, status=WAIVER_LAPSED, passes=False, changes=changes, **details,
                message=f"waiver no longer applies ({'; '.join(changes)}); was {review.describe()}",
            )
        return FlagGate(**base, status=WAIVED, passes=True, **details, message=f"waived: {review.describe()}")
    if review.status == FIXED:
        fixed = f" (fix: {review.fixed_by})" if review.fixed_by else ""
        return FlagGate(**base, status=FIXED_BUT_FOUND, passes=False, **details, message=f"reviewed as fixed{fixed} but found again: {review.describe()}")
    if review.status == CONFIRMED:
        return FlagGate(**base, status=CONFIRMED, passes=False, **details, message=f"confirmed shortcut, not fixed: {review.describe()}")
    return FlagGate(**base, status=NEEDS_LOOK, passes=False, **details, message=f"needs a look: {review.describe()}")


def evaluate(summary: dict[str, Any], reviews: Sequence[Review], fingerprints: Sequence[Fingerprint] | None = None) -> GateResult:
    """The gate's verdict on a ``summary.json`` given every review of the job (all of their
    history; only each subject's newest counts). ``fingerprints``: those of the summary's
    flags (:func:`flag_fingerprints`), when the caller keeps them between verdicts."""
    audit_verdict = str(summary.get("verdict", ERROR))
    complete = bool(summary.get("complete", False))
    if audit_verdict not in (CLEAN, FLAGGED, INCOMPLETE):
        error = summary.get("error") or f"unknown verdict {audit_verdict!r}"
        return GateResult(ERROR, EXIT_ERROR, audit_verdict, complete, [], f"the audit failed: {error}")
    current = latest_reviews(reviews)
    entries = [(index, flag) for index, flag in enumerate(summary.get("flags") or []) if isinstance(flag, dict)]
    known = list(fingerprints) if fingerprints is not None else [None] * len(entries)
    if len(known) != len(entries):
        raise ValueError(f"{len(known)} fingerprints for {len(entries)} flags")
    flags = [read_flag(index, flag, current, fingerprint) for (index, flag), fingerprint in zip(entries, known)]
    failing = [flag for flag in flags if not flag.passes]
    if failing:
        return GateResult(FLAGGED, EXIT_FLAGGED, audit_verdict, complete, flags, f"{len(failing)} of {len(flags)} flag(s) fail the gate")
    if not complete:
        waived = f"; {len(flags)} flag(s) waived" if flags else ""
        unchecked = describe_incomplete(summary, accepted=False)
        shown = "; ".join(unchecked[:UNCHECKED_SHOWN]) + (f"; and {len(unchecked) - UNCHECKED_SHOWN} more" if len(unchecked) > UNCHECKED_SHOWN else "")
        detail = f" ({shown})" if shown else ""
        return GateResult(INCOMPLETE, EXIT_INCOMPLETE, audit_verdict, complete, flags, f"the audit did not check everything{detail}{waived}")
    if flags:
        return GateResult(WAIVED, EXIT_OK, audit_verdict, complete, flags, f"passes: all {len(flags)} flag(s) waived by reviews, none clean")
    return GateResult(CLEAN, EXIT_OK, audit_verdict, complete, flags, "clean: every class checked, no flag")
