"""The JSON API under ``/api`` (schema at ``/openapi.json``).

Reads need no token (the service binds to 127.0.0.1 by default; put it behind a proxy
with authentication to share reads). Every write needs ``Authorization: Bearer <token>``:
posting a review, starting a run, setting a schedule or webhook, rescanning the folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from spray.service.app import Service
from spray.service.models import Flag, Job, Run, Task, Token
from spray.service.reach_view import flag_reach
from spray.service.reviews import ReviewError, ReviewInput, current_reviews, history, post_review, run_gate
from spray.service.scan import scan
from spray.service.security import api_token
from spray.service.specs import check_cron, set_schedule
from spray.service.views import flag_json, job_gate, job_json, job_tasks, jobs, review_json, run_json, runs_newest_first, task_json
from spray.service.waivers import FORMAT_VERSION, review_entry

router = APIRouter(prefix="/api", tags=["api"])


def service_of(request: Request) -> Service:
    return request.app.state.service


def database(request: Request) -> Iterator[Session]:
    with service_of(request).sessions() as session:
        yield session


def writer(request: Request, session: Session = Depends(database)) -> Token:
    """The token of a write (checked before the request's body): 401 without a valid one."""
    return api_token(request, session)


class ReviewBody(BaseModel):
    """A review of a flag: ``status`` one of confirmed_shortcut, legitimate (``reason``
    required), fixed (``fixed_by`` required), needs_look."""

    status: str
    reviewer: str = Field(max_length=200)
    reason: str = Field(default="", max_length=10000)
    comment: str = Field(default="", max_length=10000)
    fixed_by: str = Field(default="", max_length=10000)


class ScheduleBody(BaseModel):
    """A job's schedule (``cron``, UTC; empty removes it) and webhook (empty removes it;
    absent leaves it)."""

    cron: str = ""
    webhook: str | None = None


def _get(session: Session, model: type, item_id: int, what: str) -> Any:
    item = session.get(model, item_id)
    if item is None:
        raise HTTPException(status_code=404, detail=f"no {what} {item_id}")
    return item


@router.get("/jobs")
def list_jobs(session: Session = Depends(database)) -> list[dict[str, Any]]:
    """Every job with its newest run's verdict and the gate's verdict."""
    return [job_json(session, job) for job in jobs(session)]


@router.get("/jobs/{job_id}")
def get_job(job_id: int, session: Session = Depends(database)) -> dict[str, Any]:
    job = _get(session, Job, job_id, "job")
    return {**job_json(session, job), "runs": [run_json(run) for run in runs_newest_first(job)]}


@router.get("/jobs/{job_id}/runs")
def list_runs(job_id: int, session: Session = Depends(database)) -> list[dict[str, Any]]:
    """The job's runs, newest first (dated runs, the latest report, re-audits)."""
    return [run_json(run) for run in runs_newest_first(_get(session, Job, job_id, "job"))]


@router.get("/runs/{run_id}")
def get_run(run_id: int, session: Session = Depends(database)) -> dict[str, Any]:
    """A run, its flags and the gate's verdict on it."""
    run = _get(session, Run, run_id, "run")
    return {**run_json(run), "flags": [flag_json(session, flag) for flag in run.flags], "gate": run_gate(session, run).as_json()}


@router.get("/runs/{run_id}/flags")
def list_flags(run_id: int, session: Session = Depends(database)) -> list[dict[str, Any]]:
    run = _get(session, Run, run_id, "run")
    gate = run_gate(session, run)
    readings = {item.index: item for item in gate.flags}
    return [
        {**flag_json(session, flag), "gate": readings[flag.position].status if flag.position in readings else None}
        for flag in run.flags
    ]


@router.get("/flags/{flag_id}")
def get_flag(flag_id: int, session: Session = Depends(database)) -> dict[str, Any]:
    """A flag and the history of its reviews (newest first)."""
    flag = _get(session, Flag, flag_id, "flag")
    return {**flag_json(session, flag), "reviews": [review_json(row) for row in history(session, flag.subject)]}


@router.get("/flags/{flag_id}/reviews")
def list_reviews(flag_id: int, session: Session = Depends(database)) -> list[dict[str, Any]]:
    flag = _get(session, Flag, flag_id, "flag")
    return [review_json(row) for row in history(session, flag.subject)]


@router.post("/flags/{flag_id}/reviews", status_code=201)
def create_review(flag_id: int, body: ReviewBody, token: Token = Depends(writer), session: Session = Depends(database)) -> dict[str, Any]:
    """Record a review of a flag (appended; earlier reviews stay in the history). Token required."""
    flag = _get(session, Flag, flag_id, "flag")
    try:
        row = post_review(session, flag, ReviewInput(**body.model_dump()), token_name=token.name)
    except ReviewError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error
    return review_json(row)


@router.get("/flags/{flag_id}/reach")
def get_reach(flag_id: int, request: Request, session: Session = Depends(database)) -> dict[str, Any]:
    """How far the flag's distinguishing concepts reach into every class (from the stored
    concept relevances); 409 when the flag has no concepts or the relevances are not stored."""
    flag = _get(session, Flag, flag_id, "flag")
    reach, note, problem = flag_reach(session, service_of(request).reports, flag)
    if reach is None:
        raise HTTPException(status_code=409, detail=problem)
    return {"note": note, **asdict(reach)}


@router.get("/jobs/{job_id}/gate")
def get_gate(job_id: int, run_id: int | None = None, session: Session = Depends(database)) -> dict[str, Any]:
    """The gate's verdict for the job's newest run (or ``run_id``) given every review:
    ``verdict`` (clean, waived, flagged, incomplete, error), ``exit_code`` (as ``spray
    check``), and per flag its status and the review that decided it."""
    job = _get(session, Job, job_id, "job")
    if run_id is not None:
        run = _get(session, Run, run_id, "run")
        if run.job_id != job.id:
            raise HTTPException(status_code=404, detail=f"run {run_id} is not a run of job {job_id}")
        gate = run_gate(session, run)
    else:
        run, gate = job_gate(session, job)
        if run is None or gate is None:
            raise HTTPException(status_code=404, detail="the job has no run yet")
    return {"job": job.key, "run_id": run.id, "run": run.path, **gate.as_json()}


@router.get("/jobs/{job_id}/waivers")
def get_waivers(job_id: int, session: Session = Depends(database)) -> dict[str, Any]:
    """The job's waiver file as JSON (what ``spray serve --export-waivers`` writes)."""
    job = _get(session, Job, job_id, "job")
    return {"version": FORMAT_VERSION, "review": [review_entry(review) for review in current_reviews(session, job.key)]}


@router.post("/jobs/{job_id}/runs", status_code=202)
def trigger_run(job_id: int, request: Request, token: Token = Depends(writer), session: Session = Depends(database)) -> dict[str, Any]:
    """Queue an audit of the job (the one already queued, if any). Token required."""
    job = _get(session, Job, job_id, "job")
    if not job.spec_path:
        raise HTTPException(status_code=409, detail="no job spec is known for this job: start the service with --jobs DIR holding its spec")
    task = service_of(request).scheduler.enqueue(session, job, f"requested by {token.name}")
    return task_json(task)


@router.get("/jobs/{job_id}/tasks")
def list_tasks(job_id: int, request: Request, session: Session = Depends(database)) -> list[dict[str, Any]]:
    """The job's runs started by the service: queued, running (with the log's tail), done, failed."""
    job = _get(session, Job, job_id, "job")
    return [task_json(task, service_of(request).reports) for task in job_tasks(session, job)]


@router.get("/tasks/{task_id}")
def get_task(task_id: int, request: Request, session: Session = Depends(database)) -> dict[str, Any]:
    return task_json(_get(session, Task, task_id, "task"), service_of(request).reports)


@router.put("/jobs/{job_id}/schedule")
def put_schedule(job_id: int, body: ScheduleBody, request: Request, _token: Token = Depends(writer), session: Session = Depends(database)) -> dict[str, Any]:
    """Set the job's cron schedule and webhook. Token required."""
    job = _get(session, Job, job_id, "job")
    if body.webhook is not None:
        if body.webhook and not body.webhook.startswith(("http://", "https://")):
            raise HTTPException(status_code=422, detail="webhook must be an http:// or https:// URL")
        job.webhook = body.webhook or None
    if body.cron.strip():
        try:
            check_cron(body.cron.strip())
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error
    if body.cron.strip() and not job.spec_path:
        raise HTTPException(status_code=409, detail="no job spec is known for this job, so it cannot be scheduled: start the service with --jobs DIR holding its spec")
    try:
        set_schedule(session, job, body.cron.strip(), "api", service_of(request).config.clock())
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error
    session.commit()
    return job_json(session, job)


@router.post("/rebuild")
def rebuild(request: Request, _token: Token = Depends(writer), session: Session = Depends(database)) -> dict[str, Any]:
    """Scan the reports folder into the database again (reviews are kept). Token required."""
    result = scan(session, service_of(request).reports)
    return {"new_runs": result.new_runs, "unreadable": result.unreadable}
