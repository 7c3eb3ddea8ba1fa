"""The database: SQLite in WAL mode, migrations that match the models, rebuilds from disk
that keep reviews and history."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from spray.service.database import DATABASE_FILE, make_engine, migrate, session_factory
from spray.service.models import Base, ReviewRow, Run
from spray.service.scan import job_key, scan
from pathlib import PurePosixPath

from .conftest import Served, flag, iso, serve, summary, write_run


def test_sqlite_file_in_the_reports_folder_in_wal_mode(served: Served) -> None:
    database = served.reports / DATABASE_FILE
    assert database.is_file()
    with served.app.state.service.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with sqlite3.connect(database) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert differences == []
    assert version == "0003"
    assert {"jobs", "runs", "flags", "reviews", "fingerprints", "tokens", "schedules", "tasks", "settings"} <= set(inspect(engine).get_table_names())


def _reviews_of_schema_0001(engine: object) -> list[tuple[int, str, dict]]:
    """Three reviews written as schema 0001 stored them (each with its fingerprint inline),
    two of them of the same flag."""
    first = {"class_index": 1, "class_name": "cat", "space": "heatmap", "cluster_id": 0, "size": 3, "artifact_score": 0.9,
             "member_ids": ["a", "b", "c"], "spaces": ["heatmap"], "concepts": []}
    second = dict(first, class_index=2, class_name="dog", member_ids=["d", "e"], size=2)
    rows = [(1, "needs_look", first), (2, "legitimate", first), (3, "confirmed_shortcut", second)]
    with engine.begin() as connection:  # type: ignore[attr-defined]
        for review_id, status, body in rows:
            connection.execute(
                text("INSERT INTO reviews (id, job_key, subject, run_path, status, reviewer, reason, comment, fixed_by, created, token_name, source, fingerprint) "
                     "VALUES (:id, 'demo', :subject, 'demo', :status, 'Ada', 'r', '', '', :created, '', 'service', :fingerprint)"),
                {"id": review_id, "subject": f"demo#{body['class_index']}", "status": status, "created": f"2026-01-0{review_id}", "fingerprint": json.dumps(body)},
            )
    return rows


def _move_schema(engine: Any, revision: str, upgrade: bool = True) -> None:
    """Bring ``engine``'s database to an older ``revision`` of the schema (or down to it)."""
    from alembic import command

    from spray.service.database import alembic_config

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.upgrade if upgrade else command.downgrade)(config, revision)


def test_migration_0002_moves_fingerprints_out_of_reviews_and_back(tmp_path: Path) -> None:
    from spray.service.reviews import job_reviews

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    _move_schema(engine, "0001")
    rows = _reviews_of_schema_0001(engine)
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM fingerprints")).scalar() == 2  # the shared one stored once
    with session_factory(engine)() as session:
        reviews = job_reviews(session, "demo")
    assert [(review.status, sorted(review.fingerprint.member_ids), review.fingerprint.class_name) for review in reviews] == [
        (status, body["member_ids"], body["class_name"]) for _, status, body in rows
    ]
    _move_schema(engine, "0001", upgrade=False)
    with engine.connect() as connection:
        back = connection.execute(text("SELECT id, fingerprint FROM reviews ORDER BY id")).all()
        assert "fingerprints" not in inspect(connection).get_table_names()
    assert [(review_id, json.loads(body)) for review_id, body in back] == [(review_id, body) for review_id, _, body in rows]
    with sqlite3.connect(tmp_path / "old.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_flag_reviewed_again_and_again_stores_its_fingerprint_once(served: Served) -> None:
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    for status in ("needs_look", "confirmed_shortcut", "needs_look"):
        response = served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": status, "reviewer": "Ada"}, headers=served.auth)
        assert response.status_code == 201
    with served.app.state.service.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*), count(DISTINCT fingerprint_id) FROM reviews")).one() == (3, 1)
        assert connection.execute(text("SELECT count(*) FROM fingerprints")).scalar() == 1
    history = served.client.get(f"/api/flags/{flag_id}/reviews").json()
    assert [item["status"] for item in history] == ["needs_look", "confirmed_shortcut", "needs_look"]


def test_a_rebuild_never_loses_a_review(served: Served) -> None:
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "legitimate", "reviewer": "Ada", "reason": "ok"}, headers=served.auth)
    # the database's audit tables are wiped and rebuilt from disk
    service = served.app.state.service
    with service.sessions() as session:
        for row in session.scalars(select(Run)).all():
            session.delete(row)
        session.commit()
        assert session.scalars(select(Run)).all() == []
    served.rebuild()
    with service.sessions() as session:
        assert len(session.scalars(select(ReviewRow)).all()) == 1
    gate = served.client.get(f"/api/jobs/{served.job_id()}/gate").json()
    assert gate["verdict"] == "waived"


def test_a_replaced_report_keeps_its_history(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    folder = reports / "plain"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary("plain", "2026-01-01T00:00:00+00:00", [flag(range(10))])))
    served = serve(reports)
    (folder / "summary.json").write_text(json.dumps(summary("plain", "2026-01-02T00:00:00+00:00", [])))
    served.rebuild()
    runs = served.client.get(f"/api/jobs/{served.job_id('plain')}/runs").json()
    assert [(item["created"][:10], item["on_disk"], item["n_flags"]) for item in runs] == [("2026-01-02", True, 0), ("2026-01-01", False, 1)]
    assert served.client.get(f"/api/jobs/{served.job_id('plain')}/gate").json()["verdict"] == "clean"
    served.app.state.service.engine.dispose()


def test_report_folders_are_filed_under_their_job() -> None:
    assert job_key(PurePosixPath("demo")) == ("demo", "latest")
    assert job_key(PurePosixPath("demo/runs/20260101T020000Z")) == ("demo", "dated")
    assert job_key(PurePosixPath("team/demo/runs/20260101T020000123456Z")) == ("team/demo", "dated")
    assert job_key(PurePosixPath("demo/correction/r-clarc/reaudit")) == ("demo", "reaudit")
    assert job_key(PurePosixPath("demo/runs/not-a-time")) == ("demo/runs/not-a-time", "latest")


def test_unreadable_summaries_are_listed_not_fatal(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    write_run(reports, "demo", "20260101T020000Z", summary("demo", iso("20260101T020000Z"), []))
    (reports / "broken").mkdir()
    (reports / "broken" / "summary.json").write_text("{not json")
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    migrate(engine)
    with session_factory(engine)() as session:
        result = scan(session, reports)
    assert result.unreadable == ["broken"] and len(result.new_runs) == 1


def _blind_first_lookup(session: object) -> None:
    """Make the session's next ``scalar`` lookup see nothing, as a process does that checks
    just before another one commits the same row."""
    original = session.scalar  # type: ignore[attr-defined]
    calls = []

    def scalar(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return None if len(calls) == 1 else original(*args, **kwargs)

    session.scalar = scalar  # type: ignore[attr-defined]


def test_two_processes_queueing_one_job_at_once_make_one_queued_task(served: Served) -> None:
    from spray.service.models import Job, Task

    service = served.app.state.service
    with service.sessions() as session:
        job = session.scalars(select(Job)).first()
        first = service.scheduler.enqueue(session, job, "first")
    with service.sessions() as session:
        job = session.scalars(select(Job)).first()
        _blind_first_lookup(session)  # its check misses the queued task: the index refuses the second
        second = service.scheduler.enqueue(session, job, "second")
        queued = session.scalars(select(Task).where(Task.status == "queued")).all()
    assert second.id == first.id and [task.reason for task in queued] == ["first"]


def test_two_processes_storing_one_fingerprint_at_once_share_its_row(served: Served) -> None:
    from spray.service.matching import Fingerprint
    from spray.service.models import FingerprintRow
    from spray.service.reviews import store_fingerprint

    fingerprint = Fingerprint(class_index=1, class_name="cat", space="heatmap", cluster_id=0, size=2, artifact_score=0.9,
                              member_ids=frozenset({"a", "b"}))
    with served.app.state.service.sessions() as session:
        stored = store_fingerprint(session, fingerprint)
        _blind_first_lookup(session)
        assert store_fingerprint(session, fingerprint) == stored
        assert len(session.scalars(select(FingerprintRow)).all()) == 1


def test_migration_0003_fails_queued_duplicates_before_it_enforces_one(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    _move_schema(engine, "0002")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO jobs (id, key, name, created_at) VALUES (1, 'demo', 'demo', '2026-01-01 00:00:00')"))
        for task_id in (1, 2, 3):
            connection.execute(
                text("INSERT INTO tasks (id, job_id, status, reason, created_at, log_path, log_tail, message) "
                     "VALUES (:id, 1, 'queued', 'r', '2026-01-01 00:00:00', '', '', '')"), {"id": task_id},
            )
    migrate(engine)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, status, message FROM tasks ORDER BY id")).all()
    assert [(task_id, status) for task_id, status, _ in rows] == [(1, "queued"), (2, "failed"), (3, "failed")]
    assert rows[1][2] == "a duplicate of queued task 1"
