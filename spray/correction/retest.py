"""Does a corrected model still follow a finding's evidence? The causal re-test of its members.

The re-audit's overlap rule (:func:`spray.correction.reaudit.match_flag`) asks whether the
clustering of the corrected model's explanations still groups the finding's members into a
flagged cluster. After fine-tuning a class regroups, and that rule alone can read a model
that still follows its artifact as fixed: on test draw 11 of ``bench/correction_q3.py`` it
cleared 3 of the 4 corrections that missed the goal on the true stamp.

The re-test asks the corrected model directly. The finding's own members are tested again
with :mod:`spray.confirm`'s causal test, on the corrected model: their evidence is where
the corrected model's relevance on them exceeds the rest of their class's, pasted (and
overlaid) into other classes' images against the same control as in the audit. The
outcome's ``follows`` is true when, at the narrow setting or an overlay setting, the paste
moves more hosts to the class than its control does beyond chance: the lower end of the
95 % interval of the difference (Newcombe's, :func:`spray.confirm.test.difference_interval`)
is above 0. The wide setting is measured and shown but not read: half the image carries part
of the object, and a correction that recovered every attacked image of the user-job test
(``tests/correction/test_correction_user.py``) still moved +10 % more images there.

It is shown beside the verdict, not part of it: on the dev split "beyond chance" kept the
flag of corrections that reached the goal (a fix recovering 80-95 % of the loss still leaves
a measurable response, which the goal allows); ``docs/correction.md`` has the numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spray.confirm.config import ConfirmConfig
from spray.confirm.run import CandidateTester, ReadImages
from spray.confirm.test import Predict, difference_interval

#: The draw of the re-test's members, rest and hosts (any fixed seed: the result must not
#: depend on the run).
RETEST_SEED = 0


#: The kinds of evidence setting (``spray.confirm.config.ConfirmConfig.evidence_settings``:
#: the narrow one first, then the wide one, then the overlays) and those that judge.
NARROW, WIDE, OVERLAY = "narrow", "wide", "overlay"
JUDGING = (NARROW, OVERLAY)


def setting_kind(position: int, evidence: dict[str, Any] | None) -> str:
    """The kind of the ``position``-th setting of a record's ``settings``."""
    if evidence and evidence.get("overlay"):
        return OVERLAY
    return NARROW if position == 0 else WIDE


def _setting_facts(position: int, entry: dict[str, Any]) -> dict[str, Any]:
    """One setting's paste and control counts, their difference and its interval."""
    low, high = difference_interval(entry["paste"], entry["control"])
    paste, control = entry["paste"], entry["control"]
    return {
        "kind": setting_kind(position, entry.get("evidence")),
        "evidence": entry.get("evidence"),
        "paste": {key: paste[key] for key in ("n", "moved", "rate")},
        "control": {key: control[key] for key in ("n", "moved", "rate")},
        "difference": round(float(paste["rate"]) - float(control["rate"]), 4),
        "low": round(low, 4),
        "high": round(high, 4),
    }


def follows_evidence(record: dict[str, Any], judging: tuple[str, ...] = JUDGING) -> dict[str, Any]:
    """The re-test's outcome from a causal-test ``record`` (:meth:`CandidateTester.test_members`).

    ``follows``: True when the interval of some setting of a ``judging`` kind lies above 0,
    False when none does, None when nothing could be pasted at those settings (then
    ``reason`` says why). ``strongest`` is the judging setting with the highest lower end,
    ``settings`` every measured one (each with its ``kind``), ``status`` the record's own
    verdict at the audit's bars (for the reader).
    """
    entries = record.get("settings") or [record]
    every = [
        _setting_facts(position, entry) for position, entry in enumerate(entries)
        if entry.get("paste") and entry.get("control") and entry["paste"]["n"] and entry["control"]["n"]
    ]
    measured = [facts for facts in every if facts["kind"] in judging]
    if not measured:
        return {"follows": None, "status": record.get("status"), "reason": record.get("reason", "nothing could be pasted"),
                "strongest": None, "settings": every}
    strongest = max(measured, key=lambda facts: facts["low"])
    follows = strongest["low"] > 0
    reason = (
        f"the members' evidence still moves {strongest['paste']['moved']}/{strongest['paste']['n']} images of other classes "
        f"to the class ({strongest['difference']:+.0%} over the control, 95 % interval {strongest['low']:+.0%} to "
        f"{strongest['high']:+.0%})"
        if follows else
        f"the members' evidence moves other classes' images no more than the control at the narrow and overlay "
        f"settings (the highest lower end of a 95 % interval: {strongest['low']:+.0%})"
    )
    return {"follows": follows, "status": record.get("status"), "reason": reason, "strongest": strongest, "settings": every}


def retest_members(
    heatmaps: Any, labels: np.ndarray, read_images: ReadImages, predict: Predict, config: ConfirmConfig,
    members: np.ndarray, class_index: int,
) -> dict[str, Any]:
    """Test ``members`` of class ``class_index`` again on the corrected model (``predict``,
    whose explanations are ``heatmaps``) and read the outcome (:func:`follows_evidence`)."""
    tester = CandidateTester(heatmaps, labels, read_images, predict, config)
    record, _ = tester.test_members(np.asarray(members, dtype=np.int64), int(class_index), RETEST_SEED)
    return follows_evidence(record)
