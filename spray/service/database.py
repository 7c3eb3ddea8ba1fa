"""The service's database: engine, SQLite settings, migrations and sessions.

SQLite is the default, as the file ``spray.db`` in the reports folder, in WAL mode (readers
never wait for the one writer, and a crash leaves a consistent file): every new connection
runs ``PRAGMA journal_mode=WAL``, ``foreign_keys=ON`` and a busy timeout. A PostgreSQL URL
(``postgresql+psycopg://user@host/db``) serves a team from one database server.

The schema is the Alembic migration history shipped in ``spray/service/migrations``; it is
applied programmatically at start (:func:`migrate`), so installing the package is all a
deployment needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

#: The database file's name inside the reports folder.
DATABASE_FILE = "spray.db"
MIGRATIONS = Path(__file__).with_name("migrations")


def default_url(reports: Path) -> str:
    """``sqlite:///<reports>/spray.db``."""
    return f"sqlite:///{(Path(reports).resolve() / DATABASE_FILE).as_posix()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite connections get WAL mode and foreign keys on connect."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine) -> Config:
    """Alembic's configuration for ``engine``, pointing at the shipped migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the database's schema to the newest migration (creates it when empty)."""
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (pages render after the write)."""
    return sessionmaker(engine, expire_on_commit=False)
