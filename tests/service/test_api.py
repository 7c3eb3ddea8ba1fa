"""The JSON API: listing, reviews (token required), the gate honouring them, runs, schedules."""

from __future__ import annotations

from spray.service.waivers import parse_entry
from spray.service.gate import evaluate

from .conftest import Served, flag, iso, summary, write_run


def test_lists_jobs_runs_and_flags(served: Served) -> None:
    jobs = served.client.get("/api/jobs").json()
    assert [job["key"] for job in jobs] == ["demo"]
    assert jobs[0]["gate"]["verdict"] == "flagged" and jobs[0]["gate"]["exit_code"] == 1
    run = served.latest_run()
    assert run["path"] == "demo/runs/20260101T020000Z" and run["kind"] == "dated" and run["n_flags"] == 1
    flags = served.client.get(f"/api/runs/{run['id']}/flags").json()
    assert flags[0]["class_name"] == "square" and flags[0]["gate"] == "unreviewed" and len(flags[0]["member_ids"]) == 100
    assert served.client.get("/api/runs/999").status_code == 404


def test_every_write_needs_a_valid_token(served: Served) -> None:
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    body = {"status": "needs_look", "reviewer": "Ada"}
    job_id = served.job_id()
    writes = [
        ("post", f"/api/flags/{flag_id}/reviews", body),
        ("post", f"/api/jobs/{job_id}/runs", None),
        ("put", f"/api/jobs/{job_id}/schedule", {"cron": "0 2 * * *"}),
        ("post", "/api/rebuild", None),
    ]
    for method, url, payload in writes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.token}"}):
            response = served.client.request(method, url, json=payload, headers=headers)
            assert response.status_code == 401, (method, url, headers)
    # a bad body without a token is still refused for the token, not read
    assert served.client.post(f"/api/flags/{flag_id}/reviews", json={"nonsense": 1}).status_code == 401
    assert served.client.get(f"/api/flags/{flag_id}/reviews").json() == []


def test_a_review_changes_the_gate_and_keeps_its_history(served: Served) -> None:
    job_id = served.job_id()
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    url = f"/api/flags/{flag_id}/reviews"
    refused = served.client.post(url, json={"status": "legitimate", "reviewer": "Ada"}, headers=served.auth)
    assert refused.status_code == 422 and "reason" in refused.json()["detail"]
    assert served.client.post(url, json={"status": "fixed", "reviewer": "Ada"}, headers=served.auth).status_code == 422
    assert served.client.post(url, json={"status": "maybe", "reviewer": "Ada"}, headers=served.auth).status_code == 422

    created = served.client.post(url, json={"status": "legitimate", "reviewer": "Ada", "reason": "side views of cars"}, headers=served.auth)
    assert created.status_code == 201 and created.json()["token_name"] == "ci"
    gate = served.client.get(f"/api/jobs/{job_id}/gate").json()
    assert (gate["verdict"], gate["exit_code"]) == ("waived", 0)
    assert gate["flags"][0]["review"]["reviewer"] == "Ada" and gate["flags"][0]["review"]["reason"] == "side views of cars"

    served.client.post(url, json={"status": "needs_look", "reviewer": "Bo", "comment": "revoked"}, headers=served.auth)
    gate = served.client.get(f"/api/jobs/{job_id}/gate").json()
    assert (gate["verdict"], gate["exit_code"]) == ("flagged", 1) and gate["flags"][0]["status"] == "needs_look"
    history = served.client.get(url).json()
    assert [item["status"] for item in history] == ["needs_look", "legitimate"]


def test_a_review_carries_over_to_a_later_run_until_the_flag_changes(served: Served) -> None:
    job_id = served.job_id()
    first = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{first['id']}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "legitimate", "reviewer": "Ada", "reason": "ok"}, headers=served.auth)

    write_run(served.reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(5, 110), cluster_id=3)]))
    served.rebuild()
    gate = served.client.get(f"/api/jobs/{job_id}/gate").json()
    assert gate["run"] == "demo/runs/20260102T020000Z"
    assert gate["verdict"] == "waived" and gate["flags"][0]["match"]["by"] == "members"

    write_run(served.reports, "demo", "20260103T020000Z", summary("demo", iso("20260103T020000Z"), [flag(range(0, 140))]))
    served.rebuild()
    gate = served.client.get(f"/api/jobs/{job_id}/gate").json()
    assert gate["exit_code"] == 1 and gate["flags"][0]["status"] == "waiver_lapsed"
    # an earlier run can still be asked for
    older = served.client.get(f"/api/jobs/{job_id}/gate", params={"run_id": first["id"]}).json()
    assert older["verdict"] == "waived"


def test_the_waiver_file_of_the_api_gives_the_same_gate(served: Served) -> None:
    job_id = served.job_id()
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "legitimate", "reviewer": "Ada", "reason": "ok"}, headers=served.auth)
    waivers = served.client.get(f"/api/jobs/{job_id}/waivers").json()
    reviews = [parse_entry(entry, "api") for entry in waivers["review"]]
    detail = served.client.get(f"/api/runs/{run['id']}").json()
    import json

    on_disk = json.loads((served.reports / run["path"] / "summary.json").read_text())
    assert evaluate(on_disk, reviews).as_json() == detail["gate"]


def test_runs_and_schedules_through_the_api(served: Served) -> None:
    job_id = served.job_id()
    refused = served.client.post(f"/api/jobs/{job_id}/runs", headers=served.auth)
    assert refused.status_code == 409 and "job spec" in refused.json()["detail"]
    bad = served.client.put(f"/api/jobs/{job_id}/schedule", json={"cron": "every night"}, headers=served.auth)
    assert bad.status_code == 422
    bad_hook = served.client.put(f"/api/jobs/{job_id}/schedule", json={"cron": "", "webhook": "file:///etc/passwd"}, headers=served.auth)
    assert bad_hook.status_code == 422
    unrunnable = served.client.put(f"/api/jobs/{job_id}/schedule", json={"cron": "0 2 * * *"}, headers=served.auth)
    assert unrunnable.status_code == 409  # no spec: nothing to run on schedule
    from spray.service.models import Job

    with served.app.state.service.sessions() as session:
        session.get(Job, job_id).spec_path = str(served.reports / "demo.toml")
        session.commit()
    done = served.client.put(f"/api/jobs/{job_id}/schedule", json={"cron": "0 2 * * *", "webhook": "http://127.0.0.1:9/hook"}, headers=served.auth)
    assert done.status_code == 200
    job = served.client.get(f"/api/jobs/{job_id}").json()
    assert job["schedule"]["cron"] == "0 2 * * *" and job["schedule"]["source"] == "api" and job["webhook"] is True
    assert served.client.get(f"/api/jobs/{job_id}/tasks").json() == []


def test_the_openapi_schema_documents_every_endpoint(served: Served) -> None:
    schema = served.client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/flags",
        "/api/flags/{flag_id}", "/api/flags/{flag_id}/reviews", "/api/jobs/{job_id}/gate", "/api/jobs/{job_id}/tasks",
        "/api/tasks/{task_id}", "/api/jobs/{job_id}/schedule", "/api/jobs/{job_id}/waivers", "/api/rebuild",
    ):
        assert path in paths, path
    assert "post" in paths["/api/flags/{flag_id}/reviews"] and "post" in paths["/api/jobs/{job_id}/runs"]
    assert "/reports/{path}" not in paths and "/login" not in paths
