"""The service's tables (SQLAlchemy 2 declarative, typed).

The files on disk are the source of truth for audits: ``jobs``, ``runs`` and ``flags`` are
rebuilt from the ``summary.json`` files of the reports folder (``spray.service.scan``).
What only the service knows lives in the other tables and survives a rebuild:

* ``reviews``: append-only; a review is never updated or deleted, the newest review of a
  subject is the current decision. Each row points at the reviewed flag's fingerprint (class,
  spaces, members, size, score, concepts) so it stays meaningful when runs are rescanned,
  and so that reviews imported from a waiver file need no flag row.
* ``fingerprints``: those fingerprints, stored once each (keyed by the SHA-256 of their
  canonical JSON). A fingerprint lists thousands of member ids (tens of kB), and a flag
  reviewed again and again would otherwise repeat it in every review row, which makes the
  reviews table too large to stay in the database's page cache.
* ``tokens``: API tokens, stored as SHA-256 hashes only.
* ``schedules`` and ``tasks``: cron schedules and queued/running/done/failed audit runs.
* ``settings``: the service's own secrets (the session-signing key).

The schema is created and upgraded by the Alembic migrations in ``spray/service/migrations``
(``spray.service.database.migrate``); a change here needs a new migration there (a test
compares the two).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """The declarative base of every table of the service."""


class Job(Base):
    """A job: a folder of the reports folder that holds audits (``<job>/summary.json`` or dated runs)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(500), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    spec_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    runs: Mapped[list[Run]] = relationship(back_populates="job", cascade="all, delete-orphan", order_by="Run.created")


class Run(Base):
    """One audit of a job as its ``summary.json`` said; kept when the file is later replaced."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("path", "created", name="uq_runs_path_created"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    kind: Mapped[str] = mapped_column(String(20))
    created: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(20))
    complete: Mapped[bool] = mapped_column(Boolean)
    n_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_flags: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text, default="")
    on_disk: Mapped[bool] = mapped_column(Boolean, default=True)
    has_page: Mapped[bool] = mapped_column(Boolean, default=False)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, deferred=True)  # loaded when read: lists stay light

    job: Mapped[Job] = relationship(back_populates="runs")
    flags: Mapped[list[Flag]] = relationship(back_populates="run", cascade="all, delete-orphan", order_by="Flag.position")


class Flag(Base):
    """One flag (finding) of a run, in the order of ``summary.json``."""

    __tablename__ = "flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    subject: Mapped[str] = mapped_column(String(1200), index=True)
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(Text)
    space: Mapped[str] = mapped_column(String(200))
    cluster_id: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    artifact_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    confirmation: Mapped[str | None] = mapped_column(String(20), nullable=True)
    entry: Mapped[dict[str, Any]] = mapped_column(JSON, deferred=True)  # thousands of member ids: loaded when read

    run: Mapped[Run] = relationship(back_populates="flags")


class ReviewRow(Base):
    """One review of one flag (append-only), pointing at the reviewed flag's fingerprint."""

    __tablename__ = "reviews"
    #: A flag's history is read newest first: the first index hands its newest rows out in
    #: order; the second lists a job's reviewed flags without reading a review.
    __table_args__ = (
        Index("ix_reviews_subject_created", "subject", "created", "id"),
        Index("ix_reviews_job_subject", "job_key", "subject"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_key: Mapped[str] = mapped_column(String(500))
    subject: Mapped[str] = mapped_column(String(1200))
    run_path: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(30))
    reviewer: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    comment: Mapped[str] = mapped_column(Text, default="")
    fixed_by: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[str] = mapped_column(String(64))
    token_name: Mapped[str] = mapped_column(String(200), default="")
    source: Mapped[str] = mapped_column(String(20), default="service")
    fingerprint_id: Mapped[int] = mapped_column(ForeignKey("fingerprints.id", name="fk_reviews_fingerprint_id_fingerprints"), index=True)


class FingerprintRow(Base):
    """A reviewed flag's fingerprint, stored once however many reviews point at it."""

    __tablename__ = "fingerprints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class Token(Base):
    """An API token: its name and the SHA-256 of the secret (the secret itself is never stored)."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Schedule(Base):
    """A job's cron schedule (from its spec's ``[schedule]`` or the API) and the next time it is due."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    cron: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_due: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Task(Base):
    """A queued, running, done or failed audit run of a job."""

    __tablename__ = "tasks"
    #: At most one queued task per job, whichever process (``spray serve --workers N``) queues it.
    __table_args__ = (
        Index("uq_tasks_one_queued_per_job", "job_id", unique=True, sqlite_where=text("status = 'queued'"), postgresql_where=text("status = 'queued'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str] = mapped_column(Text, default="")
    log_tail: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(Text, default="")


class Setting(Base):
    """A named value the service keeps (the session-signing key)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
