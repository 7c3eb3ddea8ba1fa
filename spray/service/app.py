"""The ASGI application of ``spray serve`` (FastAPI), and what it holds.

:func:`create_app` opens the database (migrating it to the newest schema), scans the
reports folder into it, files the job specs, recovers tasks a stopped service left running
and builds the app: the HTML pages (``spray.service.pages``), the JSON API
(``spray.service.api``, schema at ``/openapi.json``) and the static reports
(``/reports/...``, served as they are on disk). A background thread runs the scheduler
while the app is served (its lifespan); tests drive the scheduler themselves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
    secure_cookies: bool = False
    base_url: str = ""
    clock: Callable[[], datetime] = utc_now
    command: Callable[[Any], list[str]] = audit_command
    poster: Callable[[str, dict[str, Any]], bool] = notify.post


@dataclass
class Service:
    """Everything a request handler needs."""

    config: ServiceConfig
    reports: Path
    engine: Engine
    sessions: sessionmaker[Session]
    scheduler: Scheduler
    stop: threading.Event = field(default_factory=threading.Event)

    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session


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


def open_service(config: ServiceConfig) -> Service:
    """Database migrated, reports scanned, specs filed, interrupted tasks requeued."""
    reports = Path(config.reports).resolve()
    if not reports.is_dir():
        raise NotADirectoryError(f"{reports}: no such reports folder; run an audit first or pass --reports DIR")
    engine = make_engine(config.database_url or default_url(reports))
    migrate(engine)
    sessions = session_factory(engine)
    with sessions() as session:
        scan(session, reports)
        if config.jobs_dir is not None and Path(config.jobs_dir).is_dir():
            register_specs(session, Path(config.jobs_dir), reports, config.clock)
    scheduler = Scheduler(sessions, reports, clock=config.clock, command=config.command, poster=config.poster, base_url=config.base_url)
    scheduler.recover()
    return Service(config, reports, engine, sessions, scheduler)


def create_app(config: ServiceConfig) -> FastAPI:
    """The service's ASGI app over ``config.reports``."""
    from spray.service.api import router as api_router
    from spray.service.pages import router as page_router

    service = open_service(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        thread = None
        if config.scheduler_interval > 0:
            thread = threading.Thread(target=service.scheduler.run_forever, args=(service.stop, config.scheduler_interval), daemon=True, name="spray-scheduler")
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
