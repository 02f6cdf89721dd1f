"""Retention sweep on real PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest_twisted

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from e2a.config import RetentionConfig
from e2a.retention import RetentionService
from e2a.store import sessions
from e2a.store.database import DatabaseUnavailable
from tests.support.apiserver import insert_user_with_key


@pytest_twisted.ensureDeferred
async def test_sweep_deletes_old_mail_but_keeps_holds_and_recent(db):
    """Old inbound and released outbound mail goes; held and recent mail stays."""
    user_id, _ = await insert_user_with_key(db)
    await db.execute("INSERT INTO domains (domain, is_shared, verified) VALUES ('agents.test', TRUE, TRUE)")
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES ('a@agents.test', %s,"
        " 'agents.test', 'local', 'none')",
        (user_id,),
    )
    rows = [
        ("msg_old_in", "inbound", "unread", "40 days"),
        ("msg_new_in", "inbound", "unread", "1 day"),
        ("msg_old_out", "outbound", "sent", "40 days"),
        ("msg_old_held", "outbound", "pending_approval", "40 days"),
    ]
    for mid, direction, status, age in rows:
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, created_at)"
            f" VALUES (%s, 'a@agents.test', %s, %s, %s, now() - interval '{age}')",
            (mid, user_id, direction, status),
        )
    await db.execute(
        "INSERT INTO rate_limits (bucket, window_start, count) VALUES ('x', now() - interval '3 days', 1)"
    )
    clock = Clock()
    clock.advance(time.time())  # the windows were written relative to the database clock
    service = RetentionService(db, RetentionConfig(days=30, sweep_interval=3600), clock)
    await service.sweep_once()
    left = {r["id"] for r in await db.fetchall("SELECT id FROM messages")}
    assert left == {"msg_new_in", "msg_old_held"}
    assert await db.fetchall("SELECT 1 FROM rate_limits") == []


@pytest_twisted.ensureDeferred
async def test_sweep_deletes_expired_console_sessions_and_sign_in_links(db):
    """Sessions and sign-in links expired more than the grace ago go (they can never be used
    again); live ones stay and still work, and so do ones expired within the grace (another
    node's clock may be behind)."""
    user_id, _ = await insert_user_with_key(db, email="console@example.com")
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    gone = now - sessions.EXPIRED_GRACE - timedelta(seconds=1)  # expiry of what goes
    kept = now - sessions.EXPIRED_GRACE + timedelta(seconds=1)  # expiry of what stays
    await sessions.create_session(db, user_id, gone - sessions.SESSION_TTL)
    recent_session, _ = await sessions.create_session(db, user_id, kept - sessions.SESSION_TTL)
    live_session, _ = await sessions.create_session(db, user_id, now - timedelta(days=1))
    await sessions.create_login_link(db, "console@example.com", gone - sessions.LOGIN_LINK_TTL)
    used_link = await sessions.create_login_link(db, "console@example.com", gone - sessions.LOGIN_LINK_TTL)
    assert await sessions.consume_login_link(db, used_link, gone - timedelta(minutes=1)) == user_id
    recent_link = await sessions.create_login_link(db, "console@example.com", kept - sessions.LOGIN_LINK_TTL)
    live_link = await sessions.create_login_link(db, "console@example.com", now - timedelta(minutes=5))

    clock = Clock()
    clock.advance(now.timestamp())
    await RetentionService(db, RetentionConfig(days=30, sweep_interval=3600), clock).sweep_once()

    stored_sessions = {r["token_hash"] for r in await db.fetchall("SELECT token_hash FROM console_sessions")}
    assert stored_sessions == {sessions.token_hash(t) for t in (recent_session, live_session)}
    stored_links = {r["token_hash"] for r in await db.fetchall("SELECT token_hash FROM console_login_links")}
    assert stored_links == {sessions.token_hash(t) for t in (recent_link, live_link)}
    assert (await sessions.get_session(db, live_session, now)).user_id == user_id
    assert await sessions.get_session(db, recent_session, now) is None  # expired, only not yet deleted
    assert await sessions.consume_login_link(db, live_link, now) == user_id


@pytest_twisted.ensureDeferred
async def test_sign_out_sweeps_expired_sessions_too(db):
    user_id, _ = await insert_user_with_key(db)
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    await sessions.create_session(db, user_id, now - sessions.EXPIRED_GRACE - sessions.SESSION_TTL - timedelta(seconds=1))
    other, _ = await sessions.create_session(db, user_id, now - timedelta(hours=1))
    leaving, _ = await sessions.create_session(db, user_id, now - timedelta(hours=1))

    await sessions.revoke_session(db, leaving, now)

    stored = {r["token_hash"] for r in await db.fetchall("SELECT token_hash FROM console_sessions")}
    assert stored == {sessions.token_hash(other), sessions.token_hash(leaving)}
    assert await sessions.get_session(db, leaving, now) is None
    assert (await sessions.get_session(db, other, now)).user_id == user_id


class _Unreachable:
    """A database whose every call fails as an unreachable server's does."""

    def __getattr__(self, name: str):
        async def fail(*args, **kwargs):
            raise DatabaseUnavailable("cannot connect to the database: connection refused")

        return fail


@pytest_twisted.ensureDeferred
async def test_sweeps_during_an_outage_log_it_once_and_its_end(db):
    """While the database is unreachable a sweep stops at its first step, and only the first
    such sweep logs (a warning, no traceback); the first full sweep afterwards says so."""
    service = RetentionService(db, RetentionConfig(days=30, sweep_interval=3600), Clock())
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.db = _Unreachable()
        await service.sweep_once()
        await service.sweep_once()
        service.db = db
        await service.sweep_once()
        await service.sweep_once()
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e["log_level"].name, formatEvent(e)) for e in events if e.get("log_namespace") == "e2a.claimloop"]
    assert lines == [
        ("warn", "retention sweep failed: cannot connect to the database: connection refused; retrying, "
                 "and logged again once it works"),
        ("info", "retention sweep works again, after 2 failed attempts"),
    ]
    assert not [e for e in events if e.get("log_failure") or e.get("isError")]
