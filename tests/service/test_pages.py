"""The HTML pages: what they show, escaping, login, CSRF, and paths that stay in the folder."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from .conftest import Served, flag, iso, serve, summary, write_run

XSS = "<script>alert(1)</script>"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def login(served: Served) -> str:
    """Log the client in through the form; returns the session's CSRF token."""
    page = served.client.get("/login")
    response = served.client.post("/login", data={"csrf": csrf_of(page.text), "token": served.token}, follow_redirects=False)
    assert response.status_code == 303
    return csrf_of(served.client.get("/").text)


def test_pages_list_jobs_runs_and_link_the_static_report(served: Served) -> None:
    home = served.client.get("/")
    assert home.status_code == 200 and "demo/runs/20260101T020000Z" in home.text and "flagged" in home.text
    assert "script-src" not in home.headers["content-security-policy"] and "default-src 'none'" in home.headers["content-security-policy"]
    run_id = served.latest_run()["id"]
    page = served.client.get(f"/runs/{run_id}")
    assert "unreviewed" in page.text and "/reports/demo/runs/20260101T020000Z/index.html" in page.text
    report = served.client.get("/reports/demo/runs/20260101T020000Z/index.html")
    assert report.status_code == 200 and "static report" in report.text
    assert "content-security-policy" not in report.headers  # the report keeps its own policy
    assert served.client.get("/reports/demo/runs/20260101T020000Z/").text == report.text
    job_page = served.client.get(f"/jobs/{served.job_id()}")
    assert job_page.status_code == 200 and "no job spec known" in job_page.text


def test_the_trend_page_plots_findings_across_runs(served: Served) -> None:
    write_run(served.reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(3, 100), score=0.8), flag(range(500, 540), class_index=0, class_name="circle")]))
    served.rebuild()
    page = served.client.get(f"/jobs/{served.job_id()}/trend")
    assert page.status_code == 200
    assert "<svg" in page.text and "<?xml" not in page.text and "<!--" not in page.text
    rows = re.findall(r"<tr><td>(F\d)</td><td>([^<]*)</td>", page.text)
    assert rows == [("F1", "square"), ("F2", "circle")]  # the first finding followed into the second run
    assert "1: 0.900, 2: 0.800" in page.text


def test_dataset_strings_and_comments_are_escaped_everywhere(reports) -> None:
    write_run(reports, "xss", "20260101T020000Z", summary("xss", iso("20260101T020000Z"), [flag(range(0, 10), class_name=XSS, space=XSS)], class_names=["a", XSS]))
    served = serve(reports)
    login(served)
    run_id = served.latest_run("xss")["id"]
    flag_id = served.client.get(f"/api/runs/{run_id}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "needs_look", "reviewer": XSS, "comment": XSS}, headers=served.auth)
    assert XSS not in served.client.get("/").text
    for url in (f"/runs/{run_id}", f"/jobs/{served.job_id('xss')}", f"/jobs/{served.job_id('xss')}/trend"):
        text = served.client.get(url).text
        assert XSS not in text, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, url
    run_page = served.client.get(f"/runs/{run_id}").text
    assert run_page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # class, space, reviewer, comment
    served.app.state.service.engine.dispose()


def test_forms_need_a_login_and_the_session_csrf_token(served: Served) -> None:
    run_id = served.latest_run()["id"]
    flag_id = served.client.get(f"/api/runs/{run_id}/flags").json()[0]["id"]
    form = {"status": "legitimate", "reviewer": "Ada", "reason": "fine"}
    anonymous_csrf = csrf_of(served.client.get("/login").text)
    # logged out: a valid CSRF token alone does not allow a write
    assert served.client.post(f"/flags/{flag_id}/review", data={**form, "csrf": anonymous_csrf}).status_code == 401
    csrf = login(served)
    assert served.client.post(f"/flags/{flag_id}/review", data=form).status_code == 403
    assert served.client.post(f"/flags/{flag_id}/review", data={**form, "csrf": "x" * 43}).status_code == 403
    other = TestClient(served.app)  # another browser: its own session, its own token
    other_csrf = csrf_of(other.get("/login").text)
    assert other_csrf != csrf
    assert served.client.post(f"/flags/{flag_id}/review", data={**form, "csrf": other_csrf}).status_code == 403
    assert served.client.get(f"/api/flags/{flag_id}/reviews").json() == []
    done = served.client.post(f"/flags/{flag_id}/review", data={**form, "csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303
    reviews = served.client.get(f"/api/flags/{flag_id}/reviews").json()
    assert [(item["status"], item["reviewer"], item["token_name"]) for item in reviews] == [("legitimate", "Ada", "ci")]
    assert "waived" in served.client.get(f"/runs/{run_id}").text
    # a login with a wrong token is refused
    fresh = TestClient(served.app)
    bad = fresh.post("/login", data={"csrf": csrf_of(fresh.get("/login").text), "token": "spray_wrong"})
    assert bad.status_code == 401 and "log out" not in bad.text


@pytest.mark.parametrize(
    "path",
    [
        "/reports/../spray.db",
        "/reports/%2e%2e/%2e%2e/etc/passwd",
        "/reports/..%2f..%2fetc%2fpasswd",
        "/reports/demo/..%2f..%2f..%2fetc%2fpasswd",
        "/reports/%2e%2e%2fsecret.txt",
        "/reports/demo/runs/../../../secret.txt",
        "/reports/spray.db",
        "/reports/spray.db-wal",
        "/reports/.spray/logs/task-1.log",
        "/reports/demo/%00index.html",
        "/reports//etc/passwd",
        "/reports/%2Fetc%2Fpasswd",
    ],
)
def test_no_request_path_reaches_outside_the_reports_folder(served: Served, path: str) -> None:
    (served.reports.parent / "secret.txt").write_text("secret outside", encoding="utf-8")
    (served.reports / ".spray" / "logs").mkdir(parents=True, exist_ok=True)
    (served.reports / ".spray" / "logs" / "task-1.log").write_text("log", encoding="utf-8")
    response = served.client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert "secret outside" not in response.text and "root:" not in response.text and "SQLite" not in response.text


def test_a_symlink_out_of_the_folder_is_not_followed(served: Served) -> None:
    (served.reports.parent / "secret.txt").write_text("secret outside", encoding="utf-8")
    (served.reports / "demo" / "link.txt").symlink_to(served.reports.parent / "secret.txt")
    assert served.client.get("/reports/demo/link.txt").status_code == 404


@pytest.mark.parametrize("relative", ["../secret.txt", "demo/../../secret.txt", "/etc/passwd", "demo/runs/../../../secret.txt", "spray.db", ".spray/x"])
def test_the_path_check_itself_refuses_what_leaves_the_folder(served: Served, relative: str) -> None:
    from fastapi import HTTPException

    from spray.service.security import inside_reports

    (served.reports.parent / "secret.txt").write_text("secret outside", encoding="utf-8")
    (served.reports / ".spray").mkdir(exist_ok=True)
    (served.reports / ".spray" / "x").write_text("x", encoding="utf-8")
    with pytest.raises(HTTPException) as refused:
        inside_reports(served.reports, relative)
    assert refused.value.status_code == 404
    assert inside_reports(served.reports, "demo/runs/20260101T020000Z").name == "index.html"


def test_a_database_of_another_name_in_the_folder_is_not_served(reports) -> None:
    served = serve(reports, database_url=f"sqlite:///{reports / 'team.sqlite'}")
    assert (reports / "team.sqlite").is_file()
    for name in ("team.sqlite", "team.sqlite-wal", "team.sqlite-shm"):
        assert served.client.get(f"/reports/{name}").status_code == 404, name
    served.app.state.service.engine.dispose()
