"""Compare two audits of the same model family and dataset: which flags appeared, disappeared, moved.

Typical uses: before and after a correction (ClArC), or the same audit on two dates.
Only the two ``summary.json`` files are read.

Clusters are matched within each analysis (same class index and space) by the overlap
of their members, compared by sample id (ids survive a re-run; row numbers need not):
the Jaccard index ``|A ∩ B| / |A ∪ B|``. Pairs are taken greedily, highest Jaccard
first, each cluster at most once, and only at or above ``min_jaccard``; a cluster
without a partner is matched with nothing. Each match gets a status:

* ``appeared``: flagged after, not flagged (or absent) before;
* ``disappeared``: flagged before, not flagged (or absent) after;
* ``persisted``: flagged in both;
* ``clean``: flagged in neither.

``compare.json`` (schema version 1)::

    {
      "schema_version": 1,
      "min_jaccard": float,
      "before": {"job", "created", "model", "dataset", "n_samples", "n_flags", "folder"},
      "after": {...same keys...},
      "warnings": [str, ...],      # e.g. different datasets or class names
      "counts": {"appeared": int, "disappeared": int, "persisted": int, "clean": int},
      "flags": {"appeared": [match, ...], "disappeared": [...], "persisted": [...]},
      "clusters": [match, ...]     # every cluster of either audit, by class, space
    }
    match = {
      "class_index": int, "class_name": str, "space": str, "status": str,
      "before": null | {"cluster_id": int, "size": int, "artifact_score": float | null,
                        "flagged": bool},
      "after": null | {...same keys...},
      "jaccard": float | null,     # null when one side is missing
      "shared": int,               # members in both
      "score_change": float | null # after - before, when both scores exist
    }

``compare.html`` shows the same as a static page (escaped, no scripts, no network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spray.report.render import REPORT_FILE, environment
from spray.report.summary import write_summary
from spray.store.common import write_text_atomic
from spray.store.folders import SUMMARY_FILE

SCHEMA_VERSION = 1
COMPARE_HTML = "compare.html"
COMPARE_JSON = "compare.json"
DEFAULT_MIN_JACCARD = 0.3
STATUSES = ("appeared", "disappeared", "persisted", "clean")


def compare_summaries(
    before: dict[str, Any], after: dict[str, Any], min_jaccard: float = DEFAULT_MIN_JACCARD
) -> dict[str, Any]:
    """The difference between two ``summary.json`` structures (see the module docstring)."""
    groups_before = _groups(before)
    groups_after = _groups(after)
    keys = sorted(set(groups_before) | set(groups_after))
    matches: list[dict[str, Any]] = []
    for key in keys:
        name_before, clusters_before = groups_before.get(key, ("", []))
        name_after, clusters_after = groups_after.get(key, ("", []))
        name = name_after or name_before
        for pair in match_clusters(clusters_before, clusters_after, min_jaccard):
            matches.append(_match_entry(key, name, *pair))
    counts = {status: sum(m["status"] == status for m in matches) for status in STATUSES}
    flags = {
        status: sorted(
            (m for m in matches if m["status"] == status), key=_flag_order
        )
        for status in STATUSES[:3]
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "min_jaccard": float(min_jaccard),
        "before": _audit_facts(before),
        "after": _audit_facts(after),
        "warnings": _warnings(before, after),
        "counts": counts,
        "flags": flags,
        "clusters": matches,
    }


def jaccard(first: set[str], second: set[str]) -> float:
    """``|A ∩ B| / |A ∪ B|``; 0 for two empty sets."""
    union = len(first | second)
    return len(first & second) / union if union else 0.0


def match_clusters(
    before: list[dict[str, Any]], after: list[dict[str, Any]], min_jaccard: float
) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None, float | None, int]]:
    """Pair clusters by member overlap, greedily by Jaccard; unpaired ones get ``None``.

    Returns ``(before, after, jaccard, shared members)`` tuples: the pairs in the order
    they were made, then unpaired clusters of ``before``, then of ``after``.
    """
    members_before = [set(cluster.get("member_ids", [])) for cluster in before]
    members_after = [set(cluster.get("member_ids", [])) for cluster in after]
    candidates = sorted(
        (
            (-jaccard(a, b), i, j)
            for i, a in enumerate(members_before)
            for j, b in enumerate(members_after)
        ),
    )
    used_before: set[int] = set()
    used_after: set[int] = set()
    pairs: list[tuple[dict[str, Any] | None, dict[str, Any] | None, float | None, int]] = []
    for negative, i, j in candidates:
        score = -negative
        if score < min_jaccard or score <= 0:
            break
        if i in used_before or j in used_after:
            continue
        used_before.add(i)
        used_after.add(j)
        pairs.append((before[i], after[j], score, len(members_before[i] & members_after[j])))
    pairs += [(cluster, None, None, 0) for i, cluster in enumerate(before) if i not in used_before]
    pairs += [(None, cluster, None, 0) for j, cluster in enumerate(after) if j not in used_after]
    return pairs


def load_summary(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Read ``summary.json`` from a file or an audit folder; returns it and the audit folder."""
    path = Path(path)
    file = path / SUMMARY_FILE if path.is_dir() else path
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise FileNotFoundError(f"{file}: cannot read the audit summary ({error.strerror}).") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error}).") from error
    if not isinstance(summary, dict) or "classes" not in summary:
        raise ValueError(f"{file}: not a spray summary.json (no 'classes').")
    return summary, file.parent.resolve()


def write_comparison(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    min_jaccard: float = DEFAULT_MIN_JACCARD,
) -> Path:
    """Compare two audits (folders or ``summary.json`` files) and write ``compare.html``
    and ``compare.json`` into ``out_dir``; returns the page's path."""
    summary_before, folder_before = load_summary(before)
    summary_after, folder_after = load_summary(after)
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder; choose another output folder.")
    out.mkdir(parents=True, exist_ok=True)
    diff = compare_summaries(summary_before, summary_after, min_jaccard)
    diff["before"]["folder"] = str(folder_before)
    diff["after"]["folder"] = str(folder_after)
    links = {
        side: _relative_link(out, folder / REPORT_FILE)
        for side, folder in (("before", folder_before), ("after", folder_after))
    }
    write_summary(out / COMPARE_JSON, diff)
    html = environment().get_template("compare.html").render(diff=diff, links=links)
    page = out / COMPARE_HTML
    write_text_atomic(page, html)
    return page


def _groups(summary: dict[str, Any]) -> dict[tuple[int, str], tuple[str, list[dict[str, Any]]]]:
    """Clusters of each analysable analysis, keyed by (class index, space)."""
    return {
        (int(entry["class_index"]), str(entry["space"])): (
            str(entry.get("class_name", "")),
            list(entry.get("clusters", [])),
        )
        for entry in summary.get("classes", [])
    }


def _side(cluster: dict[str, Any] | None) -> dict[str, Any] | None:
    if cluster is None:
        return None
    return {
        "cluster_id": int(cluster["cluster_id"]),
        "size": int(cluster.get("size", len(cluster.get("member_ids", [])))),
        "artifact_score": cluster.get("artifact_score"),
        "flagged": bool(cluster.get("flagged", False)),
    }


def _match_entry(
    key: tuple[int, str],
    name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    similarity: float | None,
    shared: int,
) -> dict[str, Any]:
    was = bool(before and before.get("flagged"))
    now = bool(after and after.get("flagged"))
    status = "persisted" if was and now else "appeared" if now else "disappeared" if was else "clean"
    score_before = None if before is None else before.get("artifact_score")
    score_after = None if after is None else after.get("artifact_score")
    change = (
        score_after - score_before
        if isinstance(score_before, (int, float)) and isinstance(score_after, (int, float))
        else None
    )
    return {
        "class_index": key[0],
        "class_name": name,
        "space": key[1],
        "status": status,
        "before": _side(before),
        "after": _side(after),
        "jaccard": similarity,
        "shared": int(shared),
        "score_change": change,
    }


def _flag_order(match: dict[str, Any]) -> tuple[float, int, str]:
    scores = [
        side["artifact_score"]
        for side in (match["after"], match["before"])
        if side is not None and isinstance(side["artifact_score"], (int, float))
    ]
    return (-max(scores) if scores else 0.0, match["class_index"], match["space"])


def _audit_facts(summary: dict[str, Any]) -> dict[str, Any]:
    metadata = summary.get("metadata") or {}
    return {
        "job": str(summary.get("job", "")),
        "created": str(summary.get("created", "")),
        "model": "" if metadata.get("model") is None else str(metadata.get("model")),
        "dataset": "" if metadata.get("dataset") is None else str(metadata.get("dataset")),
        "n_samples": summary.get("n_samples"),
        "n_flags": len(summary.get("flags", [])),
        "folder": "",
    }


def _warnings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Reasons the two audits may not be comparable (shown, never fatal)."""
    notes = []
    if before.get("class_names") != after.get("class_names"):
        notes.append("the audits have different class names; clusters are matched by class index")
    dataset_before = (before.get("metadata") or {}).get("dataset")
    dataset_after = (after.get("metadata") or {}).get("dataset")
    if dataset_before != dataset_after:
        notes.append(f"the datasets differ: {dataset_before!s} vs {dataset_after!s}")
    if before.get("n_samples") != after.get("n_samples"):
        notes.append(
            f"the audits cover different numbers of samples: {before.get('n_samples')} vs "
            f"{after.get('n_samples')}"
        )
    return notes


def _relative_link(out: Path, target: Path) -> str | None:
    """A relative URL from ``out`` to ``target``, or None when ``target`` does not exist."""
    if not target.is_file():
        return None
    relative = os.path.relpath(target, out)
    return "/".join(quote(part) for part in Path(relative).parts)
