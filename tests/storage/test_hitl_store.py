"""The HITL store on real PostgreSQL: held rows as models, the pending count, conditional
transitions, and retention never touching a pending hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest_twisted

from twisted.internet.task import Clock

from e2a.config import RetentionConfig
from e2a.retention import RetentionService
from e2a.store import approvals
from tests.support.apiserver import insert_user_with_key

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def _seed(db) -> str:
    user_id, _ = await insert_user_with_key(db)
    await db.execute("INSERT INTO domains (domain, is_shared, verified) VALUES ('agents.test', TRUE, TRUE)")
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES ('a@agents.test', %s,"
        " 'agents.test', 'local', 'none')",
        (user_id,),
    )
    return user_id


async def _held(db, user_id: str, mid: str, *, age: str = "1 hour", expires: datetime = NOW, status="pending_approval"):
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, type, status, subject, to_addrs, cc_addrs,"
        " bcc_addrs, body_text, body_html, attachments, approval_expires_at, hitl_expiration_action, created_at)"
        " VALUES (%s, 'a@agents.test', %s, 'outbound', 'send', %s, 'subj', %s, '[]', '[]', 'text', '', %s, %s,"
        f" 'reject', now() - interval '{age}')",
        (mid, user_id, status, json.dumps(["b@example.org"]),
         json.dumps([{"filename": "f", "content_type": "text/plain", "data": "eA=="}]), expires),
    )


@pytest_twisted.ensureDeferred
async def test_held_row_reads_as_frozen_model_and_counts_as_pending(db):
    """get_held maps the row (empty HTML → None, attachments kept base64); count_pending counts."""
    user_id = await _seed(db)
    await _held(db, user_id, "msg_" + "a" * 32)
    await _held(db, user_id, "msg_" + "b" * 32, status="rejected")
    held = await approvals.get_held(db, "msg_" + "a" * 32)
    assert held is not None and held.is_pending and held.agent_address == "a@agents.test"
    assert held.to == ("b@example.org",) and held.cc == () and held.body_text == "text" and held.body_html is None
    assert held.attachments[0].data == "eA==" and held.expiration_action == "reject"
    assert await approvals.get_held(db, "msg_" + "c" * 32) is None
    assert await approvals.count_pending(db) == 1


@pytest_twisted.ensureDeferred
async def test_reject_is_one_conditional_update_that_scrubs(db):
    """reject_txn changes a pending row once (bodies NULL); a second call changes nothing."""
    user_id = await _seed(db)
    mid = "msg_" + "d" * 32
    await _held(db, user_id, mid)

    async def reject(txn):
        return await approvals.reject_txn(txn, mid, status="rejected", reason="no", now=NOW)

    assert await db.run("t", reject) is True
    assert await db.run("t", reject) is False
    row = await db.fetchone("SELECT status, body_text, body_html, attachments FROM messages WHERE id = %s", (mid,))
    assert row == {"status": "rejected", "body_text": None, "body_html": None, "attachments": None}


@pytest_twisted.ensureDeferred
async def test_retention_never_deletes_a_pending_hold(db):
    """An old hold is kept even past its window (the worker has not ended it yet); once
    terminal and old it goes."""
    user_id = await _seed(db)
    await _held(db, user_id, "msg_" + "e" * 32, age="90 days", expires=NOW - timedelta(days=80))
    await _held(db, user_id, "msg_" + "f" * 32, age="90 days", status="expired_rejected")
    await RetentionService(db, RetentionConfig(days=30, sweep_interval=3600), Clock()).sweep_once()
    left = [r["id"] for r in await db.fetchall("SELECT id FROM messages")]
    assert left == ["msg_" + "e" * 32]
