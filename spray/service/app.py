"""The ASGI application of ``spray serve`` (FastAPI), and what it holds.

:func:`create_app` opens the database (migrating it to the newest schema), scans the
reports folder into it, files the job specs, recovers tasks a stopped service left running
and builds the app: the HTML pages (``spray.service.pages``), the JSON API
(``spray.service.api``, schema at ``/openapi.json``) and the static reports
(``/reports/...``, served as they are on disk). A background thread runs the scheduler
while the app is served (its lifespan); tests drive the scheduler themselves.

Several processes may serve one reports folder (``spray serve --workers N``, or a second
``spray serve`` by mistake): they share the database, and exactly one of them schedules,
the one holding the scheduler lease (an exclusive ``flock`` on ``.spray-scheduler.lock`` in
the reports folder, released by the kernel when that process ends, so another takes over).
Whoever takes the lease first recovers the runs that a stopped scheduler left running.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spray.service import notify
from spray.service.database import default_url, make_engine, migrate, session_factory
from spray.service.scan import scan
from spray.service.scheduler import Scheduler, audit_command, utc_now
from spray.service.security import session_secret
from spray.service.specs import register_specs

log = logging.getLogger(__name__)

#: The file in the reports folder whose ``flock`` makes a process the one that schedules.
SCHEDULER_LEASE = ".spray-scheduler.lock"
#: The environment variable that hands a :class:`ServiceConfig` to worker processes.
CONFIG_VARIABLE = "SPRAY_SERVICE_CONFIG"

#: The Content-Security-Policy of the service's own pages: no script at all.
PAGE_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ServiceConfig:
    """How to serve: the reports folder, the database, the job specs and the scheduler's
    collaborators (injectable for tests)."""

    reports: Path
    database_url: str | None = None
    jobs_dir: Path | None = None
    scheduler_interval: float = 2.0
    #: Requests one process works on at once (the rest wait in order). A few, not anyio's
    #: 40: the handlers are Python under one GIL, so more threads add switching and let a
    #: page's latency grow with every request it shares the process with (the p99 of
    #: ``bench/service_load.py`` went from 149 ms at 4 threads to 203 ms at 40).
    threads: int = 4
    secure_cookies: bool = False
    base_url: str = ""
    clock: Callable[[], datetime] = utc_now
    command: Callable[[Any], list[str]] = audit_command
    poster: Callable[[str, dict[str, Any]], bool] = notify.post


    def to_environment(self) -> str:
        """The serialisable part of the configuration (what ``spray serve`` sets), as JSON."""
        return json.dumps({
            "reports": str(self.reports), "database_url": self.database_url,
            "jobs_dir": None if self.jobs_dir is None else str(self.jobs_dir),
            "scheduler_interval": self.scheduler_interval, "threads": self.threads, "secure_cookies": self.secure_cookies, "base_url": self.base_url,
        })

    @classmethod
    def from_environment(cls, text: str) -> ServiceConfig:
        values = json.loads(text)
        return cls(
            reports=Path(values["reports"]), database_url=values["database_url"],
            jobs_dir=None if values["jobs_dir"] is None else Path(values["jobs_dir"]),
            scheduler_interval=float(values["scheduler_interval"]), threads=int(values["threads"]), secure_cookies=bool(values["secure_cookies"]),
            base_url=str(values["base_url"]),
        )


class SchedulerLease:
    """An exclusive, non-blocking ``flock`` on the reports folder's lease file: held by at
    most one process at a time, and let go by the kernel when the holder ends."""

    def __init__(self, reports: Path) -> None:
        self.path = reports / SCHEDULER_LEASE
        self._handle: int | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def take(self) -> bool:
        """Take the lease if no process holds it; returns whether this process holds it."""
        if self._handle is not None:
            return True
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor lets the lock go
            self._handle = None


@dataclass
class Service:
    """Everything a request handler needs."""

    config: ServiceConfig
    reports: Path
    engine: Engine
    sessions: sessionmaker[Session]
    scheduler: Scheduler
    stop: threading.Event = field(default_factory=threading.Event)
    lease: SchedulerLease | None = None

    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def take_scheduling(self) -> bool:
        """Make this process the one that schedules, when no other process does; the first
        time it becomes so, it recovers the runs a stopped scheduler left ``running``."""
        if self.lease is None:
            self.lease = SchedulerLease(self.reports)
        if self.lease.held:
            return True
        if not self.lease.take():
            return False
        requeued = self.scheduler.recover()
        if requeued:
            log.warning("queued %d interrupted run(s) again: %s", len(requeued), requeued)
        return True

    def schedule_forever(self, interval: float) -> None:
        """The scheduler's loop while the app is served: a step every ``interval`` seconds
        while this process holds the lease, and a try to take it otherwise."""
        while not self.stop.is_set():
            try:
                if self.take_scheduling():
                    self.scheduler.step()
            except Exception:  # the loop must outlive any one failure
                log.exception("scheduler step failed")
            self.stop.wait(interval)
        if self.lease is not None:
            self.lease.release()


class SecurityHeaders:
    """Adds the security headers to every response, and the no-script policy to the
    service's own pages (a static report under ``/reports/`` keeps its own policy).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) would
    run every request through an extra task and response stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = not str(scope.get("path", "")).startswith("/reports/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "same-origin")
                if page:
                    headers.setdefault("Content-Security-Policy", PAGE_POLICY)
                    headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def open_service(config: ServiceConfig, prepare: bool = True) -> Service:
    """The database migrated; with ``prepare``, the reports scanned, the session key made
    and the specs filed (a worker process skips what ``spray serve`` did before starting it).

    Interrupted runs are not touched here: the process that takes the scheduler lease
    recovers them (:meth:`Service.take_scheduling`), so a housekeeping command or a second
    server never fails a run that a live scheduler is running.
    """
    reports = Path(config.reports).resolve()
    if not reports.is_dir():
        raise NotADirectoryError(f"{reports}: no such reports folder; run an audit first or pass --reports DIR")
    engine = make_engine(config.database_url or default_url(reports))
    sessions = session_factory(engine)
    if prepare:
        migrate(engine)
        with sessions() as session:
            scan(session, reports)
            session_secret(session)
            if config.jobs_dir is not None and Path(config.jobs_dir).is_dir():
                register_specs(session, Path(config.jobs_dir), reports, config.clock)
    scheduler = Scheduler(sessions, reports, clock=config.clock, command=config.command, poster=config.poster, base_url=config.base_url)
    return Service(config, reports, engine, sessions, scheduler)


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``spray serve --workers N`` (uvicorn's factory):
    its configuration comes from :data:`CONFIG_VARIABLE`, and the parent has prepared the
    database."""
    app = create_app(ServiceConfig.from_environment(os.environ[CONFIG_VARIABLE]), prepare=False)
    tune_collector()
    return app


#: Allocations between two young-generation collections of a serving process (CPython's
#: default is 700).
YOUNG_COLLECTION_EVERY = 100_000


def tune_collector() -> None:
    """Set the cyclic garbage collector up for serving (a process that only serves; never
    called by tests or library use).

    Reference counting frees a request's objects when it ends; the cyclic collector only
    finds cycles, yet with CPython's defaults it runs every 700 allocations and now and then
    walks every object the process keeps (parsed summaries, fingerprints of thousands of ids).
    Measured with ``bench/service_load.py`` (20 clients, 2 workers): the p99 of page reads
    was 217 ms with the defaults, 117 ms with the collector off, 132 ms with this. What
    exists at start is frozen (never walked again), and young collections run every
    :data:`YOUNG_COLLECTION_EVERY` allocations: cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, 10, 10)


def create_app(config: ServiceConfig, prepare: bool = True) -> FastAPI:
    """The service's ASGI app over ``config.reports`` (``prepare``: see :func:`open_service`)."""
    from spray.service.api import router as api_router
    from spray.service.pages import router as page_router

    service = open_service(config, prepare)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.threads
        thread = None
        if config.scheduler_interval > 0:
            thread = threading.Thread(target=service.schedule_forever, args=(config.scheduler_interval,), daemon=True, name="spray-scheduler")
            thread.start()
        yield
        service.stop.set()
        if thread is not None:
            thread.join(timeout=10)

    app = FastAPI(
        title="spray service", version="1",
        description="Audits of a reports folder, flag reviews that the gate honours, scheduled runs.",
        lifespan=lifespan, docs_url=None, redoc_url=None,
    )
    app.state.service = service
    with service.sessions() as session:
        secret = session_secret(session)
    app.add_middleware(
        SessionMiddleware, secret_key=secret, session_cookie="spray_session", same_site="strict",
        https_only=config.secure_cookies, max_age=12 * 3600,
    )

    app.add_middleware(SecurityHeaders)

    app.include_router(api_router)
    app.include_router(page_router)
    return app
