"""Retention sweep on real PostgreSQL."""

from __future__ import annotations

import time

import pytest_twisted

from twisted.internet.task import Clock

from e2a.config import RetentionConfig
from e2a.retention import RetentionService
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
