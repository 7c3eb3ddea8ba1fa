"""``spray serve``: tokens made once and stored hashed, rebuilds, and a real server (uvicorn)."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spray.cli import main

from .conftest import flag, iso, summary, write_run


def test_create_token_prints_it_once_and_stores_only_its_hash(reports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--reports", str(reports), "--create-token", "ci-bot"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("spray_") and len(secret) > 40
    with sqlite3.connect(reports / "spray.db") as raw:
        rows = raw.execute("SELECT name, digest FROM tokens").fetchall()
    assert [name for name, _ in rows] == ["ci-bot"] and rows[0][1] != secret and len(rows[0][1]) == 64
    assert secret.encode() not in (reports / "spray.db").read_bytes()
    assert main(["serve", "--reports", str(reports), "--create-token", "ci-bot"]) == 2  # names are unique
    assert "exists already" in capsys.readouterr().err
    from fastapi.testclient import TestClient

    from spray.service.app import ServiceConfig, create_app

    app = create_app(ServiceConfig(reports=reports, scheduler_interval=0))
    client = TestClient(app)
    assert client.post("/api/rebuild", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert main(["serve", "--reports", str(reports), "--revoke-token", "ci-bot"]) == 0
    assert client.post("/api/rebuild", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    app.state.service.engine.dispose()


def test_rebuild_and_a_missing_folder(reports: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--reports", str(reports), "--jobs", str(reports), "--rebuild"]) == 0
    write_run(reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(0, 100))]))
    assert main(["serve", "--reports", str(reports), "--jobs", str(reports), "--rebuild"]) == 0
    assert "rebuilt: 2 run(s) of 1 job(s)" in capsys.readouterr().out
    assert main(["serve", "--reports", str(tmp_path / "absent"), "--rebuild"]) == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_spray_serve_runs_a_real_server_on_the_loopback(reports: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "spray.cli", "serve", "--reports", str(reports), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=2) as response:
                    jobs = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.3)
        assert jobs[0]["key"] == "demo"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert "demo/runs/20260101T020000Z" in response.read().decode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/rebuild", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}/" in output


def test_worker_processes_get_the_whole_configuration(tmp_path: Path) -> None:
    from spray.service.app import ServiceConfig

    config = ServiceConfig(
        reports=tmp_path / "reports", database_url="postgresql+psycopg://spray@db/spray", jobs_dir=tmp_path / "jobs",
        scheduler_interval=5.0, threads=3, secure_cookies=True, base_url="https://spray.example.org",
    )
    again = ServiceConfig.from_environment(config.to_environment())
    assert (again.reports, again.database_url, again.jobs_dir, again.scheduler_interval, again.threads, again.secure_cookies, again.base_url) == (
        config.reports, config.database_url, config.jobs_dir, 5.0, 3, True, "https://spray.example.org"
    )


def test_workers_and_threads_must_be_at_least_one(reports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--workers", "--threads"):
        for value in ("0", "-2", "two"):
            with pytest.raises(SystemExit) as stopped:
                main(["serve", "--reports", str(reports), option, value])
            assert stopped.value.code == 2
            assert f"expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err
