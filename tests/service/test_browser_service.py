"""The service in a real browser (headless Chromium through Playwright) against a real
uvicorn server: log in, waive a flag with the review form, see a later run's flag matched
and waived, revoke the waiver; no script from a class name ever runs. End to end on the
real demo audit: the waiver given in the browser carries over to a run started through the
API, and ``spray check`` with the exported waiver file passes, then fails once it is revoked.

Skipped, with the reason, where Playwright or Debian's Chromium is missing (as the report's
browser tests).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from spray.audit import run_audit
from spray.cli import main as spray_main
from spray.jobs import load_job
from spray.service.app import ServiceConfig, create_app
from spray.service.tokens import create_token

from .conftest import flag, iso, summary, write_run

CHROMIUM = os.environ.get("SPRAY_CHROMIUM", "/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"Chromium not found at {CHROMIUM} (run .ci/system-setup)", allow_module_level=True)

HOSTILE = "<img src=x onerror=alert(1)>"


class Server:
    """uvicorn serving the app in a thread on a free loopback port."""

    def __init__(self, app: object) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def test_review_in_the_browser_waives_the_flag_of_later_runs_until_revoked(tmp_path: Path, browser: object) -> None:
    reports = tmp_path / "reports"
    write_run(reports, "demo", "20260101T020000Z", summary("demo", iso("20260101T020000Z"), [flag(range(0, 100), class_name=HOSTILE)], class_names=["a", HOSTILE]))
    app = create_app(ServiceConfig(reports=reports, scheduler_interval=0))
    with app.state.service.sessions() as session:
        token = create_token(session, "alice")
    server = Server(app)
    try:
        page = browser.new_page()  # type: ignore[attr-defined]
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"{server.url}/login")
        page.fill("input[name=token]", token)
        page.click("button:has-text('log in')")
        page.wait_for_url(f"{server.url}/")
        assert "signed in as alice" in page.inner_text("header")
        page.click("text=demo/runs/20260101T020000Z")
        assert HOSTILE in page.inner_text("h2")  # shown as text
        page.select_option("select[name=status]", "legitimate")
        page.fill("input[name=reason]", "the tag is the product's logo, legitimately part of the class")
        page.click("button:has-text('record review')")
        page.wait_for_load_state()
        card = page.inner_text("section.card")
        assert "gate: waived" in card and "legitimate" in card and "alice" in card

        # a later run finds the same finding again (slightly different members): matched and waived
        write_run(reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(3, 104), cluster_id=5, class_name=HOSTILE)], class_names=["a", HOSTILE]))
        response = page.request.post(f"{server.url}/api/rebuild", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        gate = page.request.get(f"{server.url}/api/jobs/1/gate").json()
        assert gate["run"] == "demo/runs/20260102T020000Z" and gate["verdict"] == "waived" and gate["exit_code"] == 0
        page.goto(f"{server.url}/jobs/1")
        assert "waived" in page.inner_text("main") and "carried" not in page.inner_text("main")

        # revoke: a newer review of the new run's flag
        page.click("text=demo/runs/20260102T020000Z")
        assert "carried over from demo/runs/20260101T020000Z" in page.inner_text("section.card")
        page.select_option("select[name=status]", "needs_look")
        page.fill("textarea[name=comment]", "revoked: check the new members")
        page.click("button:has-text('record review')")
        page.wait_for_load_state()
        gate = page.request.get(f"{server.url}/api/jobs/1/gate").json()
        assert (gate["verdict"], gate["exit_code"], gate["flags"][0]["status"]) == ("flagged", 1, "needs_look")
        assert dialogs == []
    finally:
        server.stop()
        app.state.service.engine.dispose()


#: Training images per class of the end-to-end demo: the smallest size at which the planted
#: tag of the "square" class was the demo's one flag for every seed tried (80: seeds 0-4;
#: 60 missed it for seed 1).
DEMO_PER_CLASS = 80
#: The demo as a job spec the service may run: dated runs inside the served folder, the
#: cheap spectral picture instead of UMAP, and the waiver file ``spray check`` reads.
DEMO_SPEC = f"""
[job]
name = "demo"
output = "../reports"
dated = true

[data]
source = "demo"
n_per_class = {DEMO_PER_CLASS}
artifact_class = 1
artifact_fraction = 0.3

[analysis]
embedding = "spectral"

[check]
waivers = "spray-waivers.toml"
"""


def spray_cli(*arguments: str) -> tuple[int, str]:
    """``spray ARGUMENTS`` (the console script's entry point): exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = spray_main(list(arguments))
    return code, printed.getvalue()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition()`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_demo_waived_in_the_browser_carries_over_to_a_run_started_through_the_api_and_to_spray_check(tmp_path: Path, browser: object) -> None:
    jobs, reports = tmp_path / "jobs", tmp_path / "reports"
    jobs.mkdir()
    reports.mkdir()
    job_file = jobs / "demo.toml"
    job_file.write_text(DEMO_SPEC, encoding="utf-8")
    waivers = jobs / "spray-waivers.toml"
    first = run_audit(load_job(job_file), progress=False)  # trains the demo model once; later runs reuse it
    assert [flag["class_name"] for flag in first.summary["flags"]] == ["square"], first.summary["flags"]

    app = create_app(ServiceConfig(reports=reports, jobs_dir=jobs, scheduler_interval=0.5))
    with app.state.service.sessions() as session:
        token = create_token(session, "alice")
    server = Server(app)
    try:
        api = {"Authorization": f"Bearer {token}"}
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(f"{server.url}/login")
        page.fill("input[name=token]", token)
        page.click("button:has-text('log in')")
        page.wait_for_url(f"{server.url}/")
        job = page.request.get(f"{server.url}/api/jobs").json()[0]
        assert (job["key"], job["runnable"], job["gate"]["verdict"]) == ("demo", True, "flagged")
        first_run = page.request.get(f"{server.url}/api/jobs/{job['id']}/runs").json()[0]

        # the demo's flag reviewed as a legitimate strategy in the browser
        page.click(f"text={first_run['path']}")
        assert "class square" in page.inner_text("h2")
        page.select_option("select[name=status]", "legitimate")
        page.fill("input[name=reason]", "the corner tag is the product's logo, legitimately part of the class")
        page.click("button:has-text('record review')")
        page.wait_for_load_state()
        assert "gate: waived" in page.inner_text("section.card")

        # the audit run again through the API, as a subprocess of the service
        response = page.request.post(f"{server.url}/api/jobs/{job['id']}/runs", headers=api)
        assert response.status == 202, response.text()
        task = response.json()
        finished = wait_for(
            lambda: (state := page.request.get(f"{server.url}/api/tasks/{task['id']}").json())["status"] in ("done", "failed") and state,
            120, "the audit started through the API",
        )
        assert finished["status"] == "done", finished["log_tail"]
        runs = wait_for(lambda: len(found := page.request.get(f"{server.url}/api/jobs/{job['id']}/runs").json()) == 2 and found, 30, "the new run")
        second_run = runs[0]
        assert second_run["path"] != first_run["path"] and second_run["kind"] == "dated"

        gate = page.request.get(f"{server.url}/api/jobs/{job['id']}/gate").json()
        assert (gate["run"], gate["verdict"], gate["exit_code"]) == (second_run["path"], "waived", 0)
        assert gate["flags"][0]["status"] == "waived" and gate["flags"][0]["match"]["by"] == "members"
        assert gate["flags"][0]["review"]["run"] == first_run["path"]
        page.goto(f"{server.url}/jobs/{job['id']}")
        assert f"waived (exit 0) for run {second_run['path']}" in page.inner_text("main")
        page.click(f"text={second_run['path']}")
        card = page.inner_text("section.card")
        assert "gate: waived" in card and f"carried over from {first_run['path']}" in card

        # the waiver file: spray check (a third audit) passes with it
        code, printed = spray_cli("serve", "--reports", str(reports), "--jobs", str(jobs), "--export-waivers", str(waivers), "--job", "demo")
        assert code == 0 and waivers.is_file(), printed
        code, printed = spray_cli("--no-progress", "check", str(job_file))
        assert code == 0, printed
        assert "gate: waived (exit 0)" in printed and "class 'square'" in printed and "waived: legitimate by alice" in printed

        # revoked in the browser (a newer review of the new run's flag): spray check fails
        page.select_option("select[name=status]", "needs_look")
        page.fill("textarea[name=comment]", "revoked: the tag must go")
        page.click("button:has-text('record review')")
        page.wait_for_load_state()
        assert "gate: needs_look" in page.inner_text("section.card")
        gate = page.request.get(f"{server.url}/api/jobs/{job['id']}/gate?run_id={second_run['id']}").json()
        assert (gate["verdict"], gate["exit_code"], gate["flags"][0]["status"]) == ("flagged", 1, "needs_look")
        code, printed = spray_cli("serve", "--reports", str(reports), "--jobs", str(jobs), "--export-waivers", str(waivers), "--job", "demo")
        assert code == 0, printed
        code, printed = spray_cli("--no-progress", "check", str(job_file))
        assert code == 1, printed
        assert "gate: flagged (exit 1)" in printed and "needs a look: needs_look by alice" in printed
    finally:
        server.stop()
        app.state.service.engine.dispose()
