"""The service on a real PostgreSQL server (started here on a loopback port), not a mock.

Skipped where PostgreSQL's ``initdb`` or the ``psycopg`` driver is missing. As root, the
server runs as ``nobody`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from spray.service.database import make_engine, migrate
from spray.service.models import Base

from .conftest import flag, iso, serve, summary, write_run

psycopg = pytest.importorskip("psycopg")
INITDB, PG_CTL = shutil.which("initdb"), shutil.which("pg_ctl")
pytestmark = pytest.mark.skipif(INITDB is None or PG_CTL is None, reason="PostgreSQL (initdb, pg_ctl) is not installed")


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "nobody", "--", *command]
    return command


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    # not below pytest's temporary folder: that one is private to root, and the server runs as nobody
    folder = Path(tempfile.mkdtemp(prefix="spray-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
    data = folder / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(_as_server_user([str(INITDB), "-D", str(data), "-A", "trust", "-U", "spray"]), check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_server_user([str(PG_CTL), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=spray dbname=postgres", autocommit=True) as connection:
                    connection.execute("CREATE DATABASE spray_test")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, (folder / "log").read_text()
                time.sleep(0.3)
        yield f"postgresql+psycopg://spray@127.0.0.1:{port}/spray_test"
    finally:
        subprocess.run(_as_server_user([str(PG_CTL), "-D", str(data), "-m", "fast", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_migrations_on_postgresql_build_the_models_schema(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    migrate(engine)
    migrate(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_reviews_and_the_gate_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    write_run(reports, "demo", "20260101T020000Z", summary("demo", iso("20260101T020000Z"), [flag(range(0, 100), class_name="<script>x</script> 🐴")]))
    served = serve(reports, database_url=postgres_url)
    run = served.latest_run()
    flag_id = served.client.get(f"/api/runs/{run['id']}/flags").json()[0]["id"]
    posted = served.client.post(f"/api/flags/{flag_id}/reviews", json={"status": "legitimate", "reviewer": "Ada", "reason": "ok"}, headers=served.auth)
    assert posted.status_code == 201
    write_run(reports, "demo", "20260102T020000Z", summary("demo", iso("20260102T020000Z"), [flag(range(1, 100), class_name="<script>x</script> 🐴")]))
    served.rebuild()
    gate = served.client.get(f"/api/jobs/{served.job_id()}/gate").json()
    assert gate["verdict"] == "waived" and gate["run"] == "demo/runs/20260102T020000Z"
    assert gate["flags"][0]["class_name"] == "<script>x</script> 🐴"
    assert not (reports / "spray.db").exists()
    served.client.close()
    served.app.state.service.engine.dispose()
