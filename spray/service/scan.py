"""Rebuild the jobs, runs and flags tables from the ``summary.json`` files on disk.

The reports folder is the source of truth for audits; the database is an index of it that
can be rebuilt at any time (``spray serve --rebuild``, and at every start). A scan:

* finds every ``summary.json`` below the reports folder (``spray.report.index``'s search,
  deep enough for ``<job>/correction/<method>/reaudit/``);
* files each under its job: ``<job>/`` (the latest report, kind ``latest``),
  ``<job>/runs/<UTC time>/`` (kind ``dated``) and ``<job>/correction/<method>/reaudit/``
  (kind ``reaudit``, shown with the job but never its gate);
* adds a run per ``(folder, created)`` not seen before, with its flags, so the history of a
  job whose report is overwritten each time is kept; runs whose file is gone or replaced
  stay, marked ``on_disk = false``.

Reviews are never touched by a scan: they carry their own copy of the reviewed flag.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from spray.report.index import find_summaries
from spray.report.render import REPORT_FILE
from spray.report.summary import confirmation_status
from spray.service.models import Flag, Job, Run
from spray.store.folders import CORRECTION, RUN_NAME, RUNS

log = logging.getLogger(__name__)

#: How deep below the reports folder summaries are looked for.
SCAN_DEPTH = 6
LATEST, DATED, REAUDIT = "latest", "dated", "reaudit"


@dataclass
class ScanResult:
    """What a scan added: the ids of new runs, and the files it could not read."""

    new_runs: list[int] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def job_key(relative: PurePosixPath) -> tuple[str, str]:
    """``(job key, kind)`` of a report folder given relative to the reports folder."""
    parts = relative.parts
    if len(parts) >= 3 and parts[-2] == RUNS and RUN_NAME.match(parts[-1]):
        return "/".join(parts[:-2]), DATED
    if CORRECTION in parts[1:]:
        return "/".join(parts[: parts.index(CORRECTION, 1)]), REAUDIT
    return "/".join(parts), LATEST


def flag_subject(run_path: str, created: str, flag: dict[str, Any]) -> str:
    """The identity of a flag of a run: ``<folder>@<created>#<class>/<space>/<cluster>``."""
    return f"{run_path}@{created}#{flag.get('class_index')}/{flag.get('space')}/{flag.get('cluster_id')}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def ensure_job(session: Session, key: str, name: str | None = None) -> Job:
    """The job row of ``key``, created when missing."""
    job = session.scalar(select(Job).where(Job.key == key))
    if job is None:
        job = Job(key=key, name=name or key.rsplit("/", 1)[-1], created_at=now())
        session.add(job)
        session.flush()
    return job


def _read(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(summary, dict):
        raise ValueError("not a JSON object")
    return summary


def add_run(session: Session, job: Job, path: str, kind: str, summary: dict[str, Any], has_page: bool) -> Run:
    """A new run row and its flags from a summary."""
    created = str(summary.get("created", ""))
    flags = [flag for flag in summary.get("flags") or [] if isinstance(flag, dict)]
    samples = summary.get("n_samples")
    run = Run(
        job_id=job.id, path=path, kind=kind, created=created, verdict=str(summary.get("verdict", "error")),
        complete=bool(summary.get("complete", False)), n_samples=samples if isinstance(samples, int) else None,
        n_flags=len(flags), error=str(summary.get("error") or ""), on_disk=True, has_page=has_page, summary=summary,
    )
    session.add(run)
    session.flush()
    for position, flag in enumerate(flags):
        score = flag.get("artifact_score")
        session.add(Flag(
            run_id=run.id, position=position, subject=flag_subject(path, created, flag),
            class_index=int(flag.get("class_index", -1)), class_name=str(flag.get("class_name", "")),
            space=str(flag.get("space", "")), cluster_id=int(flag.get("cluster_id", -1)),
            size=int(flag.get("size", 0)), artifact_score=float(score) if isinstance(score, (int, float)) else None,
            confirmation=confirmation_status(flag), entry=flag,
        ))
    return run


def scan(session: Session, reports: Path, cache: dict[str, tuple[int, int, str]] | None = None) -> ScanResult:
    """Bring the runs of the database in line with the summaries under ``reports``.

    ``cache`` (kept by the caller between scans) maps each summary file to its modification
    time, size and ``created``: a file that did not change since is not read again, so the
    service can rescan a large folder often.
    """
    reports = Path(reports).resolve()
    result = ScanResult()
    seen: set[tuple[str, str]] = set()
    for summary_path in find_summaries(reports, max_depth=SCAN_DEPTH):
        relative = PurePosixPath(summary_path.parent.relative_to(reports).as_posix())
        try:
            stat = summary_path.stat()
            known = cache.get(str(summary_path)) if cache is not None else None
            if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
                seen.add((relative.as_posix(), known[2]))
                continue
            summary = _read(summary_path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            log.warning("%s unreadable: %s", summary_path, error)
            result.unreadable.append(relative.as_posix())
            continue
        key, kind = job_key(relative)
        path = relative.as_posix()
        created = str(summary.get("created", ""))
        seen.add((path, created))
        if cache is not None:
            cache[str(summary_path)] = (stat.st_mtime_ns, stat.st_size, created)
        job = ensure_job(session, key, str(summary.get("job") or "") if kind != REAUDIT else None)
        if kind != REAUDIT and summary.get("job"):
            job.name = str(summary["job"])
        existing = session.scalar(select(Run).where(Run.path == path, Run.created == created))
        if existing is not None:
            existing.on_disk = True
            existing.has_page = (summary_path.parent / REPORT_FILE).is_file()
            continue
        run = add_run(session, job, path, kind, summary, (summary_path.parent / REPORT_FILE).is_file())
        result.new_runs.append(run.id)
    for run in session.scalars(select(Run).where(Run.on_disk.is_(True))):
        if (run.path, run.created) not in seen:
            run.on_disk = False
    session.commit()
    return result
