"""The service's rows as plain dicts, shared by the JSON API and the HTML pages."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from spray.service.gate import GateResult
from spray.service.models import Flag, Job, ReviewRow, Run, Schedule, Task
from spray.service.reviews import flag_entry, latest_run, run_gate
from spray.service.scheduler import aware, read_tail

#: Characters of a task's log shown on the job page.
PAGE_TAIL = 3000


def report_link(run: Run) -> str:
    """The URL of a run's static report under ``/reports/``."""
    return "/reports/" + "/".join(quote(part) for part in run.path.split("/")) + "/index.html"


def run_json(run: Run) -> dict[str, Any]:
    return {
        "id": run.id, "job_id": run.job_id, "path": run.path, "kind": run.kind, "created": run.created,
        "verdict": run.verdict, "complete": run.complete, "n_samples": run.n_samples, "n_flags": run.n_flags,
        "error": run.error, "on_disk": run.on_disk, "has_page": run.has_page, "report_link": report_link(run),
    }


def flag_json(session: Session, flag: Flag) -> dict[str, Any]:
    entry = flag_entry(session, flag)
    return {
        "id": flag.id, "run_id": flag.run_id, "position": flag.position, "subject": flag.subject,
        "class_index": flag.class_index, "class_name": flag.class_name, "space": flag.space,
        "cluster_id": flag.cluster_id, "size": flag.size, "artifact_score": flag.artifact_score,
        "confirmation": flag.confirmation, "member_ids": list(entry.get("member_ids") or []),
        "concepts": list(entry.get("concepts") or []),
    }


def review_json(row: ReviewRow | Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id, "job": row.job_key, "subject": row.subject, "run": row.run_path, "status": row.status,
        "reviewer": row.reviewer, "reason": row.reason, "comment": row.comment, "fixed_by": row.fixed_by,
        "created": row.created, "token_name": row.token_name, "source": row.source,
    }


def task_json(task: Task, reports: Any = None) -> dict[str, Any]:
    """A task; a running one's log tail is read from its file (``reports`` given)."""
    tail = task.log_tail
    if task.status == "running" and reports is not None and task.log_path:
        tail = read_tail(reports / task.log_path)
    return {
        "id": task.id, "job_id": task.job_id, "status": task.status, "reason": task.reason,
        "created_at": aware(task.created_at).isoformat() if task.created_at else None,
        "started_at": aware(task.started_at).isoformat() if task.started_at else None,
        "finished_at": aware(task.finished_at).isoformat() if task.finished_at else None,
        "exit_code": task.exit_code, "message": task.message, "log_tail": tail[-PAGE_TAIL:],
    }


def schedule_of(session: Session, job: Job) -> Schedule | None:
    return session.scalar(select(Schedule).where(Schedule.job_id == job.id))


def job_gate(session: Session, job: Job) -> tuple[Run | None, GateResult | None]:
    """The job's newest run and the gate's verdict on it (None, None without a run)."""
    run = latest_run(session, job)
    return (run, run_gate(session, run)) if run is not None else (None, None)


def job_json(session: Session, job: Job) -> dict[str, Any]:
    run, gate = job_gate(session, job)
    schedule = schedule_of(session, job)
    return {
        "id": job.id, "key": job.key, "name": job.name, "runnable": bool(job.spec_path), "webhook": bool(job.webhook),
        "schedule": None if schedule is None else {"cron": schedule.cron, "source": schedule.source, "next_due": aware(schedule.next_due).isoformat()},
        "n_runs": len(job.runs), "latest_run_id": run.id if run else None,
        "latest_verdict": run.verdict if run else None,
        "gate": None if gate is None else {"verdict": gate.verdict, "exit_code": gate.exit_code, "message": gate.message},
    }


def jobs(session: Session) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.key)))


def job_tasks(session: Session, job: Job, limit: int = 20) -> list[Task]:
    return list(session.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.id.desc()).limit(limit)))


def runs_newest_first(job: Job) -> list[Run]:
    return sorted(job.runs, key=lambda run: (run.created, run.id), reverse=True)
