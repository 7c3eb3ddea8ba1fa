"""Schedules, the task queue and webhooks, driven by an injected clock.

The audit command is replaced by a small script that writes a dated run's ``summary.json``
the way an audit does (and exits with a chosen status), so a test takes a second, not a
training run (a real audit of even the smallest demo takes over a minute here).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spray.service import notify
from spray.service.app import ServiceConfig, open_service

from .conftest import Served, serve

FAKE_AUDIT = '''
import json, sys, time, pathlib
reports, job, stamp, code, members, pause = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
print("fake audit of", job, "starting", flush=True)
time.sleep(pause)
if code == 0:
    start, stop = (int(x) for x in members.split(":"))
    folder = pathlib.Path(reports) / job / "runs" / stamp
    folder.mkdir(parents=True)
    ids = [f"s{i}" for i in range(start, stop)]
    flag = {"class_index": 1, "class_name": "square", "space": "heatmap", "cluster_id": 1, "size": len(ids),
            "artifact_score": 0.9, "member_ids": ids, "member_rows": list(range(len(ids)))}
    iso = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}+00:00"
    summary = {"schema_version": 1, "job": job, "created": iso, "verdict": "flagged", "complete": True,
               "unanalysed": [], "flags": [flag], "classes": [], "class_names": ["circle", "square"]}
    (folder / "summary.json").write_text(json.dumps(summary))
    print("report:", folder / "index.html", flush=True)
else:
    print("spray: error: the data could not be read", file=sys.stderr, flush=True)
sys.exit(code)
'''


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class Receiver:
    """A webhook receiver on 127.0.0.1 in a thread, keeping every JSON body it gets."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


class Plan:
    """What the fake audit of the next task does: its run's time stamp, exit status, members."""

    def __init__(self, tmp_path: Path, reports: Path) -> None:
        self.script = tmp_path / "fake_audit.py"
        self.script.write_text(FAKE_AUDIT)
        self.reports = reports
        self.steps: list[tuple[str, int, str, float]] = []

    def command(self, job: Any) -> list[str]:
        stamp, code, members, pause = self.steps.pop(0)
        return [sys.executable, str(self.script), str(self.reports), job.key, stamp, str(code), members, str(pause)]


def _setup(tmp_path: Path, hook: str, cron: str = "0 2 * * *") -> tuple[Path, Path]:
    reports = tmp_path / "reports"
    reports.mkdir()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "nightly.toml").write_text(
        f'[job]\nname = "nightly"\noutput = "../reports"\ndated = true\n\n[schedule]\ncron = "{cron}"\nwebhook = "{hook}"\n', encoding="utf-8"
    )
    return reports, jobs


def _served(reports: Path, jobs: Path, clock: Clock, plan: Plan) -> Served:
    return serve(reports, jobs_dir=jobs, clock=clock, command=plan.command)


def test_a_due_schedule_runs_the_audit_and_notifies_new_flags(tmp_path: Path, receiver: Receiver) -> None:
    reports, jobs = _setup(tmp_path, receiver.url)
    clock = Clock(datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc))
    plan = Plan(tmp_path, reports)
    served = _served(reports, jobs, clock, plan)
    scheduler = served.app.state.service.scheduler
    job = served.client.get("/api/jobs").json()[0]
    assert job["key"] == "nightly" and job["runnable"] and job["schedule"]["next_due"].startswith("2026-01-01T02:00")

    scheduler.step()
    assert served.client.get(f"/api/jobs/{job['id']}/tasks").json() == []  # not due yet

    clock.now = datetime(2026, 1, 1, 2, 0, 30, tzinfo=timezone.utc)
    plan.steps.append(("20260101T020030Z", 0, "0:100", 0.0))
    scheduler.step()
    tasks = served.client.get(f"/api/jobs/{job['id']}/tasks").json()
    assert [(task["status"], task["reason"]) for task in tasks] == [("running", "schedule 0 2 * * *")]
    scheduler.wait(timeout=30)
    scheduler.step()
    task = served.client.get(f"/api/tasks/{tasks[0]['id']}").json()
    assert task["status"] == "done" and task["exit_code"] == 0 and "fake audit of nightly starting" in task["log_tail"]
    assert served.client.get(f"/api/jobs/{job['id']}").json()["schedule"]["next_due"].startswith("2026-01-02T02:00")
    gate = served.client.get(f"/api/jobs/{job['id']}/gate").json()
    assert gate["run"] == "nightly/runs/20260101T020030Z" and gate["flags"][0]["status"] == "unreviewed"
    assert len(receiver.received) == 1
    message = receiver.received[0]
    assert message["event"] == "flags" and message["flags"][0]["kind"] == "new"
    assert "1 new or changed flag(s) in job nightly" in message["text"] and "class square" in message["text"]

    # the next night: the same finding, unchanged: no message; then a changed one: a message
    clock.now = datetime(2026, 1, 2, 2, 0, 5, tzinfo=timezone.utc)
    plan.steps.append(("20260102T020005Z", 0, "1:101", 0.0))
    scheduler.step()
    scheduler.wait(timeout=30)
    scheduler.step()
    assert len(receiver.received) == 1
    served.client.post(f"/api/jobs/{job['id']}/runs", headers=served.auth)
    plan.steps.append(("20260102T030000Z", 0, "0:160", 0.0))
    scheduler.step()
    scheduler.wait(timeout=30)
    scheduler.step()
    assert len(receiver.received) == 2 and receiver.received[1]["flags"][0]["kind"] == "changed"
    assert "size changed from 100 to 160" in receiver.received[1]["text"]


def test_one_run_per_job_at_a_time(tmp_path: Path, receiver: Receiver) -> None:
    reports, jobs = _setup(tmp_path, receiver.url)
    clock = Clock(datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc))
    plan = Plan(tmp_path, reports)
    served = _served(reports, jobs, clock, plan)
    scheduler = served.app.state.service.scheduler
    job_id = served.job_id("nightly")
    first = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth)
    again = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth)
    assert first.status_code == 202 and again.json()["id"] == first.json()["id"]  # one queued at most
    plan.steps += [("20260101T010000Z", 0, "0:50", 1.5), ("20260101T010100Z", 0, "0:50", 0.0)]
    scheduler.step()
    second = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth).json()
    scheduler.step()
    statuses = {task["id"]: task["status"] for task in served.client.get(f"/api/jobs/{job_id}/tasks").json()}
    assert statuses == {first.json()["id"]: "running", second["id"]: "queued"}
    scheduler.wait(timeout=30)
    scheduler.step()  # the first ends, the second starts
    statuses = {task["id"]: task["status"] for task in served.client.get(f"/api/jobs/{job_id}/tasks").json()}
    assert statuses == {first.json()["id"]: "done", second["id"]: "running"}
    scheduler.wait(timeout=30)
    scheduler.step()


def test_a_failed_run_is_failed_and_notified(tmp_path: Path, receiver: Receiver) -> None:
    reports, jobs = _setup(tmp_path, receiver.url)
    plan = Plan(tmp_path, reports)
    served = _served(reports, jobs, Clock(datetime(2026, 1, 1, tzinfo=timezone.utc)), plan)
    scheduler = served.app.state.service.scheduler
    job_id = served.job_id("nightly")
    task_id = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth).json()["id"]
    plan.steps.append(("20260101T000000Z", 2, "0:1", 0.0))
    scheduler.step()
    scheduler.wait(timeout=30)
    scheduler.step()
    task = served.client.get(f"/api/tasks/{task_id}").json()
    assert (task["status"], task["exit_code"]) == ("failed", 2) and "could not be read" in task["log_tail"]
    assert receiver.received[0]["event"] == "failed" and "failed" in receiver.received[0]["text"]
    assert "could not be read" in receiver.received[0]["text"]
    page = served.client.get(f"/jobs/{job_id}").text
    assert "failed" in page and "could not be read" in page


def test_a_run_left_running_by_a_stopped_service_is_failed_and_requeued(tmp_path: Path, receiver: Receiver) -> None:
    reports, jobs = _setup(tmp_path, receiver.url)
    plan = Plan(tmp_path, reports)
    clock = Clock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    served = _served(reports, jobs, clock, plan)
    scheduler = served.app.state.service.scheduler
    job_id = served.job_id("nightly")
    task_id = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth).json()["id"]
    plan.steps.append(("20260101T000000Z", 0, "0:10", 60.0))
    scheduler.step()
    process = scheduler.processes[task_id]
    try:
        # the service stops without finishing the task (its process table is gone); a new one starts
        restarted = open_service(ServiceConfig(reports=reports, jobs_dir=jobs, scheduler_interval=0, clock=clock, command=plan.command))
        with restarted.sessions() as session:  # opening alone (as a housekeeping command does) touches no run
            from spray.service.models import Task

            assert session.get(Task, task_id).status == "running"
        assert restarted.take_scheduling()  # the lease is free: the first to take it recovers
        with restarted.sessions() as session:
            from spray.service.models import Task

            tasks = {task.id: task for task in session.query(Task).all()}
        assert tasks[task_id].status == "failed" and "interrupted" in tasks[task_id].message
        requeued = [task for task in tasks.values() if task.id != task_id]
        assert [(task.status, task.reason) for task in requeued] == [("queued", f"requeued after task {task_id} was interrupted")]
        restarted.engine.dispose()
    finally:
        process.kill()
        process.wait()
    with sqlite3.connect(reports / "spray.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_webhook_that_is_down_is_logged_and_never_crashes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = Receiver()
    url = closed.url
    closed.close()  # nothing listens there any more
    reports, jobs = _setup(tmp_path, url)
    plan = Plan(tmp_path, reports)
    served = _served(reports, jobs, Clock(datetime(2026, 1, 1, tzinfo=timezone.utc)), plan)
    scheduler = served.app.state.service.scheduler
    job_id = served.job_id("nightly")
    served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth)
    plan.steps.append(("20260101T000000Z", 0, "0:10", 0.0))
    with caplog.at_level(logging.WARNING, logger="spray.service.notify"):
        scheduler.step()
        scheduler.wait(timeout=30)
        scheduler.step()
    assert served.client.get(f"/api/jobs/{job_id}/tasks").json()[0]["status"] == "done"
    assert any("webhook" in record.getMessage() and "failed" in record.getMessage() for record in caplog.records)
    assert notify.post(url, {"text": "x"}, timeout=0.5) is False
    assert notify.post("file:///etc/passwd", {"text": "x"}) is False


def test_a_slow_webhook_times_out(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        start = datetime.now()
        assert notify.post(f"http://127.0.0.1:{listener.getsockname()[1]}/", {"text": "x"}, timeout=0.5) is False
        assert datetime.now() - start < timedelta(seconds=5)
    finally:
        listener.close()


def test_a_job_without_a_spec_cannot_run(served: Served) -> None:
    scheduler = served.app.state.service.scheduler
    with served.app.state.service.sessions() as session:
        from spray.service.models import Job

        job = session.query(Job).one()
        task = scheduler.enqueue(session, job, "test")
    scheduler.step()
    detail = served.client.get(f"/api/tasks/{task.id}").json()
    assert detail["status"] == "failed" and "no job spec" in detail["message"]


def test_the_loop_rescans_the_folder_reading_only_changed_summaries(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import flag, iso, summary, write_run
    import spray.service.scan as scanning

    scheduler = served.app.state.service.scheduler
    clock = Clock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    scheduler.clock = clock
    scheduler.step()  # first scan fills the cache
    reads: list[Path] = []
    original = scanning._read
    monkeypatch.setattr(scanning, "_read", lambda path: (reads.append(path), original(path))[1])
    write_run(served.reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(0, 100))]))
    clock.now += timedelta(seconds=10)
    scheduler.step()
    assert reads == [] and len(served.client.get(f"/api/jobs/{served.job_id()}/runs").json()) == 1  # not yet
    clock.now += timedelta(seconds=30)
    scheduler.step()
    assert [path.parent.name for path in reads] == ["20260102T020000Z"]  # the unchanged one is not read
    assert len(served.client.get(f"/api/jobs/{served.job_id()}/runs").json()) == 2


def test_schedules_follow_the_spec_and_the_api(tmp_path: Path) -> None:
    reports, jobs = _setup(tmp_path, "http://127.0.0.1:9/hook", cron="0 3 * * 1")
    clock = Clock(datetime(2026, 1, 1, tzinfo=timezone.utc))  # a Thursday
    plan = Plan(tmp_path, reports)
    served = _served(reports, jobs, clock, plan)
    job = served.client.get("/api/jobs").json()[0]
    assert job["schedule"] == {"cron": "0 3 * * 1", "source": "spec", "next_due": "2026-01-05T03:00:00+00:00"}
    served.app.state.service.engine.dispose()
    (jobs / "nightly.toml").write_text('[job]\nname = "nightly"\noutput = "../reports"\ndated = true\n', encoding="utf-8")
    again = _served(reports, jobs, clock, plan)
    assert again.client.get("/api/jobs").json()[0]["schedule"] is None
    put = again.client.put(f"/api/jobs/{job['id']}/schedule", json={"cron": "30 1 * * *"}, headers=again.auth)
    assert put.json()["schedule"]["source"] == "api"
    again.app.state.service.engine.dispose()
    kept = _served(reports, jobs, clock, plan)  # a spec without a schedule leaves the API's alone
    assert kept.client.get("/api/jobs").json()[0]["schedule"]["cron"] == "30 1 * * *"
    kept.app.state.service.engine.dispose()


def test_one_process_at_a_time_holds_the_scheduler_lease(tmp_path: Path) -> None:
    from spray.service.app import SchedulerLease

    first, second = SchedulerLease(tmp_path), SchedulerLease(tmp_path)
    assert first.take() and first.take()  # taking it again is a no-op
    assert not second.take() and not second.held
    first.release()
    assert second.take() and second.held
    second.release()
