"""The waiver file: the current review decisions of a job, kept in the repository.

Like a linter's baseline, the file lets a CI gate without the service give the service's
answer: ``spray serve --export-waivers FILE`` writes the newest review of every reviewed
flag (waivers and the other decisions alike, so the gate's reasons are the same too),
``spray check`` reads it when the job spec names it (``[check] waivers = "path"``, relative
to the job file), and ``spray serve --import-waivers FILE`` loads it into a service's
database. The format follows the file's extension: ``.json``, else TOML::

    version = 1

    [[review]]
    subject = "demo/runs/20260101T020000Z@2026-01-01T02:00:00+00:00#1/heatmap/2"
    job = "demo"
    run = "demo/runs/20260101T020000Z"
    status = "legitimate"        # confirmed_shortcut, legitimate, fixed, needs_look
    reviewer = "Ada"
    created = "2026-01-02T09:30:00+00:00"
    reason = "side views of cars"
    comment = ""
    fixed_by = ""
    class_index = 1
    class_name = "square"
    space = "heatmap"
    spaces = ["heatmap"]
    cluster_id = 2
    size = 120
    artifact_score = 0.91        # absent when the flag had none
    concepts = ["features.3:12"]
    member_ids = ["17", "18", ...]

A missing file means no reviews: every flag then fails, which is the safe direction.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spray.service.gate import STATUSES, Review, latest_reviews
from spray.service.matching import Fingerprint
from spray.store.common import write_text_atomic

FORMAT_VERSION = 1


class WaiverFileError(ValueError):
    """A waiver file that cannot be read; the message names the file and the entry."""


def review_entry(review: Review) -> dict[str, Any]:
    """One review as a plain table of the file."""
    fingerprint = review.fingerprint
    entry: dict[str, Any] = {
        "subject": review.subject, "job": review.job, "run": review.run, "status": review.status,
        "reviewer": review.reviewer, "created": review.created, "reason": review.reason,
        "comment": review.comment, "fixed_by": review.fixed_by,
        "class_index": fingerprint.class_index, "class_name": fingerprint.class_name,
        "space": fingerprint.space, "spaces": sorted(fingerprint.all_spaces()),
        "cluster_id": fingerprint.cluster_id, "size": fingerprint.size,
    }
    if fingerprint.artifact_score is not None:
        entry["artifact_score"] = fingerprint.artifact_score
    entry["concepts"] = sorted(fingerprint.concepts)
    entry["member_ids"] = sorted(fingerprint.member_ids)
    return entry


def parse_entry(entry: Any, where: str) -> Review:
    """A review from one table of the file; WaiverFileError naming ``where`` when it is not one."""
    if not isinstance(entry, dict):
        raise WaiverFileError(f"{where}: not a table")
    try:
        status = str(entry["status"])
        if status not in STATUSES:
            raise WaiverFileError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
        score = entry.get("artifact_score")
        fingerprint = Fingerprint(
            class_index=int(entry["class_index"]), class_name=str(entry.get("class_name", "")),
            space=str(entry["space"]), cluster_id=int(entry.get("cluster_id", -1)), size=int(entry["size"]),
            artifact_score=None if score is None else float(score),
            member_ids=frozenset(str(item) for item in entry.get("member_ids", [])),
            spaces=frozenset(str(item) for item in entry.get("spaces", [])) | {str(entry["space"])},
            concepts=frozenset(str(item) for item in entry.get("concepts", [])),
        )
        return Review(
            subject=str(entry["subject"]), job=str(entry.get("job", "")), run=str(entry.get("run", "")),
            status=status, reviewer=str(entry["reviewer"]), created=str(entry["created"]), fingerprint=fingerprint,
            reason=str(entry.get("reason", "")), comment=str(entry.get("comment", "")), fixed_by=str(entry.get("fixed_by", "")),
        )
    except KeyError as error:
        raise WaiverFileError(f"{where}: missing key {error.args[0]!r}") from error
    except (TypeError, ValueError) as error:
        if isinstance(error, WaiverFileError):
            raise
        raise WaiverFileError(f"{where}: {error}") from error


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(str(value))


def to_toml(entries: Sequence[dict[str, Any]]) -> str:
    lines = [
        "# spray waivers: the newest review of every reviewed flag (spray serve --export-waivers).",
        "# spray check honours them when the job spec names this file in [check] waivers.",
        f"version = {FORMAT_VERSION}",
    ]
    for entry in entries:
        lines += ["", "[[review]]"] + [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def write_waivers(path: str | os.PathLike[str], reviews: Iterable[Review], job: str | None = None) -> Path:
    """Write the newest review of every subject (of ``job``, or all) to ``path``; returns it."""
    path = Path(path)
    chosen = [review for review in latest_reviews(list(reviews)) if job is None or review.job == job]
    entries = [review_entry(review) for review in chosen]
    if path.suffix.lower() == ".json":
        text = json.dumps({"version": FORMAT_VERSION, "review": entries}, indent=2, ensure_ascii=False) + "\n"
    else:
        text = to_toml(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def read_waivers(path: str | os.PathLike[str]) -> list[Review]:
    """The reviews of a waiver file; none when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WaiverFileError(f"{path}: cannot read the waiver file: {error}") from error
    if not isinstance(raw, dict):
        raise WaiverFileError(f"{path}: not a waiver file (no top-level table)")
    version = raw.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise WaiverFileError(f"{path}: waiver file version {version!r}; this spray reads version {FORMAT_VERSION}")
    entries = raw.get("review", [])
    if not isinstance(entries, list):
        raise WaiverFileError(f"{path}: 'review' must be a list of tables")
    return [parse_entry(entry, f"{path}: review {number}") for number, entry in enumerate(entries, start=1)]
