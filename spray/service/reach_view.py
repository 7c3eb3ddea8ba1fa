"""The concept reach of a stored flag: where its job's relevances are, and what to say when
they cannot answer (``spray.service.reach`` computes it)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from spray.service.models import Flag
from spray.service.reach import Reach, concept_reach
from spray.service.reviews import latest_run
from spray.service.scan import REAUDIT
from spray.store.common import StoreError
from spray.store.folders import ATTRIBUTIONS_FILE, STAGES


def flag_reach(session: Session, reports: Path, flag: Flag) -> tuple[Reach | None, str, str]:
    """``(reach, note, problem)``: the reach (None with the problem in words when there is none)."""
    concepts = flag.entry.get("concepts") or []
    if not concepts:
        return None, "", "this flag has no distinguishing concepts (the audit built no concept atlas for it)"
    run = flag.run
    folder = run.path if run.kind == REAUDIT else run.job.key  # a re-audit keeps its own stages
    path = (reports / folder / STAGES / ATTRIBUTIONS_FILE).resolve()
    if not path.is_relative_to(reports.resolve()) or not path.is_file():
        return None, "", "the job's stored concept relevances (stages/attributions.h5) are not in the reports folder"
    newest = latest_run(session, run.job)
    note = "" if run.kind == REAUDIT or newest is None or newest.id == run.id else (
        f"the stored relevances belong to the job's newest audit ({newest.path}, {newest.created}); members are matched by sample id"
    )
    try:
        reach = concept_reach(path, concepts, flag.entry.get("member_ids") or [], flag.class_index, run.summary.get("class_names") or [])
    except (StoreError, OSError, KeyError, ValueError) as error:
        return None, "", f"the stored concept relevances cannot be read: {error}"
    return reach, note, ""
