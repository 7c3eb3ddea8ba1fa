"""``summary.json``: the machine-readable result of an audit, for CI gates and scripts.

The file is UTF-8 JSON, written atomically, and identical for identical inputs (no
timestamps of its own, keys of free-form maps sorted). Non-finite numbers are written as
``null``, so any JSON parser reads it. Schema (version 1)::

    {
      "schema_version": 1,              # int; bumped on any incompatible change
      "job": str,                       # audit name
      "created": str,                   # ISO-8601 time the audit ran
      "verdict": str,                   # "clean", "flagged", "incomplete" or "error"
                                        #   (spray.verdict; an "error" summary has only
                                        #   schema_version, job, created, verdict,
                                        #   complete and error)
      "complete": bool,                 # every class analysed in every requested space
                                        #   (up to [check] allow_unanalysed) and no
                                        #   image skipped (up to allow_skipped_images)
      "unanalysed": [                   # expected analyses that are missing or failed
        {"class_index": int, "class_name": str, "space": str, "reason": str,
         "allowed": bool}, ...          #   allowed: accepted by [check] allow_unanalysed
      ],
      "skipped_images": int,            # unreadable images left out
      "untested_low_score": int,        # clusters under the threshold the causal test did
                                        #   not reach ([confirm] max_low_score); > 0 makes
                                        #   the verdict incomplete unless [check]
                                        #   allow_untested_low_score
      "untested_flags": int,            # flags whose confirmation status is "untested"
                                        #   (the causal test could not run: never clean)
      "one_strategy": [                 # class analyses with no two strategies to compare
        {"class_index": int, "class_name": str, "space": str, "n_samples": int}, ...
      ],                                #   (comparable_clusters 0): see below
      "threshold": float | null,        # artifact-score threshold used for flags
      "n_samples": int,                 # rows in the attribution file
      "class_names": [str, ...],        # one per class index
      "metadata": {str: str | number | bool | null},   # header facts, keys sorted
      "artifact_check": null | {        # stamping evidence, when the audit ran one
        "target_class": int,
        "target_class_name": str,
        "n_images": int,                # images of other classes that were stamped
        "flip_rate": float | null,      # share whose prediction flipped to the target
        "mean_prob_before": float | null,   # mean softmax prob. of the target class
        "mean_prob_after": float | null,
        "description": str              # what was stamped
      },
      "ground_truth": null | {          # planted-artifact rows (demo audits only)
        "n_rows": int
      },
      "classes": [                      # one per analysis, by class_index, then space (heatmap first)
        {
          "class_index": int,           # -1 for a dataset-wide analysis
          "class_name": str,
          "space": str,                 # "heatmap", "concept:<layer>", ...
          "analysable": bool,
          "reason": str,                # why not analysable; "" otherwise
          "n_samples": int,             # rows analysed (not analysable: the class's samples)
          "n_clusters": int,            # chosen by the eigengap
          "comparable_clusters": int,   # clusters with a rest to compare with: both the
                                        #   cluster and the rest of its class hold at least
                                        #   [analysis] min_cluster_size samples
          "eigenvalues": [float | null, ...],   # smallest Laplacian eigenvalues, ascending
          "clusters": [                 # highest artifact_score first
            {
              "cluster_id": int,
              "size": int,
              "artifact_score": float | null,
              "flagged": bool,          # the verdict: a candidate that the causal test
                                        #   confirmed or could not test ("untested")
              "candidate": bool,        # artifact_score >= threshold: proposed for the
                                        #   causal test (a rejected candidate is not flagged)
              "confirmation": null | CONFIRMATION,   # the causal test (below); null when
                                        #   none was asked for
              "score_components": {str: float | null},  # keys sorted
              "member_ids": [str, ...], # sample ids, aligned with member_rows
              "member_rows": [int, ...],    # rows in the attribution file, ascending
              "accuracy": float | null,     # as for the class, over the members
              "precision": float | null,    # only with ground truth: share of members
                                            #   that carry the planted artifact; null
                                            #   when the analysed rows hold none
              "recall": float | null        # only with ground truth: share of the
                                            #   analysed rows carrying the artifact
                                            #   that fell into this cluster; null when
                                            #   the analysed rows hold none
            }, ...
          ]
        }, ...
      ],
      "flags": [                        # one per finding (below), highest score first
        {                               #   (ties: class_index, space, cluster_id)
          "class_index": int, "class_name": str, "space": str, "cluster_id": int,
          "size": int, "artifact_score": float | null,
          "member_ids": [str, ...], "member_rows": [int, ...], "accuracy": float | null,
          "precision": float | null, "recall": float | null,  # only with ground truth
          "candidate": bool, "confirmation": null | CONFIRMATION,   # as in the cluster
          "concepts": [                 # only when the audit built a concept atlas
            {"layer": str, "channel": int, "distinction": float | null,
             "reference_rows": [int, ...]}, ...   # highest stored relevance first
          ],
          "revealed_by": [              # every analysis that flagged this finding,
            {"class_index": int, "space": str, "cluster_id": int,   # this flag first
             "artifact_score": float | null, "jaccard": float}, ...
          ]
        }, ...
      ]
    }

``CONFIRMATION`` is the causal test of a candidate (``spray.confirm``), passed through as
the analysis recorded it (non-finite numbers as ``null``)::

    {
      "status": "confirmed" | "rejected" | "untested",
      "reason": str,                    # one sentence for people (e.g. why untested)
      "target_class": int,              # the flagged class
      "evidence_area": float | null,    # mean share of the image the evidence covers
      "evidence": {"area": float, "mass": float, "min_lift": float, "overlay": true,
                    "reference": "hosts", "statistic": "median"},  # the setting kept
                                        #   ("overlay" only for the overlay settings,
                                        #   "reference" only against the hosts,
                                        #   "statistic" only for an overlay of medians)
      "paste": {                        # the cluster's distinguishing evidence pasted into
        "n": int, "moved": int,         #   n audited images of other classes; moved: how
        "rate": float, "low": float, "high": float,   # many now predict the class;
        "gain": float                   #   rate = moved / n, Wilson 95% [low, high];
      },                                #   gain: mean rise of P(class)
      "control": {...},                 # same keys: the same masks and hosts, pixels
                                        #   copied from rest-of-class samples that look there
      "removal": {                      # the evidence removed from members predicted as
        "n": int, "lost": int,          #   the class; lost: no longer predicted as it
        "rate": float, "low": float, "high": float,
        "drop": float                   #   mean fall of P(class)
      }
    }

``paste``, ``control`` and ``removal`` may be absent when ``status`` is ``"untested"``.
A cluster that scored under the threshold (``candidate: false``) carries a record only when
its test confirmed it (``[confirm] max_low_score``): the record then has ``"low_score": true``,
and its ``evidence.min_lift`` is the larger ``low_score_min_lift`` (``concept_low_score_min_lift``
in a concept space); or when the test did not
reach it (beyond the cap, or the test switched off): ``"status": "untested"`` with
``"low_score": true``, not flagged, counted in ``untested_low_score``.
A candidate holding more than half of its class's samples is tested with every lift at
least ``[confirm] majority_min_lift`` (when it is above 0): its record has ``"majority": true``.
When the candidate was tested at several evidence settings (``[confirm] wide_evidence``,
``overlay_evidence``, ``host_overlay_evidence``), the record is the setting that lifts most among those that confirm
(else the one that lifts most), and ``"settings"`` lists every setting's ``evidence``,
``status``, ``evidence_area``, ``paste``, ``control`` and ``removal``, the default setting
first. The overlay setting's ``evidence`` has ``"overlay": true`` (area and mass 1): its
``paste`` adds the members' mean overlay to ``n`` images of other classes, its ``control``
adds the rest of the class's mean overlay at the same brightest pixel, and its ``removal``
subtracts the overlay from the members. The overlay against the hosts (``"reference":
"hosts"``) is the members' mean image minus the hosts' (not the rest of the class's), and
its control is scaled to the same total ink. With ``[confirm] overlay_statistic = "median"``
(``"statistic": "median"``) every mean image of these is a per-pixel median image.

``one_strategy`` lists every class analysis (dataset-wide excepted) that saw the class as
one strategy: a single cluster, or one whose rest is a few outliers (fewer than ``[analysis]
min_cluster_size``). SpRAy finds a Clever Hans strategy by comparing a class's strategies
with each other, so there nothing was compared: a shortcut that the whole class shares (an
artifact on every image of the class) cannot be found in it. It does not make the verdict
incomplete (a class with one strategy is the common case, and the analysis ran), but
"clean" then says that no *part* of the class follows a strategy of its own, not that the
class as a whole does not; the report and ``spray check`` say which classes these are.

``flags`` holds one entry per *finding*. When several analyses flag clusters with (nearly)
the same members (heatmap and concept spaces, a class and the dataset-wide analysis),
the members' Jaccard overlap with a higher-scoring flag being at least
:data:`spray.findings.SAME_FINDING_JACCARD`, only the highest-scoring one is listed; the others appear in
its ``revealed_by`` with their overlap. In ``classes`` every flagged cluster keeps
``flagged: true``.

Keys are only ever added within a schema version (``accuracy``, ``concepts``,
``revealed_by``, ``candidate``, ``confirmation``, ``untested_flags``, ``low_score``,
``untested_low_score``, ``comparable_clusters`` and ``one_strategy`` were),
so a reader should ignore keys it does not know.

A CI gate fails a build unless ``summary["verdict"] == "clean"`` (``spray check`` exits
with the matching code: ``spray.verdict``). ``len(summary["flags"]) > 0`` alone is not a
gate: an audit that could not analyse a class has no flag for it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from spray.analysis.artifacts import comparable
from spray.analysis.result import ClassAnalysis, ClusterResult
from spray.findings import group_findings
from spray.report.context import ArtifactCheck, ReportContext
from spray.report.rows import take_rows, texts_at
from spray.store.common import write_text_atomic
from spray.verdict import verdict_entry

SCHEMA_VERSION = 1

def build_summary(context: ReportContext) -> dict[str, Any]:
    """Collect the audit's results into the ``summary.json`` structure described above."""
    truth = _truth_rows(context)
    analyses = sorted_analyses(context.analyses)
    classes = [_class_entry(context, analysis, truth) for analysis in analyses]
    atlas: dict[tuple[int, str, int], list[Any]] = {}
    for item in context.concept_atlas or []:
        key = (int(item.class_index), str(item.space), int(item.cluster_id))
        atlas.setdefault(key, []).append(item)
    flags = [
        _flag_entry(entry, cluster, atlas)
        for entry in classes
        for cluster in entry["clusters"]
        if cluster["flagged"]
    ]
    flags.sort(key=_flag_order)
    flags = fold_findings(flags)
    spaces = context.expected_spaces if context.expected_spaces is not None else list(dict.fromkeys(a.space for a in analyses))
    gate = verdict_entry(classes, flags, context.class_names, spaces, context.dataset_wide, context.skipped_images, context.check)
    return {
        "schema_version": SCHEMA_VERSION,
        "job": str(context.job_name),
        "created": str(context.created),
        **gate,
        "untested_flags": sum(confirmation_status(flag) == "untested" for flag in flags),
        "one_strategy": one_strategy(classes),
        "threshold": finite_or_none(context.threshold),
        "n_samples": len(context.sample_ids),
        "class_names": [str(name) for name in context.class_names],
        "metadata": {
            str(key): _json_scalar(context.metadata[key])
            for key in sorted(context.metadata, key=str)
        },
        "artifact_check": _check_entry(context.artifact_check, context.class_names),
        "ground_truth": None if truth is None else {"n_rows": int(truth.size)},
        "classes": classes,
        "flags": flags,
    }


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write ``summary`` as JSON to ``path`` atomically and return the path.

    The JSON text is produced before anything touches the disk (NaN or infinity raise
    ``ValueError`` there), then written to a temporary file in the same folder and moved
    over ``path``; a reader never sees a half-written summary.
    """
    path = Path(path)
    text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_atomic(path, text)
    return path


def sorted_analyses(analyses: list[ClassAnalysis]) -> list[ClassAnalysis]:
    """Analyses in report order: by class index (dataset-wide first), then space (the
    heatmap space first, then the concept spaces by name)."""
    return sorted(
        analyses,
        key=lambda analysis: (int(analysis.class_index), str(analysis.space) != "heatmap", str(analysis.space)),
    )


def sorted_clusters(clusters: list[ClusterResult]) -> list[ClusterResult]:
    """Clusters by artifact score, highest first (non-finite last), ties by cluster id."""
    return sorted(
        clusters,
        key=lambda cluster: (_descending(cluster.artifact_score), int(cluster.cluster_id)),
    )


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else ``None`` (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def overlap(
    member_rows: np.ndarray, truth: np.ndarray, analysed_rows: np.ndarray
) -> tuple[float | None, float | None]:
    """Precision and recall of a cluster against the planted-artifact rows.

    Precision is the share of members that carry the artifact; recall is the share of
    artifact-carrying rows *in the analysed rows* that the cluster holds (a cluster of one
    class cannot recall rows of another). Both are ``None`` when the analysed rows hold no
    artifact-carrying row: without ground truth for the class there is nothing to measure
    against (a precision of 0 would read as a miss). Precision is also ``None`` for a
    cluster without members.
    """
    members = np.unique(np.asarray(member_rows, dtype=np.int64))
    hits = np.intersect1d(members, truth, assume_unique=True).size
    analysed = np.unique(np.asarray(analysed_rows, dtype=np.int64))
    relevant = np.intersect1d(analysed, truth, assume_unique=True).size
    if relevant == 0:
        return None, None
    precision = hits / members.size if members.size else None
    recall = hits / relevant if relevant else None
    return precision, recall


def _truth_rows(context: ReportContext) -> np.ndarray | None:
    if context.ground_truth_rows is None:
        return None
    return np.unique(np.asarray(context.ground_truth_rows, dtype=np.int64))


def _class_entry(
    context: ReportContext, analysis: ClassAnalysis, truth: np.ndarray | None
) -> dict[str, Any]:
    rows = _vector(analysis.rows).astype(np.int64)
    correct = _correct(context, rows)
    clusters = []
    for cluster in sorted_clusters(list(analysis.clusters)):
        member_rows = np.sort(np.asarray(cluster.member_rows, dtype=np.int64).reshape(-1))
        entry: dict[str, Any] = {
            "cluster_id": int(cluster.cluster_id),
            "size": int(member_rows.size),
            "artifact_score": finite_or_none(cluster.artifact_score),
            "flagged": bool(cluster.flagged),
            "candidate": bool(cluster.candidate),
            "confirmation": _json_value(cluster.confirmation),
            "score_components": {
                str(name): finite_or_none(cluster.score_components[name])
                for name in sorted(cluster.score_components, key=str)
            },
            "member_ids": texts_at(context.sample_ids, member_rows),
            "member_rows": [int(row) for row in member_rows],
            "accuracy": _accuracy(correct, rows, member_rows),
        }
        if truth is not None:
            entry["precision"], entry["recall"] = overlap(member_rows, truth, rows)
        clusters.append(entry)
    return {
        "class_index": int(analysis.class_index),
        "class_name": str(analysis.class_name),
        "space": str(analysis.space),
        "analysable": bool(analysis.analysable),
        "reason": str(analysis.reason or ""),
        "n_samples": int(rows.size) if analysis.analysable else _class_size(context, int(analysis.class_index)),
        "n_clusters": int(analysis.n_clusters),
        "comparable_clusters": sum(
            comparable(cluster["size"], int(rows.size), context.min_cluster_size) for cluster in clusters
        ) if analysis.analysable else 0,
        "accuracy": _accuracy(correct, rows, rows),
        "eigenvalues": [finite_or_none(value) for value in _vector(analysis.eigenvalues)],
        "clusters": clusters,
    }


def one_strategy(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The analysable class analyses (dataset-wide excepted) with no comparable cluster:
    where a shortcut shared by the whole class could not be found by comparison."""
    return [
        {key: entry[key] for key in ("class_index", "class_name", "space", "n_samples")}
        for entry in classes
        if entry["analysable"] and int(entry["class_index"]) >= 0 and not entry.get("comparable_clusters")
    ]


def _class_size(context: ReportContext, class_index: int) -> int:
    """How many audited samples a class has (all samples for the dataset-wide group)."""
    labels = np.asarray(context.labels)
    return int(labels.size if class_index < 0 else np.count_nonzero(labels == class_index))


def _vector(values: Any) -> np.ndarray:
    """A 1-D array of ``values``; empty for ``None`` (not-analysable classes may lack them)."""
    return np.empty(0) if values is None else np.asarray(values).reshape(-1)


def _correct(context: ReportContext, rows: np.ndarray) -> np.ndarray:
    """Per analysed row: 1 predicted as labelled, 0 not, -1 unlabelled (label < 0)."""
    labels = take_rows(context.labels, rows).astype(np.int64).reshape(-1)
    predictions = take_rows(context.predictions, rows).astype(np.int64).reshape(-1)
    return np.where(labels < 0, -1, (labels == predictions).astype(np.int64))


def _accuracy(correct: np.ndarray, rows: np.ndarray, subset: np.ndarray) -> float | None:
    """Share of labelled rows of ``subset`` (a subset of ``rows``) predicted as labelled."""
    positions = np.searchsorted(rows, subset)
    inside = positions < rows.size
    positions = positions[inside][rows[positions[inside]] == subset[inside]]
    known = correct[positions]
    known = known[known >= 0]
    return float(known.mean()) if known.size else None


def _flag_entry(
    class_entry: dict[str, Any],
    cluster: dict[str, Any],
    atlas: dict[tuple[int, str, int], list[Any]],
) -> dict[str, Any]:
    flag = {key: class_entry[key] for key in ("class_index", "class_name", "space")}
    keys = ("cluster_id", "size", "artifact_score", "member_ids", "member_rows", "accuracy")
    for key in (*keys, "precision", "recall", "candidate", "confirmation"):
        if key in cluster:
            flag[key] = cluster[key]
    items = atlas.get((flag["class_index"], flag["space"], flag["cluster_id"]))
    if items:
        flag["concepts"] = [
            {
                "layer": str(item.layer),
                "channel": int(concept.channel),
                "distinction": finite_or_none(concept.distinction),
                "reference_rows": [int(picture.row) for picture in concept.references],
            }
            for item in items
            for concept in item.concepts
        ]
    return flag


def fold_findings(flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flag per finding (:func:`group_findings`), the others of a finding listed in its
    ``revealed_by`` after the flag itself."""

    def evidence(flag: dict[str, Any], overlap_share: float) -> dict[str, Any]:
        keys = ("class_index", "space", "cluster_id", "artifact_score")
        return {**{key: flag[key] for key in keys}, "jaccard": round(overlap_share, 4)}

    kept = []
    for primary, others in group_findings(flags, lambda flag: flag["member_rows"]):
        primary["revealed_by"] = [evidence(primary, 1.0), *(evidence(flag, share) for flag, share in others)]
        kept.append(primary)
    return kept


def _flag_order(flag: dict[str, Any]) -> tuple[float, int, str, int]:
    score = _descending(flag["artifact_score"])
    return (score, flag["class_index"], flag["space"], flag["cluster_id"])


def _descending(score: Any) -> float:
    """Sort key putting high scores first and missing or non-finite scores last."""
    value = finite_or_none(score)
    return math.inf if value is None else -value


def _check_entry(check: ArtifactCheck | None, class_names: list[str]) -> dict[str, Any] | None:
    if check is None:
        return None
    target = int(check.target_class)
    return {
        "target_class": target,
        "target_class_name": class_name(class_names, target),
        "n_images": int(check.n_images),
        "flip_rate": finite_or_none(check.flip_rate),
        "mean_prob_before": finite_or_none(check.mean_prob_before),
        "mean_prob_after": finite_or_none(check.mean_prob_after),
        "description": str(check.description),
    }


def confirmation_status(entry: dict[str, Any]) -> str | None:
    """The causal test's status of a cluster or flag entry (``"confirmed"``, ``"rejected"``,
    ``"untested"``), or None when it has no test."""
    confirmation = entry.get("confirmation")
    if not isinstance(confirmation, dict):
        return None
    status = confirmation.get("status")
    return None if status is None else str(status)


def class_name(class_names: list[str], index: int) -> str:
    """The name of class ``index``, or the index itself as text when it has none."""
    if 0 <= index < len(class_names):
        return str(class_names[index])
    return "all classes" if index == -1 else str(index)


def _json_scalar(value: Any) -> Any:
    """Metadata values as JSON scalars: numbers and bools kept (NaN -> null), the rest as text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite_or_none(value)
    return str(value)


def _json_value(value: Any) -> Any:
    """A JSON-ready copy of a nested record (the causal test's numbers): dicts with text
    keys, lists, and the scalars of :func:`_json_scalar` (NaN and infinity -> null)."""
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return _json_scalar(value)
