"""When a flag of a later run is "the same finding" as a reviewed one, and when it changed.

A review is made on one flag of one run. Audits run again (nightly, after retraining), and
their flags get new cluster ids, slightly different members and scores; a reviewer's
decision must follow the finding, not the cluster id. This module is the one place that
decides it, used by the service, by ``spray check`` and by the notifications alike.

**Matching rule.** A flag ``F`` of a later run matches a reviewed flag ``R`` when both are
of the same class (``class_index``) and

* their spaces meet (``F``'s analysis space, or any space that also revealed it, is one of
  ``R``'s: a finding flagged first in ``heatmap`` one night and in ``concept:layer4`` the
  next is the same finding) and their members, compared by sample id, overlap by Jaccard
  ``|F & R| / |F | R| >= MATCH_JACCARD`` (0.5, the threshold that also folds one finding's
  analyses into one flag in ``summary.json``); or
* both carry distinguishing concepts (the concept atlas) and the sets of
  ``(layer, channel)`` are equal.

When several reviewed flags match, the one whose latest review is newest wins (the most
recent decision about this finding), ties by the higher Jaccard overlap.

**Material change.** A waiver (a ``legitimate`` review) was given for the finding as it
looked then. It stops applying, and the flag fails the gate again, when compared with the
reviewed flag:

* the members overlap by Jaccard below ``MATCH_JACCARD`` (possible when it matched by its
  concepts only);
* its size changed by more than ``SIZE_CHANGE`` (25 %) of the reviewed size;
* its artifact score rose by more than ``SCORE_RISE`` (0.1); a fall is no concern.

Every comparison is with the *reviewed* flag, never with the previous run: a finding that
drifts a little every night is re-reviewed once the drift adds up.
"""

from __future__ import annotations

import functools

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Member overlap (Jaccard of sample ids) at which two flags are the same finding.
MATCH_JACCARD = 0.5
#: Relative size change above which a waiver lapses.
SIZE_CHANGE = 0.25
#: Rise of the artifact score above which a waiver lapses.
SCORE_RISE = 0.1


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a finding across runs: class, spaces, members, size, score, concepts."""

    class_index: int
    class_name: str
    space: str
    cluster_id: int
    size: int
    artifact_score: float | None
    member_ids: frozenset[str]
    spaces: frozenset[str] = field(default_factory=frozenset)
    concepts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of_flag(cls, flag: dict[str, Any]) -> "Fingerprint":
        """The fingerprint of a ``summary.json`` flag entry (schema in ``spray.report.summary``)."""
        space = str(flag.get("space", ""))
        revealed = [str(item.get("space", "")) for item in flag.get("revealed_by") or [] if isinstance(item, dict)]
        score = flag.get("artifact_score")
        return cls(
            class_index=int(flag.get("class_index", -1)),
            class_name=str(flag.get("class_name", "")),
            space=space,
            cluster_id=int(flag.get("cluster_id", -1)),
            size=int(flag.get("size", len(flag.get("member_ids") or []))),
            artifact_score=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
            member_ids=frozenset(str(item) for item in flag.get("member_ids") or []),
            spaces=frozenset({space, *revealed}),
            concepts=frozenset(concept_keys(flag.get("concepts") or [])),
        )

    def all_spaces(self) -> frozenset[str]:
        return self.spaces | {self.space}


def concept_keys(concepts: Iterable[Any]) -> list[str]:
    """``"layer:channel"`` of each distinguishing concept (summary entries or such strings), sorted."""
    keys = set()
    for concept in concepts:
        if isinstance(concept, dict):
            keys.add(f"{concept.get('layer', '')}:{int(concept.get('channel', -1))}")
        else:
            keys.add(str(concept))
    return sorted(keys)


def jaccard(first: frozenset[str] | set[str], second: frozenset[str] | set[str]) -> float:
    """``|A & B| / |A | B|`` of two sets of sample ids (0 when both are empty); the union's
    size is counted, not built (flags hold thousands of ids). Frozen sets' overlaps are
    remembered: the service asks for the same pairs (a run's flags against the stored
    reviews) after every new review."""
    if isinstance(first, frozenset) and isinstance(second, frozenset):
        return _remembered_jaccard(first, second)
    return _jaccard(first, second)


def _jaccard(first: frozenset[str] | set[str], second: frozenset[str] | set[str]) -> float:
    common = len(first & second)
    union = len(first) + len(second) - common
    return common / union if union else 0.0


_remembered_jaccard = functools.lru_cache(maxsize=4096)(_jaccard)


@dataclass(frozen=True)
class Match:
    """How a flag matched a reviewed one: by ``"members"`` or ``"concepts"``, with the overlap."""

    by: str
    jaccard: float


def match(later: Fingerprint, reviewed: Fingerprint) -> Match | None:
    """Whether ``later`` is the finding ``reviewed`` (the rule in the module docstring)."""
    if later.class_index != reviewed.class_index:
        return None
    overlap = jaccard(later.member_ids, reviewed.member_ids)
    if later.all_spaces() & reviewed.all_spaces() and overlap >= MATCH_JACCARD:
        return Match("members", overlap)
    if later.concepts and later.concepts == reviewed.concepts:
        return Match("concepts", overlap)
    return None


def material_changes(current: Fingerprint, reviewed: Fingerprint) -> list[str]:
    """Why a waiver given for ``reviewed`` no longer covers ``current`` (empty: it does)."""
    changes = []
    overlap = jaccard(current.member_ids, reviewed.member_ids)
    if overlap < MATCH_JACCARD:
        changes.append(f"members overlap the reviewed flag's by Jaccard {overlap:.2f} < {MATCH_JACCARD}")
    if reviewed.size > 0:
        relative = abs(current.size - reviewed.size) / reviewed.size
        if relative > SIZE_CHANGE:
            changes.append(f"size changed from {reviewed.size} to {current.size} ({relative:+.0%} > {SIZE_CHANGE:.0%})")
    elif current.size > 0:
        changes.append(f"size changed from 0 to {current.size}")
    if current.artifact_score is not None and reviewed.artifact_score is not None:
        rise = current.artifact_score - reviewed.artifact_score
        if rise > SCORE_RISE:
            changes.append(f"artifact score rose from {reviewed.artifact_score:.3f} to {current.artifact_score:.3f} (+{rise:.3f} > {SCORE_RISE})")
    return changes


def best_match(later: Fingerprint, candidates: Sequence[tuple[Fingerprint, str]]) -> tuple[int, Match] | None:
    """The index in ``candidates`` (fingerprint, time of its latest review) that ``later``
    matches, newest review first, ties by overlap; None when none matches."""
    found = []
    for index, (reviewed, when) in enumerate(candidates):
        result = match(later, reviewed)
        if result is not None:
            found.append((when, result.jaccard, -index, index, result))
    if not found:
        return None
    found.sort(reverse=True, key=lambda item: (item[0], item[1], item[2]))
    return found[0][3], found[0][4]
