"""The HTML pages of the service: jobs, a job, a run with its flags and review forms, a
job's trend, login, and the static reports as they are on disk.

Pages are rendered on the server with jinja2, autoescaping on, so every string that comes
from a dataset or a reviewer (class names, sample ids, comments) is shown as text. They
carry no script (their Content-Security-Policy forbids any). Forms POST with the session's
CSRF token (``spray.service.security``) and redirect back (303) when done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from sqlalchemy.orm import Session

from spray.service.app import Service
from spray.service.gate import STATUSES
from spray.service.models import Flag, Job, Run
from spray.service.reach_view import flag_reach
from spray.service.reviews import ReviewError, ReviewInput, flag_entry, histories, post_review, review_counts, run_gate
from spray.service.security import check_csrf, csrf_token, database_files, form_user, inside_reports, session_user
from spray.service.tokens import verify
from spray.service.trend import correction_accuracies, job_trend
from spray.service.views import job_gate, job_json, job_tasks, jobs, report_link, run_json, runs_newest_first, schedule_of, task_json

router = APIRouter(include_in_schema=False)
#: Reviews of a flag listed on its run's page, newest first; the page links the whole
#: history (``/api/flags/{id}/reviews``) when there are more, so a flag reviewed
#: thousands of times keeps a page of bounded size.
HISTORY_SHOWN = 20
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True)


def service_of(request: Request) -> Service:
    return request.app.state.service


def database(request: Request) -> Iterator[Session]:
    with service_of(request).sessions() as session:
        yield session


def render(request: Request, session: Session, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page of ``templates/name`` with the signed-in user and the CSRF token filled in."""
    user = session_user(request, session)
    context.setdefault("message", request.query_params.get("message", "")[:200])
    html = TEMPLATES.get_template(name).render(
        user=user.name if user else "", csrf=csrf_token(request), reports_name=service_of(request).reports.name, **context,
    )
    return HTMLResponse(html, status_code=status_code)


def _get(session: Session, model: type, item_id: int) -> Any:
    item = session.get(model, item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="not found")
    return item


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, session: Session = Depends(database)) -> HTMLResponse:
    listed = []
    for job in jobs(session):
        summary = job_json(session, job)
        listed.append({
            **summary, "schedule": summary["schedule"]["cron"] if summary["schedule"] else "",
            "runs": [run_json(run) for run in runs_newest_first(job)][:30],
            "tasks": [task_json(task) for task in job_tasks(session, job, limit=5)],
        })
    return render(request, session, "jobs.html", title="Jobs", jobs=listed)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, session: Session = Depends(database)) -> HTMLResponse:
    job = _get(session, Job, job_id)
    run, gate = job_gate(session, job)
    return render(
        request, session, "job.html", title=job.name, job=job, gate=gate.as_json() if gate else None, gate_run=run,
        runs=[run_json(item) for item in runs_newest_first(job)], schedule=schedule_of(session, job),
        tasks=[task_json(task, service_of(request).reports) for task in job_tasks(session, job)],
    )


@router.post("/jobs/{job_id}/runs")
def job_run_form(job_id: int, request: Request, csrf: str = Form(""), session: Session = Depends(database)) -> Response:
    user = form_user(request, session, csrf)
    job = _get(session, Job, job_id)
    if not job.spec_path:
        raise HTTPException(status_code=409, detail="no job spec is known for this job")
    task = service_of(request).scheduler.enqueue(session, job, f"requested by {user.name}")
    return RedirectResponse(f"/jobs/{job.id}?message=run+queued+as+task+{task.id}", status_code=303)


@router.get("/jobs/{job_id}/trend", response_class=HTMLResponse)
def trend_page(job_id: int, request: Request, session: Session = Depends(database)) -> HTMLResponse:
    job = _get(session, Job, job_id)
    trend, plot = job_trend(session, job)
    svg = Markup(plot)  # made from numbers and F1, F2... labels only (see spray.service.trend)
    folder = service_of(request).reports / job.key
    return render(
        request, session, "trend.html", title=f"trend of {job.name}", job=job, svg=svg, runs=trend.runs,
        findings=trend.findings, corrections=correction_accuracies(folder),
    )


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: int, request: Request, session: Session = Depends(database)) -> HTMLResponse:
    run = _get(session, Run, run_id)
    gate = run_gate(session, run)
    readings = {item.index: item for item in gate.flags}
    subjects = [flag.subject for flag in run.flags]
    counts, shown = review_counts(session, subjects), histories(session, subjects, HISTORY_SHOWN)
    flags = [
        {
            "flag": flag, "gate": readings.get(flag.position), "history": shown.get(flag.subject, []), "n_reviews": counts.get(flag.subject, 0),
            "has_concepts": bool(flag_entry(session, flag).get("concepts")),
        }
        for flag in run.flags
    ]
    return render(
        request, session, "run.html", title=run.path, run=run, job=run.job, gate=gate, flags=flags,
        statuses=STATUSES, report_link=report_link(run),
    )


@router.get("/flags/{flag_id}/reach", response_class=HTMLResponse)
def reach_page(flag_id: int, request: Request, session: Session = Depends(database)) -> HTMLResponse:
    flag = _get(session, Flag, flag_id)
    reach, note, problem = flag_reach(session, service_of(request).reports, flag)
    return render(request, session, "reach.html", title="concept reach", flag=flag, reach=reach, note=note, problem=problem)


@router.post("/flags/{flag_id}/review")
def review_form(
    flag_id: int, request: Request, csrf: str = Form(""), status: str = Form(""), reviewer: str = Form(""),
    reason: str = Form(""), comment: str = Form(""), fixed_by: str = Form(""), session: Session = Depends(database),
) -> Response:
    user = form_user(request, session, csrf)
    flag = _get(session, Flag, flag_id)
    try:
        post_review(session, flag, ReviewInput(status, reviewer or user.name, reason, comment, fixed_by), token_name=user.name)
    except ReviewError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error
    return RedirectResponse(f"/runs/{flag.run_id}#flag-{flag.id}", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, session: Session = Depends(database)) -> HTMLResponse:
    return render(request, session, "login.html", title="log in")


@router.post("/login")
def login(request: Request, csrf: str = Form(""), token: str = Form(""), session: Session = Depends(database)) -> Response:
    check_csrf(request, csrf)
    found = verify(session, token.strip())
    if found is None:
        return render(request, session, "login.html", status_code=401, title="log in", message="unknown or revoked token")
    request.session.clear()
    request.session["token_id"] = found.id
    csrf_token(request)
    return RedirectResponse("/", status_code=303)


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/", status_code=303)


@router.get("/reports/{path:path}")
def report_file(path: str, request: Request) -> FileResponse:
    """A file of the reports folder as it is on disk (a folder: its ``index.html``)."""
    service = service_of(request)
    return FileResponse(inside_reports(service.reports, path, database_files(service.engine.url.database)))
