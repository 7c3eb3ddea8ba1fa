"""Fixtures of the service tests: small ``summary.json`` files written by hand (schema in
``spray.report.summary``), a service over them, and a token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from spray.service.app import ServiceConfig, create_app
from spray.service.models import Token
from spray.service.tokens import create_token


def flag(
    members: range | list[str], class_index: int = 1, class_name: str = "square", space: str = "heatmap",
    cluster_id: int = 1, score: float | None = 0.9, concepts: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """A flag entry of ``summary.json``; ``members`` as sample numbers or ids."""
    ids = [f"s{item}" for item in members] if isinstance(members, range) else list(members)
    entry: dict[str, Any] = {
        "class_index": class_index, "class_name": class_name, "space": space, "cluster_id": cluster_id,
        "size": len(ids), "artifact_score": score, "member_ids": ids, "member_rows": list(range(len(ids))),
        "accuracy": 1.0, "candidate": True, "confirmation": {"status": "confirmed", "reason": ""},
        "revealed_by": [{"class_index": class_index, "space": space, "cluster_id": cluster_id, "artifact_score": score, "jaccard": 1.0}],
    }
    if concepts:
        entry["concepts"] = [{"layer": layer, "channel": channel, "distinction": 1.0, "reference_rows": []} for layer, channel in concepts]
    return entry


def summary(job: str, created: str, flags: list[dict[str, Any]], complete: bool = True, class_names: list[str] | None = None) -> dict[str, Any]:
    """A whole ``summary.json`` (verdict as ``spray.verdict`` would set it)."""
    verdict = "flagged" if flags else ("clean" if complete else "incomplete")
    return {
        "schema_version": 1, "job": job, "created": created, "verdict": verdict, "complete": complete,
        "unanalysed": [] if complete else [{"class_index": 0, "class_name": "circle", "space": "heatmap", "reason": "too few", "allowed": False}],
        "skipped_images": 0, "untested_flags": 0, "threshold": 0.75, "n_samples": 600,
        "class_names": class_names or ["circle", "square"], "metadata": {}, "artifact_check": None,
        "ground_truth": None, "classes": [], "flags": flags,
    }


def write_run(reports: Path, job: str, stamp: str, content: dict[str, Any], page: bool = True) -> Path:
    """Write ``content`` as a dated run ``<reports>/<job>/runs/<stamp>/summary.json``."""
    folder = reports / job / "runs" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(content), encoding="utf-8")
    if page:
        (folder / "index.html").write_text(f"<!DOCTYPE html><title>report {stamp}</title><p>static report</p>", encoding="utf-8")
    return folder


def iso(stamp: str) -> str:
    """``20260101T020000Z`` as ISO-8601."""
    return f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}+00:00"


@dataclass
class Served:
    """A service over a temporary reports folder, a client and a write token."""

    reports: Path
    client: TestClient
    token: str
    app: Any

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def job_id(self, key: str = "demo") -> int:
        return next(job["id"] for job in self.client.get("/api/jobs").json() if job["key"] == key)

    def latest_run(self, key: str = "demo") -> dict[str, Any]:
        runs = self.client.get(f"/api/jobs/{self.job_id(key)}/runs").json()
        return runs[0]

    def rebuild(self) -> None:
        assert self.client.post("/api/rebuild", headers=self.auth).status_code == 200


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    write_run(folder, "demo", "20260101T020000Z", summary("demo", iso("20260101T020000Z"), [flag(range(0, 100))]))
    return folder


def serve(reports: Path, **options: Any) -> Served:
    app = create_app(ServiceConfig(reports=reports, scheduler_interval=0, **options))
    with app.state.service.sessions() as session:  # "ci", or "ci-2"... when the database has one
        names = ["ci", *(f"ci-{number}" for number in range(2, 100))]
        name = next(name for name in names if session.scalar(select(Token).where(Token.name == name)) is None)
        token = create_token(session, name)
    return Served(reports, TestClient(app), token, app)


@pytest.fixture
def served(reports: Path) -> Iterator[Served]:
    service = serve(reports)
    yield service
    service.client.close()
    service.app.state.service.engine.dispose()
