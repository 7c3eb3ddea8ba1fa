"""What a report folder says while a run is in progress and after it failed.

A gate reads ``summary.json``; it must never read the previous run's verdict as this run's.
So before a run writes into a report folder, :func:`set_aside` renames the previous
``summary.json`` and ``index.html`` to ``summary.previous.json`` and
``index.previous.html`` (nothing is lost, nothing looks current; a run killed outright leaves
no ``summary.json`` at all). When a run fails or is interrupted, :func:`write_failure`
leaves a ``summary.json`` with ``verdict: "error"`` and the message, and an ``index.html``
saying so; the reports index lists the job as failed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from spray.report.index import refresh_index
from spray.report.render import REPORT_FILE, environment
from spray.report.summary import SCHEMA_VERSION, write_summary
from spray.store.common import write_text_atomic
from spray.store.folders import SUMMARY_FILE, JobFolders
from spray.store.lock import JobBusyError, job_lock
from spray.verdict import ERROR

PREVIOUS_SUMMARY = "summary.previous.json"
PREVIOUS_REPORT = "index.previous.html"


def set_aside(folder: Path) -> None:
    """Rename the previous run's ``summary.json`` and ``index.html`` in ``folder``, if any."""
    for current, previous in ((SUMMARY_FILE, PREVIOUS_SUMMARY), (REPORT_FILE, PREVIOUS_REPORT)):
        path = folder / current
        if path.is_file() and not path.is_symlink():
            path.replace(folder / previous)


def failure_summary(job: str, error: str) -> dict[str, object]:
    """The ``summary.json`` of a run that failed: the verdict ``error`` and why."""
    return {
        "schema_version": SCHEMA_VERSION,
        "job": job,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": ERROR,
        "complete": False,
        "error": error,
    }


def record_failure(root: Path, job: str, dated: bool, error: str) -> Path | None:
    """Say in the job folder ``root`` that a run failed before it could start (its job spec
    is invalid, say), so its last report does not read as this run's verdict.

    Nothing is written when the folder does not exist (there is no earlier verdict to
    supersede) or another run holds it. With dated runs a new ``runs/<UTC time>/`` folder
    receives the failure. Returns the failure's ``summary.json``, or None.
    """
    if not root.is_dir():
        return None
    folders = JobFolders(root)
    try:
        with job_lock(root):
            folder = folders.new_run() if dated else root
            set_aside(folder)
            written = write_failure(folder, job, error)
    except (JobBusyError, OSError):
        return None
    refresh_index(root.parent)
    return written


def write_failure(folder: Path, job: str, error: str) -> Path:
    """Leave ``summary.json`` (verdict ``error``) and an ``index.html`` saying the run failed in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = failure_summary(job, error)
    write_summary(folder / SUMMARY_FILE, summary)
    previous = PREVIOUS_REPORT if (folder / PREVIOUS_REPORT).is_file() else ""
    page = environment().get_template("failed.html").render(job=job, created=summary["created"], error=error, previous=previous)
    write_text_atomic(folder / REPORT_FILE, page)
    return folder / SUMMARY_FILE
