"""The waiver file: written by the service, read by ``spray check``, and the same gate either way."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from spray.cli import main
from spray.jobs import JobSpecError, parse_job
from spray.service.check import GATE_FILE, gate_with_waivers
from spray.service.gate import LEGITIMATE, NEEDS_LOOK, Review, evaluate
from spray.service.matching import Fingerprint
from spray.service.waivers import WaiverFileError, read_waivers, write_waivers

from .conftest import Served, flag, iso, serve, summary, write_run

ODD = 'quote " back\\slash\nnew line \t tab \x7f del \x01 ctrl émoji 🐴 <b>'


def _review(created: str, status: str = LEGITIMATE, text: str = ODD) -> Review:
    return Review(
        subject="demo/runs/20260101T020000Z@t#1/heatmap/1", job="demo", run="demo/runs/20260101T020000Z", status=status,
        reviewer=text, created=created, fingerprint=Fingerprint.of_flag(flag(range(0, 100), concepts=[("l4", 3)])),
        reason=text, comment=text, fixed_by="",
    )


@pytest.mark.parametrize("name", ["waivers.toml", "waivers.json"])
def test_the_file_round_trips_every_field(tmp_path: Path, name: str) -> None:
    older, newer = _review("2026-01-02T00:00:00+00:00", NEEDS_LOOK), _review("2026-01-03T00:00:00+00:00")
    path = write_waivers(tmp_path / name, [newer, older])
    if name.endswith(".toml"):
        tomllib.loads(path.read_text(encoding="utf-8"))  # valid TOML
    assert read_waivers(path) == [newer]  # only the current decision of each flag


def test_a_missing_file_is_no_reviews_and_a_bad_one_is_an_error(tmp_path: Path) -> None:
    assert read_waivers(tmp_path / "absent.toml") == []
    (tmp_path / "bad.toml").write_text('version = 1\n[[review]]\nstatus = "maybe"\n')
    with pytest.raises(WaiverFileError, match="review 1: status 'maybe'"):
        read_waivers(tmp_path / "bad.toml")
    (tmp_path / "old.json").write_text('{"version": 7, "review": []}')
    with pytest.raises(WaiverFileError, match="version 7"):
        read_waivers(tmp_path / "old.json")


def _job(tmp_path: Path, waivers: str = "spray-waivers.toml") -> Path:
    job = tmp_path / "jobs" / "demo.toml"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(f'[job]\nname = "demo"\noutput = "../reports"\n\n[check]\nwaivers = "{waivers}"\n', encoding="utf-8")
    return job


def test_check_reads_the_job_specs_waiver_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job(tmp_path)
    spec = parse_job(job.read_text(), str(job), job)
    assert spec.check.waivers == "spray-waivers.toml"
    audit = summary("demo", "t", [flag(range(0, 100))])
    out = tmp_path / "out"
    out.mkdir()
    assert gate_with_waivers(spec, audit, out / "summary.json") == 1
    assert "does not exist" in capsys.readouterr().out
    write_waivers(job.parent / "spray-waivers.toml", [_review("2026-01-02T00:00:00+00:00", text="Ada")])
    assert gate_with_waivers(spec, audit, out / "summary.json") == 0
    printed = capsys.readouterr().out
    assert "gate: waived (exit 0)" in printed and "waived: legitimate by Ada" in printed
    record = json.loads((out / GATE_FILE).read_text())
    assert record["verdict"] == "waived" and record["flags"][0]["review"]["reviewer"] == "Ada"
    # reviews of another job's folder are not this job's
    other = _review("2026-01-02T00:00:00+00:00", text="Ada")
    write_waivers(job.parent / "spray-waivers.toml", [Review(**{**other.__dict__, "job": "other"})])
    assert gate_with_waivers(spec, audit, out / "summary.json") == 1


def test_job_spec_keys_are_validated(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"demo.toml:4: schedule.cron must be a cron expression"):
        parse_job('[job]\nname = "d"\n[schedule]\ncron = "every night"\n', "demo.toml")
    with pytest.raises(JobSpecError, match="schedule.webhook must be an http"):
        parse_job('[job]\nname = "d"\n[schedule]\nwebhook = "ftp://x"\n', "demo.toml")
    with pytest.raises(JobSpecError, match="check.waivers"):
        parse_job('[job]\nname = "d"\n[check]\nwaivers = 3\n', "demo.toml")
    spec = parse_job('[job]\nname = "d"\n[schedule]\ncron = "0 2 * * *"\nwebhook = "https://hooks.example/x"\n', "demo.toml")
    assert spec.schedule.cron == "0 2 * * *" and spec.schedule.webhook == "https://hooks.example/x"


def test_exported_waivers_give_check_the_services_answer_and_import_restores_them(served: Served, tmp_path: Path) -> None:
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "legitimate", "reviewer": "Ada", "reason": "side views"}, headers=served.auth)
    write_run(served.reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(2, 101)), flag(range(700, 720), class_index=0, class_name="circle")]))
    served.rebuild()
    api_gate = served.client.get(f"/api/jobs/{served.job_id()}/gate").json()
    assert api_gate["exit_code"] == 1 and [item["status"] for item in api_gate["flags"]] == ["waived", "unreviewed"]
    served.client.close()
    served.app.state.service.engine.dispose()

    job = _job(tmp_path)
    assert main(["serve", "--reports", str(served.reports), "--export-waivers", str(job.parent / "spray-waivers.toml")]) == 0
    spec = parse_job(job.read_text(), str(job), job)
    latest = json.loads((served.reports / "demo/runs/20260102T020000Z/summary.json").read_text())
    assert gate_with_waivers(spec, latest, tmp_path / "summary.json") == api_gate["exit_code"]
    file_gate = json.loads((tmp_path / GATE_FILE).read_text())
    for key in ("verdict", "exit_code", "flags", "message"):
        assert file_gate[key] == {k: v for k, v in api_gate.items() if k not in ("job", "run_id", "run")}[key], key

    # a fresh database (another machine) gets the same answer after importing the file
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert main(["serve", "--reports", str(served.reports), "--database-url", f"sqlite:///{fresh / 'other.db'}", "--import-waivers", str(job.parent / "spray-waivers.toml")]) == 0
    other = serve(served.reports, database_url=f"sqlite:///{fresh / 'other.db'}")
    assert other.client.get(f"/api/jobs/{other.job_id()}/gate").json()["flags"] == api_gate["flags"]
    # importing twice adds nothing
    assert main(["serve", "--reports", str(served.reports), "--database-url", f"sqlite:///{fresh / 'other.db'}", "--import-waivers", str(job.parent / "spray-waivers.toml")]) == 0
    assert len(other.client.get(f"/api/jobs/{other.job_id()}/waivers").json()["review"]) == 1
    other.app.state.service.engine.dispose()


def test_evaluate_is_the_same_from_file_and_database(served: Served, tmp_path: Path) -> None:
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "confirmed_shortcut", "reviewer": "Ada"}, headers=served.auth)
    path = tmp_path / "w.json"
    path.write_text(json.dumps(served.client.get(f"/api/jobs/{served.job_id()}/waivers").json()))
    on_disk = json.loads((served.reports / run["path"] / "summary.json").read_text())
    from_file = evaluate(on_disk, read_waivers(path)).as_json()
    assert from_file == served.client.get(f"/api/runs/{run['id']}").json()["gate"]
    assert from_file["flags"][0]["status"] == "confirmed_shortcut"


def test_spray_check_exits_by_the_gate_with_waivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's wiring: ``spray check`` on a job with ``[check] waivers`` (the audit
    module replaced by one that returns the result, so the test loads no model, nor torch)."""
    import sys
    import types
    from dataclasses import dataclass, field

    @dataclass
    class AuditResult:
        report: Path
        summary: dict
        timings: dict = field(default_factory=dict)
        facts: dict = field(default_factory=dict)

        @property
        def summary_path(self) -> Path:
            return self.report.parent / "summary.json"

    fake = types.ModuleType("spray.audit")
    fake.AuditResult = AuditResult  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spray.audit", fake)
    job = _job(tmp_path)
    folder = tmp_path / "reports" / "demo"
    folder.mkdir(parents=True)
    audit = summary("demo", "t", [flag(range(0, 100))])

    def fake_audit(spec: object, **_: object) -> AuditResult:
        (folder / "summary.json").write_text(json.dumps(audit))
        return AuditResult(report=folder / "index.html", summary=audit, timings={}, facts={})

    fake.run_audit = fake_audit  # type: ignore[attr-defined]
    assert main(["check", str(job)]) == 1
    assert "unreviewed" in capsys.readouterr().out
    write_waivers(job.parent / "spray-waivers.toml", [_review("2026-01-02T00:00:00+00:00", text="Ada")])
    assert main(["check", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "verdict: flagged" in printed and "gate: waived (exit 0)" in printed and "legitimate by Ada" in printed
    assert json.loads((folder / GATE_FILE).read_text())["n_waived"] == 1
    # revoking the waiver (a newer review of the flag) fails the gate again
    write_waivers(job.parent / "spray-waivers.toml", [_review("2026-01-02T00:00:00+00:00", text="Ada"), _review("2026-01-05T00:00:00+00:00", NEEDS_LOOK, text="Bo")])
    assert main(["check", str(job)]) == 1
    # an unreadable waiver file is an error, never a verdict
    (job.parent / "spray-waivers.toml").write_text("version = [", encoding="utf-8")
    assert main(["check", str(job)]) == 2
    assert "cannot read the waiver file" in capsys.readouterr().err
    # a job without [check] waivers keeps the plain verdict
    job.write_text('[job]\nname = "demo"\noutput = "../reports"\n', encoding="utf-8")
    assert main(["check", str(job)]) == 1
