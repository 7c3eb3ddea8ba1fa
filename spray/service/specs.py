"""Job specs the service can run: read from a jobs folder, filed under their report folder.

``spray serve --jobs DIR`` reads every ``DIR/*.toml``. A spec whose output folder
(``<output>/<name>``) lies inside the served reports folder becomes runnable: its job row
records the spec's path (the API and the job page can then start a run), its
``[schedule] cron`` becomes the job's schedule (source ``spec``; a schedule set through
the API is replaced only by a spec that names one, and a spec's schedule goes when the
spec drops it) and its ``[schedule] webhook`` the job's
webhook. Invalid specs, and specs writing elsewhere, are logged and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from spray.jobs import JobSpecError, load_job
from spray.service.models import Job, Schedule
from spray.service.scan import ensure_job

log = logging.getLogger(__name__)


def next_time(cron: str, after: datetime) -> datetime:
    """The first time ``cron`` fires strictly after ``after`` (UTC)."""
    return croniter(cron, after).get_next(datetime)


def check_cron(cron: str) -> None:
    """ValueError unless ``cron`` is a cron expression of five fields."""
    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ValueError(f"not a cron expression of five fields (minute hour day month weekday, UTC): {cron!r}")


def set_schedule(session: Session, job: Job, cron: str, source: str, now: datetime) -> Schedule | None:
    """Give ``job`` the schedule ``cron`` (empty: none); the next due time is recomputed when it changes."""
    schedule = session.scalar(select(Schedule).where(Schedule.job_id == job.id))
    if not cron:
        if schedule is not None:
            session.delete(schedule)
        return None
    check_cron(cron)
    if schedule is None:
        schedule = Schedule(job_id=job.id, cron=cron, source=source, enabled=True, next_due=next_time(cron, now))
        session.add(schedule)
    elif schedule.cron != cron:
        schedule.cron, schedule.next_due = cron, next_time(cron, now)
    schedule.source = source
    return schedule


def register_specs(session: Session, jobs_dir: Path, reports: Path, clock: Callable[[], datetime]) -> list[Job]:
    """File every valid spec of ``jobs_dir`` that writes into ``reports``; returns their jobs."""
    reports = Path(reports).resolve()
    found = []
    for path in sorted(Path(jobs_dir).glob("*.toml")):
        try:
            spec = load_job(path)
        except JobSpecError as error:
            log.warning("job spec skipped: %s", error)
            continue
        folder = spec.output_dir
        if not folder.is_relative_to(reports) or folder == reports:
            log.warning("job spec %s skipped: it writes to %s, outside the served folder %s", path, folder, reports)
            continue
        job = ensure_job(session, folder.relative_to(reports).as_posix(), spec.job.name)
        job.spec_path = str(path.resolve())
        if spec.schedule.webhook:
            job.webhook = spec.schedule.webhook
        if spec.schedule.cron:
            set_schedule(session, job, spec.schedule.cron, "spec", clock())
        else:
            existing = session.scalar(select(Schedule).where(Schedule.job_id == job.id))
            if existing is not None and existing.source == "spec":  # the spec dropped its schedule
                session.delete(existing)
        found.append(job)
    session.commit()
    return found
