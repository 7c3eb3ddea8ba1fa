"""A fault: the server and its running audit killed with SIGKILL, then the service started
again (as two worker processes). The interrupted run ends failed and queued again once, never
"running"; a housekeeping command in between leaves it alone; the database passes SQLite's
integrity check; no review is lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from spray.cli import main

from .conftest import flag, iso, summary, write_run


def _call(url: str, method: str = "GET", token: str = "", body: dict[str, Any] | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers), timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _start(reports: Path, jobs: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """``spray serve`` as a real process, in its own process group (killed as a whole)."""
    return subprocess.Popen(
        [sys.executable, "-m", "spray.cli", "serve", "--reports", str(reports), "--jobs", str(jobs), "--port", str(port), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def test_sigkill_during_a_scheduled_run(tmp_path: Path, capsys: Any) -> None:
    reports, jobs = tmp_path / "reports", tmp_path / "jobs"
    write_run(reports, "nightly", "20260101T020000Z", summary("nightly", iso("20260101T020000Z"), [flag(range(0, 100))]))
    jobs.mkdir()
    # a real audit of the demo: it runs far longer than the test waits
    (jobs / "nightly.toml").write_text('[job]\nname = "nightly"\noutput = "../reports"\ndated = true\n\n[data]\nn_per_class = 40\n', encoding="utf-8")
    assert main(["serve", "--reports", str(reports), "--jobs", str(jobs), "--create-token", "ci"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = _start(reports, jobs, port)
    try:
        _wait_for(lambda: _call(f"{base}/api/jobs"), 40, "the server")
        run = _call(f"{base}/api/jobs/1/runs")[0]
        flag_id = _call(f"{base}/api/runs/{run['id']}/flags")[0]["id"]
        _call(f"{base}/api/flags/{flag_id}/reviews", "POST", token, {"status": "legitimate", "reviewer": "Ada", "reason": "ok"})
        task = _call(f"{base}/api/jobs/1/runs", "POST", token)
        _wait_for(lambda: _call(f"{base}/api/tasks/{task['id']}")["status"] == "running", 30, "the run to start")
        time.sleep(1.0)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and the audit it started, as in a crash
        server.wait(timeout=20)

    database = reports / "spray.db"
    with sqlite3.connect(database) as raw:
        assert raw.execute("SELECT status FROM tasks").fetchall() == [("running",)]  # as the crash left it
    # a housekeeping command never schedules, so it cannot tell a crash from a live run: it leaves the task
    assert main(["serve", "--reports", str(reports), "--jobs", str(jobs), "--rebuild"]) == 0
    with sqlite3.connect(database) as raw:
        assert raw.execute("SELECT status FROM tasks").fetchall() == [("running",)]
    # the service starts again, as two workers: the one that takes the scheduler lease recovers the run, once
    server = _start(reports, jobs, port, "--workers", "2")
    try:
        _wait_for(lambda: _call(f"{base}/api/tasks/{task['id']}")["status"] == "failed", 40, "the interrupted run to be failed")
        time.sleep(3.0)  # both workers' schedulers have had their turn
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
    with sqlite3.connect(database) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tasks = raw.execute("SELECT id, status, reason, message FROM tasks ORDER BY id").fetchall()
        reviews = raw.execute("SELECT status, reviewer, reason FROM reviews").fetchall()
    assert [(status, "interrupted" in message) for _, status, _, message in tasks[:1]] == [("failed", True)]
    assert [(reason, status in ("queued", "running")) for _, status, reason, _ in tasks[1:]] == [(f"requeued after task {tasks[0][0]} was interrupted", True)]
    assert reviews == [("legitimate", "Ada", "ok")]
