"""Web console sessions and one-time sign-in links (docs/decisions.md, "Web console").

Only SHA-256 hashes of the cookie value and of the link token are stored, like API keys: a
database dump cannot be replayed as a browser session. Every time comparison uses the
caller's ``now`` (the injected clock), never the database's ``now()``, so expiry is testable
under ``task.Clock`` and does not depend on the database host's clock. A user's sessions and
links go with the user (``ON DELETE CASCADE``): deleting the account signs every browser out.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from e2a.store.database import Database, Txn

__all__ = [
    "SESSION_TTL",
    "LOGIN_LINK_TTL",
    "ConsoleSession",
    "consume_login_link",
    "create_login_link",
    "create_session",
    "get_session",
    "rate_count",
    "revoke_session",
    "token_hash",
]

SESSION_TTL = timedelta(days=7)
LOGIN_LINK_TTL = timedelta(minutes=15)


@dataclass(frozen=True)
class ConsoleSession:
    user_id: str
    email: str
    csrf_token: str
    expires_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


async def create_session(db: Database, user_id: str, now: datetime, ttl: timedelta = SESSION_TTL) -> tuple[str, str]:
    """A new session for ``user_id`` → (cookie token, CSRF token). Only the token's hash is kept."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)

    async def _txn(txn: Txn) -> None:
        await txn.execute(
            "INSERT INTO console_sessions (token_hash, user_id, csrf_token, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (token_hash(token), user_id, csrf, now, now + ttl),
        )

    await db.run("console_session_create", _txn)
    return token, csrf


async def get_session(db: Database, token: str, now: datetime) -> ConsoleSession | None:
    """The live session of a cookie value: not revoked, not past ``expires_at`` at ``now``."""
    row = await db.fetchone(
        "SELECT s.user_id, u.email, s.csrf_token, s.expires_at FROM console_sessions s"
        " JOIN users u ON u.id = s.user_id"
        " WHERE s.token_hash = %s AND s.revoked_at IS NULL AND s.expires_at > %s",
        (token_hash(token), now),
    )
    if row is None:
        return None
    return ConsoleSession(row["user_id"], row["email"], row["csrf_token"], row["expires_at"])


async def revoke_session(db: Database, token: str, now: datetime) -> None:
    async def _txn(txn: Txn) -> None:
        await txn.execute(
            "UPDATE console_sessions SET revoked_at = %s WHERE token_hash = %s AND revoked_at IS NULL",
            (now, token_hash(token)),
        )
        # Dead sessions are not kept forever: each sign-out sweeps the expired ones.
        await txn.execute("DELETE FROM console_sessions WHERE expires_at < %s", (now - SESSION_TTL,))

    await db.run("console_session_revoke", _txn)


async def create_login_link(db: Database, email: str, now: datetime, ttl: timedelta = LOGIN_LINK_TTL) -> str | None:
    """A one-time sign-in token for the user with ``email`` (case-insensitive); None if no such user."""
    token = secrets.token_urlsafe(32)

    async def _txn(txn: Txn) -> bool:
        user = await txn.fetchone("SELECT id FROM users WHERE lower(email) = lower(%s)", (email,))
        if user is None:
            return False
        await txn.execute(
            "INSERT INTO console_login_links (token_hash, user_id, expires_at) VALUES (%s, %s, %s)",
            (token_hash(token), user["id"], now + ttl),
        )
        return True

    return token if await db.run("console_login_link_create", _txn) else None


async def consume_login_link(db: Database, token: str, now: datetime) -> str | None:
    """Use a sign-in token once → its user id; None when unknown, used or expired. One
    conditional update decides, so two browsers racing on one link get one session."""

    async def _txn(txn: Txn) -> str | None:
        row = await txn.fetchone(
            "UPDATE console_login_links SET used_at = %s"
            " WHERE token_hash = %s AND used_at IS NULL AND expires_at > %s RETURNING user_id",
            (now, token_hash(token), now),
        )
        return None if row is None else row["user_id"]

    return await db.run("console_login_link_consume", _txn)


async def rate_count(db: Database, bucket: str, window_start: int) -> int:
    """The count of a :mod:`e2a.store.ratelimits` bucket's window, without counting (the
    console refuses a sign-in when earlier *failures* used the budget up)."""
    row = await db.fetchone(
        "SELECT count FROM rate_limits WHERE bucket = %s AND window_start = to_timestamp(%s)", (bucket, window_start)
    )
    return int(row["count"]) if row else 0
