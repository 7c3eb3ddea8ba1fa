"""The gate's verdict on an audit, and the exit codes of ``spray check``.

A verdict is a promise: ``clean`` means every class of the data was analysed in every
requested space and nothing was flagged. SpRAy compares a class's strategies with each other,
so what it rules out is a part of a class following a strategy of its own; a class it saw as
one strategy had nothing to compare, and ``summary.json`` lists those (``one_strategy``,
:func:`describe_scope`) without making the verdict incomplete. Anything the audit could not check makes the
verdict ``incomplete`` (unless the job accepts it in ``[check]``), and a run that failed
leaves the verdict ``error``, never the previous run's answer.

========== ========= ===================================================================
verdict    exit code meaning
========== ========= ===================================================================
clean      0         every class analysed in every space, no flag
flagged    1         at least one cluster flagged (whatever else happened)
error      2         the run failed: bad job spec, unreadable data, a model that does
                     not fit, user code that raised or exited
incomplete 3         no flag, but a class or space could not be analysed (too few
                     samples, NaN heatmaps, constant heatmaps, no samples), images
                     were skipped as unreadable, or clusters scoring under the
                     threshold were not tested causally (``[confirm] max_low_score``)
busy       4         another run holds the job folder (``spray.store.lock``); nothing ran
========== ========= ===================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spray.config import setting, validate

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR, EXIT_INCOMPLETE, EXIT_BUSY = 0, 1, 2, 3, 4
CLEAN, FLAGGED, ERROR, INCOMPLETE = "clean", "flagged", "error", "incomplete"
EXIT_CODES = {CLEAN: EXIT_OK, FLAGGED: EXIT_FLAGGED, ERROR: EXIT_ERROR, INCOMPLETE: EXIT_INCOMPLETE}


@dataclass(frozen=True)
class CheckConfig:
    """``[check]``: what the gate may accept as not checked.

    ``allow_unanalysed``: class names that may be left unanalysed (datasets with known tiny
    classes); they are listed in ``summary.json`` but do not make the verdict incomplete.
    ``allow_skipped_images``: unreadable images that were skipped (``[data] strict =
    false``) do not make the verdict incomplete.
    ``waivers``: a waiver file (``spray.service.waivers``, relative to the job file) whose
    reviews ``spray check`` honours (``spray.service.gate``): flags reviewed as legitimate
    then pass, and the check says which review waived each; empty: no reviews, every flag
    fails.
    ``allow_untested_low_score``: clusters scoring under the threshold that the causal test
    did not reach (beyond ``[confirm] max_low_score``, or with the test switched off) do not
    make the verdict incomplete; they are still counted in ``summary.json``.
    """

    allow_unanalysed: tuple[str, ...] = setting((), doc="class names that may stay unanalysed")
    allow_skipped_images: bool = setting(False, doc="skipped unreadable images do not make the verdict incomplete")
    waivers: str = setting("", doc="waiver file of reviewed flags honoured by spray check (relative to the job file)")
    allow_untested_low_score: bool = setting(False, doc="clusters under the score threshold left untested do not make the verdict incomplete")

    def __post_init__(self) -> None:
        validate(self)


def verdict_entry(
    classes: Sequence[dict[str, Any]],
    flags: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    spaces: Sequence[str],
    dataset_wide: bool,
    skipped_images: int = 0,
    check: CheckConfig = CheckConfig(),
) -> dict[str, Any]:
    """``summary.json``'s ``verdict``, ``complete`` and the list of what was not checked.

    ``classes`` are the summary's class entries; every class of ``class_names`` (and the
    dataset-wide group when ``dataset_wide``) is expected in every space of ``spaces``. An
    expected analysis that is missing or not analysable is listed under ``unanalysed``
    (``allowed: true`` when ``check`` accepts it). Clusters scoring under the threshold whose
    causal test did not run (an ``"untested"`` record with ``"low_score": true``) are
    counted in ``untested_low_score``: a shortcut split into small clusters hides there.
    """
    found = {(int(entry["class_index"]), str(entry["space"])): entry for entry in classes}
    groups = [(index, str(name)) for index, name in enumerate(class_names)]
    if dataset_wide:
        groups.append((-1, "all classes"))
    unanalysed = []
    for space in spaces:
        for index, name in groups:
            entry = found.get((index, space))
            if entry is not None and entry["analysable"]:
                continue
            reason = "no analysis of this class in this space" if entry is None else str(entry["reason"])
            allowed = index >= 0 and name in check.allow_unanalysed
            unanalysed.append({"class_index": index, "class_name": name, "space": space, "reason": reason, "allowed": allowed})
    problems = [item for item in unanalysed if not item["allowed"]]
    skipped_counts = skipped_images > 0 and not check.allow_skipped_images
    untested_low = sum(_untested_low_score(cluster) for entry in classes for cluster in entry.get("clusters", []))
    untested_counts = untested_low > 0 and not check.allow_untested_low_score
    complete = not problems and not skipped_counts and not untested_counts
    if flags:
        verdict = FLAGGED
    else:
        verdict = CLEAN if complete else INCOMPLETE
    return {
        "verdict": verdict,
        "complete": complete,
        "unanalysed": unanalysed,
        "skipped_images": int(skipped_images),
        "untested_low_score": int(untested_low),
    }


def _untested_low_score(cluster: dict[str, Any]) -> bool:
    """A cluster scoring under the threshold that the causal test did not reach."""
    record = cluster.get("confirmation")
    return isinstance(record, dict) and bool(record.get("low_score")) and record.get("status") == "untested"


def describe_incomplete(summary: dict[str, Any], accepted: bool = True) -> list[str]:
    """One line per thing the audit could not check (accepted ones say so; ``accepted=False``
    leaves the unanalysed classes the job accepts out)."""
    lines = [
        f"class {item['class_name']!r} ({item['space']}) not analysed: {item['reason']}"
        + (" (accepted by [check] allow_unanalysed)" if item.get("allowed") else "")
        for item in summary.get("unanalysed", [])
        if accepted or not item.get("allowed")
    ]
    if summary.get("skipped_images"):
        lines.append(f"{summary['skipped_images']} unreadable image(s) skipped (listed in the report)")
    if summary.get("untested_low_score"):
        lines.append(
            f"{summary['untested_low_score']} cluster(s) scoring under the threshold not tested causally: "
            "raise [confirm] max_low_score, or accept with [check] allow_untested_low_score = true"
        )
    return lines


def describe_scope(summary: dict[str, Any]) -> list[str]:
    """One line per class that an audit saw as one strategy in some space (``summary.json``'s
    ``one_strategy``): there SpRAy had nothing to compare, so a shortcut shared by the whole
    class is not something its verdict rules out."""
    spaces: dict[tuple[int, str], list[str]] = {}
    for item in summary.get("one_strategy", []):
        spaces.setdefault((int(item["class_index"]), str(item["class_name"])), []).append(str(item["space"]))
    return [
        f"class {name!r}: one strategy ({', '.join(found)}); a shortcut shared by the whole class is not found by comparison within it"
        for (_, name), found in sorted(spaces.items())
    ]


def exit_code(summary: dict[str, Any]) -> int:
    """The exit code of ``spray check`` for a ``summary.json``."""
    return EXIT_CODES.get(str(summary.get("verdict")), EXIT_ERROR)
