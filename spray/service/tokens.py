"""API tokens: made once, shown once, stored as a hash.

``spray serve --create-token NAME`` makes a token of 32 random bytes (``secrets``), prints
it once and stores only its SHA-256. A token this long cannot be guessed, so a fast hash is
enough (no password stretching is needed, unlike for passwords people choose); the lookup
compares hashes, never the secret. Every write of the API needs ``Authorization: Bearer
<token>``; browser forms log in with a token once and then carry a session cookie.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from spray.service.models import Token

PREFIX = "spray_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")


class TokenError(ValueError):
    """A token that cannot be made (bad or taken name)."""


def digest(secret: str) -> str:
    """The SHA-256 (hex) under which a token is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(session: Session, name: str) -> str:
    """Store a new token named ``name`` and return its secret (the only time it is seen)."""
    if not NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: use 1-100 letters, digits, '.', '_', '@' or '-'")
    if session.scalar(select(Token).where(Token.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists already; choose another name")
    secret = PREFIX + secrets.token_urlsafe(32)
    session.add(Token(name=name, digest=digest(secret), created_at=datetime.now(timezone.utc), revoked=False))
    session.commit()
    return secret


def verify(session: Session, secret: str) -> Token | None:
    """The live token whose secret this is, or None."""
    if not secret or len(secret) > 200:
        return None
    token = session.scalar(select(Token).where(Token.digest == digest(secret)))
    return token if token is not None and not token.revoked else None


def revoke_token(session: Session, name: str) -> None:
    """Revoke the token ``name``: its API calls and browser sessions stop working at once."""
    token = session.scalar(select(Token).where(Token.name == name))
    if token is None:
        raise TokenError(f"no token named {name!r}")
    token.revoked = True
    session.commit()
