"""Web console sessions and one-time sign-in links (docs/decisions.md, "Web console").

Only SHA-256 hashes of the cookie value and of the link token are stored, like API keys: a
database dump cannot be replayed as a browser session. Every time comparison uses the
caller's ``now`` (the injected clock), never the database's ``now()``, so expiry is testable
under ``task.Clock`` and does not depend on the database host's clock. A user's sessions and
links go with the user (``ON DELETE CASCADE``): deleting the account signs every browser out.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from e2a.store.database import Database, Txn
from e2a.store.events import CHANNEL_OUTBOUND

__all__ = [
    "EXPIRED_GRACE",
    "SESSION_TTL",
    "LOGIN_LINK_TTL",
    "SIGNIN_MAIL_TYPE",
    "ConsoleSession",
    "SigninMail",
    "consume_login_link",
    "create_login_link",
    "create_session",
    "delete_expired",
    "get_session",
    "new_link_token",
    "queue_signin_mail",
    "rate_count",
    "revoke_session",
    "token_hash",
]

SESSION_TTL = timedelta(days=7)
LOGIN_LINK_TTL = timedelta(minutes=15)
#: How long past its expiry a session or link is kept before the sweeps delete it: each
#: process compares with its own clock, and a node whose clock runs ahead must not delete
#: what another still accepts.
EXPIRED_GRACE = timedelta(hours=1)
#: ``messages.type`` of a mailed sign-in link: e2a's mail to an account, no agent's (schema 0006).
SIGNIN_MAIL_TYPE = "signin"


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
        # Dead sessions are not kept forever: each sign-out sweeps the expired ones too.
        await _delete_expired_sessions_txn(txn, now)

    await db.run("console_session_revoke", _txn)


async def _delete_expired_sessions_txn(txn: Txn, now: datetime) -> int:
    await txn.execute("DELETE FROM console_sessions WHERE expires_at < %s", (now - EXPIRED_GRACE,))
    return txn.rowcount


async def delete_expired(db: Database, now: datetime) -> int:
    """Delete the sessions and sign-in links expired more than :data:`EXPIRED_GRACE` before
    ``now`` (the retention sweep, e2a.retention); returns how many rows went.

    WHY: neither can be used once expired (:func:`get_session`, :func:`consume_login_link`
    compare with ``now``), yet without this they stayed until their user was deleted: one row
    per sign-in and per sign-in link, for ever. A used link expires 15 minutes after it was made.
    """

    async def _txn(txn: Txn) -> int:
        n = await _delete_expired_sessions_txn(txn, now)
        await txn.execute("DELETE FROM console_login_links WHERE expires_at < %s", (now - EXPIRED_GRACE,))
        return n + txn.rowcount

    return await db.run("console_delete_expired", _txn)


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


def new_link_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class SigninMail:
    """A composed (and DKIM-signed when possible) sign-in mail carrying ``token``'s link."""

    message_id: str
    user_id: str
    sender: str
    recipient: str
    subject: str
    smtp_message_id: str
    composed: bytes


async def queue_signin_mail(db: Database, token: str, mail: SigninMail, now: datetime,
                            ttl: timedelta = LOGIN_LINK_TTL) -> None:
    """Store the one-time link and queue its mail in one transaction: a link never exists
    without its mail, nor a mail with a link that was not stored. The mail is queued exactly
    like a reviewer notification (:mod:`e2a.store.notifications`): a ``messages`` row
    (outbound, type ``signin``, no agent) and one ``smtp`` recipient row, so the relay worker
    sends it with its usual retries; NOTIFY wakes it."""

    async def _txn(txn: Txn) -> None:
        await txn.execute(
            "INSERT INTO console_login_links (token_hash, user_id, expires_at) VALUES (%s, %s, %s)",
            (token_hash(token), mail.user_id, now + ttl),
        )
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, type, status, sender, subject, to_addrs,"
            " cc_addrs, bcc_addrs, smtp_message_id, composed, method, delivery_status, created_at)"
            " VALUES (%s, NULL, %s, 'outbound', %s, 'sent', %s, %s, %s, '[]', '[]', %s, %s, 'smtp', 'queued', %s)",
            (mail.message_id, mail.user_id, SIGNIN_MAIL_TYPE, mail.sender, mail.subject,
             json.dumps([mail.recipient]), mail.smtp_message_id, mail.composed, now),
        )
        await txn.execute(
            "INSERT INTO outbound_recipients (message_id, address, kind, route, status, queued_at, updated_at,"
            " next_attempt_at) VALUES (%s, %s, 'to', 'smtp', 'queued', %s, %s, %s)",
            (mail.message_id, mail.recipient, now, now, now),
        )
        await txn.notify(CHANNEL_OUTBOUND, mail.message_id)

    await db.run("console_signin_mail", _txn)


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
