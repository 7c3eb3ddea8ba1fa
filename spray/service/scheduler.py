"""Scheduled and requested audits: a queue of tasks run as subprocesses, one per job at a time.

A task is ``queued`` (by a due schedule, the API or the job page), then ``running`` (a
subprocess ``python -m spray.cli --no-progress audit JOB.toml --wait`` whose output goes to
``<reports>/.spray/logs/task-<id>.log``), then ``done`` (exit 0) or ``failed``. A job never
has two tasks running, nor two queued. When a task ends, the reports folder is scanned
into the database, the log's last lines are kept on the task, and the job's webhook is told
of new or changed flags and of a failure (``spray.service.notify``).

Every ``rescan_every`` (30 s) a step also rescans the reports folder, reading only the
summaries that changed, so runs made outside the service (a cron ``spray check``) appear.

A task left ``running`` by a service that stopped (killed, restarted) is marked ``failed``
with that reason at the next start (:meth:`Scheduler.recover`) and a new task is queued in
its place, so no task stays ``running`` without a process; the audit's own stages resume
what was already computed.

Time comes from an injected ``clock`` and work happens in :meth:`Scheduler.step`, so tests
drive the scheduler without waiting; the service calls ``step`` from a background thread.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from spray.service import notify
from spray.service.models import Job, Run, Schedule, Task
from spray.service.scan import DATED, LATEST, scan
from spray.service.specs import next_time

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
#: Characters of a task's log kept in the database.
TAIL_CHARS = 4000
LOG_FOLDER = Path(".spray") / "logs"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def audit_command(job: Job) -> list[str]:
    """The command that audits ``job`` (its spec must be known)."""
    return [sys.executable, "-m", "spray.cli", "--no-progress", "audit", str(job.spec_path), "--wait"]


def aware(moment: datetime) -> datetime:
    """``moment`` with UTC attached when the database returned it naive (SQLite)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def read_tail(path: Path, chars: int = TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ("" when it cannot be read)."""
    try:
        with path.open("rb") as stream:
            stream.seek(0, 2)
            size = stream.tell()
            stream.seek(max(0, size - chars * 4))
            return stream.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


class Scheduler:
    """Queues, starts and watches the audits of the service's jobs."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        reports: Path,
        clock: Callable[[], datetime] = utc_now,
        command: Callable[[Job], list[str]] = audit_command,
        poster: Callable[[str, dict[str, Any]], bool] = notify.post,
        base_url: str = "",
    ) -> None:
        self.sessions = sessions
        self.reports = Path(reports).resolve()
        self.clock = clock
        self.command = command
        self.poster = poster
        self.base_url = base_url
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.scan_cache: dict[str, tuple[int, int, str]] = {}
        self.rescan_every = timedelta(seconds=30)
        self._last_scan: datetime | None = None
        self._lock = threading.RLock()

    # queue -----------------------------------------------------------------------------
    def enqueue(self, session: Session, job: Job, reason: str) -> Task:
        """A queued task for ``job`` (the one already queued, if there is one)."""
        with self._lock:
            queued = session.scalar(select(Task).where(Task.job_id == job.id, Task.status == QUEUED))
            if queued is not None:
                return queued
            task = Task(job_id=job.id, status=QUEUED, reason=reason, created_at=self.clock(), log_path="", log_tail="", message="")
            session.add(task)
            try:
                session.commit()
            except IntegrityError:  # another process queued the job meanwhile (the one-queued-task index)
                session.rollback()
                return session.scalars(select(Task).where(Task.job_id == job.id, Task.status == QUEUED)).one()
            return task

    def recover(self) -> list[int]:
        """Mark tasks left ``running`` without a process of ours as failed and queue them
        again; returns the ids of the new tasks."""
        requeued = []
        with self._lock, self.sessions() as session:
            for task in session.scalars(select(Task).where(Task.status == RUNNING)).all():
                if task.id in self.processes:
                    continue
                task.status, task.finished_at = FAILED, self.clock()
                task.message = "interrupted: the service stopped while this run was going; queued again"
                task.log_tail = read_tail(self.reports / task.log_path) if task.log_path else ""
                job = session.get(Job, task.job_id)
                session.commit()
                if job is not None:
                    requeued.append(self.enqueue(session, job, f"requeued after task {task.id} was interrupted").id)
        return requeued

    # the loop --------------------------------------------------------------------------
    def due(self) -> list[int]:
        """Queue every job whose schedule is due; returns the queued tasks' ids."""
        now = self.clock()
        queued = []
        with self.sessions() as session:
            for schedule in session.scalars(select(Schedule).where(Schedule.enabled.is_(True))).all():
                if aware(schedule.next_due) > now:
                    continue
                job = session.get(Job, schedule.job_id)
                schedule.next_due = next_time(schedule.cron, now)
                session.commit()
                if job is not None:
                    queued.append(self.enqueue(session, job, f"schedule {schedule.cron}").id)
        return queued

    def start(self) -> list[int]:
        """Start the oldest queued task of every job that has none running; returns their ids."""
        started = []
        with self.sessions() as session:
            running = set(session.scalars(select(Task.job_id).where(Task.status == RUNNING)))
            for task in session.scalars(select(Task).where(Task.status == QUEUED).order_by(Task.created_at, Task.id)).all():
                if task.job_id in running:
                    continue
                job = session.get(Job, task.job_id)
                if job is None or not job.spec_path:
                    task.status, task.finished_at = FAILED, self.clock()
                    task.message = "no job spec is known for this job: start the service with --jobs DIR holding its spec"
                    session.commit()
                    continue
                log_path = LOG_FOLDER / f"task-{task.id}.log"
                (self.reports / LOG_FOLDER).mkdir(parents=True, exist_ok=True)
                with open(self.reports / log_path, "wb") as stream:
                    process = subprocess.Popen(self.command(job), stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(Path(job.spec_path).parent))
                self.processes[task.id] = process
                task.status, task.started_at, task.pid, task.log_path = RUNNING, self.clock(), process.pid, log_path.as_posix()
                session.commit()
                running.add(task.job_id)
                started.append(task.id)
        return started

    def poll(self) -> list[int]:
        """Finish the tasks whose process ended; returns their ids."""
        finished = []
        for task_id, process in list(self.processes.items()):
            code = process.poll()
            if code is None:
                continue
            del self.processes[task_id]
            self._finish(task_id, code)
            finished.append(task_id)
        return finished

    def rescan(self) -> list[int]:
        """Scan the reports folder (runs made outside the service appear) when the last scan
        is older than ``rescan_every``; unchanged summaries are not read again."""
        now = self.clock()
        if self._last_scan is not None and now - self._last_scan < self.rescan_every:
            return []
        self._last_scan = now
        with self.sessions() as session:
            return scan(session, self.reports, self.scan_cache).new_runs

    def step(self) -> None:
        """One round: queue what is due, finish what ended, start what can start, and
        rescan the folder now and then."""
        with self._lock:
            self.due()
            self.poll()
            self.start()
            self.rescan()

    def wait(self, timeout: float) -> None:
        """Wait for every running process (tests and shutdown)."""
        for process in list(self.processes.values()):
            process.wait(timeout=timeout)

    # finishing -------------------------------------------------------------------------
    def _finish(self, task_id: int, code: int) -> None:
        with self.sessions() as session:
            task = session.get(Task, task_id)
            if task is None:
                return
            job = session.get(Job, task.job_id)
            task.exit_code, task.finished_at = code, self.clock()
            task.status = DONE if code == 0 else FAILED
            task.log_tail = read_tail(self.reports / task.log_path)
            task.message = "" if code == 0 else f"the audit exited with status {code}"
            session.commit()
            result = scan(session, self.reports)
            if job is None or not job.webhook:
                return
            if code != 0:
                self.poster(job.webhook, notify.failure_message(job.name, task.id, code, task.log_tail))
                return
            for run_id in result.new_runs:
                run = session.get(Run, run_id)
                if run is None or run.job_id != job.id or run.kind not in (LATEST, DATED):
                    continue
                previous = session.scalar(
                    select(Run).where(Run.job_id == job.id, Run.kind.in_((LATEST, DATED)), Run.created < run.created)
                    .order_by(Run.created.desc()).limit(1)
                )
                before = (previous.summary.get("flags") or []) if previous is not None else []
                changes = notify.flag_changes(before, run.summary.get("flags") or [])
                if changes:
                    link = f"{self.base_url.rstrip('/')}/runs/{run.id}" if self.base_url else ""
                    self.poster(job.webhook, notify.flags_message(job.name, run.path, changes, link))
