"""Who may write, and where a request may read: tokens, sessions, CSRF and paths.

* **API writes** need ``Authorization: Bearer <token>`` (:func:`api_token`); a missing or
  unknown token is 401.
* **Browser forms** log in once with a token (``/login``): the session cookie (signed by
  Starlette's ``SessionMiddleware`` with a key kept in the database, ``SameSite=strict``,
  ``HttpOnly``) then carries the token's id and a per-session CSRF token. Every form POST
  must send that CSRF token in the hidden field ``csrf`` (:func:`check_csrf`); a missing or
  wrong one is 403, whatever the cookie says. The token is checked again on every write, so
  a revoked token ends its sessions.
* **Paths**: every file a request names is resolved (symbolic links and ``..`` followed) and
  served only if it lies inside the reports folder (:func:`inside_reports`); the database
  files and hidden files (``.spray/``: logs, the lock) are never served.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from spray.service.database import DATABASE_FILE
from spray.service.models import Setting, Token
from spray.service.tokens import verify

SESSION_KEY = "session_key"


def session_secret(session: Session) -> str:
    """The key that signs session cookies, made on first use and kept in the database."""
    row = session.get(Setting, SESSION_KEY)
    if row is None:
        row = Setting(key=SESSION_KEY, value=secrets.token_urlsafe(48))
        session.add(row)
        session.commit()
    return row.value


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def api_token(request: Request, session: Session) -> Token:
    """The token of an API write; 401 without a valid one."""
    token = verify(session, bearer(request))
    if token is None:
        raise HTTPException(status_code=401, detail="a valid token is required: Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    return token


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made when the session has none)."""
    value = request.session.get("csrf")
    if not isinstance(value, str) or len(value) < 20:
        value = secrets.token_urlsafe(32)
        request.session["csrf"] = value
    return value


def check_csrf(request: Request, submitted: str | None) -> None:
    """403 unless ``submitted`` is this session's CSRF token."""
    expected = request.session.get("csrf")
    if not isinstance(expected, str) or not submitted or not secrets.compare_digest(expected, submitted):
        raise HTTPException(status_code=403, detail="CSRF check failed: reload the form and submit it again")


def session_user(request: Request, session: Session) -> Token | None:
    """The token a browser session logged in with, if it is still valid."""
    token_id = request.session.get("token_id")
    if not isinstance(token_id, int):
        return None
    token = session.scalar(select(Token).where(Token.id == token_id))
    return token if token is not None and not token.revoked else None


def form_user(request: Request, session: Session, submitted_csrf: str | None) -> Token:
    """The logged-in token of a form POST after the CSRF check; 403 / 401 otherwise."""
    check_csrf(request, submitted_csrf)
    token = session_user(request, session)
    if token is None:
        raise HTTPException(status_code=401, detail="log in with a token first (/login)")
    return token


def database_files(url_database: str | None) -> frozenset[Path]:
    """The files of a SQLite database (with its journal, WAL and shared-memory files)."""
    if not url_database:
        return frozenset()
    base = Path(url_database).resolve()
    return frozenset({base, *(base.with_name(base.name + suffix) for suffix in ("-wal", "-shm", "-journal"))})


def inside_reports(reports: Path, relative: str, hidden: frozenset[Path] = frozenset()) -> Path:
    """The file ``relative`` names under ``reports``; 404 when it lies outside, is hidden,
    is the database (``spray.db*``, or any of ``hidden``), or does not exist."""
    root = reports.resolve()
    if "\x00" in relative:
        raise HTTPException(status_code=404, detail="not found")
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target == root:
        raise HTTPException(status_code=404, detail="not found")
    parts = target.relative_to(root).parts
    if any(part.startswith(".") for part in parts) or parts[0].startswith(DATABASE_FILE) or target in hidden:
        raise HTTPException(status_code=404, detail="not found")
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        raise HTTPException(status_code=404, detail="not found")
    return target
