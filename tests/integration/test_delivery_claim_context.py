"""The claim carries each attempt's inputs (one round trip) and they match a separate load.

The worker no longer reads the message, agent and secrets in a second transaction: the claiming
statement returns them, and the secrets are opened through a SecretCache. These tests pin that
the carried context is exactly what the old separate load returned, that a secret rotation is
seen by the next claim despite the cache, and that a vanished message still comes back as a job
so the worker can fail it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest_twisted

from e2a.store import accounts, deliveries
from e2a.store.accounts import SecretCache
from tests.integration.test_webhook_delivery import _agent, _message, _user
from tests.support.apiserver import TEST_MASTER_KEY


@pytest_twisted.ensureDeferred
async def test_claimed_context_equals_separate_load_when_claimed(db):
    """The context carried by the claim equals the one read by the separate load transaction."""
    user_id, _key, secret = await _user(db)
    agent = await _agent(db, user_id, "http://127.0.0.1:9/hook")
    message_id, delivery_id = await _message(db, user_id, agent, secret)
    jobs = await deliveries.claim_due(db, datetime.now(UTC), 10, 60.0, 4)
    assert [(j.id, j.message_id, j.agent_id, j.attempts) for j in jobs] == [(delivery_id, message_id, agent, 0)]
    carried = await deliveries.load_attempt(db, jobs[0], TEST_MASTER_KEY, SecretCache())
    loaded = await deliveries.load_attempt(db, replace(jobs[0], row=None), TEST_MASTER_KEY)
    assert carried is not None and carried == loaded
    assert carried.secrets == [secret]


@pytest_twisted.ensureDeferred
async def test_rotated_secret_is_used_by_next_claim_with_cache(db):
    """A secret created after one claim signs first from the next claim on (the cache never hides it)."""
    user_id, _key, secret = await _user(db)
    agent = await _agent(db, user_id, "http://127.0.0.1:9/hook")
    cache = SecretCache()
    await _message(db, user_id, agent, secret)
    first = await deliveries.claim_due(db, datetime.now(UTC), 10, 60.0, 4)
    ctx = await deliveries.load_attempt(db, first[0], TEST_MASTER_KEY, cache)
    assert ctx is not None and ctx.secrets == [secret]
    _meta, newer = await accounts.create_signing_secret(db, TEST_MASTER_KEY, user_id, "rotated")
    await _message(db, user_id, agent, secret)
    second = await deliveries.claim_due(db, datetime.now(UTC), 10, 60.0, 4)
    ctx = await deliveries.load_attempt(db, second[0], TEST_MASTER_KEY, cache)
    assert ctx is not None and ctx.secrets == [newer, secret]


@pytest_twisted.ensureDeferred
async def test_claim_returns_job_without_context_when_message_gone(db):
    """A job whose message row vanished is still claimed, and its context is None."""
    user_id, _key, secret = await _user(db)
    agent = await _agent(db, user_id, "http://127.0.0.1:9/hook")
    message_id, delivery_id = await _message(db, user_id, agent, secret)
    await db.execute("UPDATE messages SET direction = 'outbound' WHERE id = %s", (message_id,))
    jobs = await deliveries.claim_due(db, datetime.now(UTC), 10, 60.0, 4)
    assert [j.id for j in jobs] == [delivery_id]
    assert await deliveries.load_attempt(db, jobs[0], TEST_MASTER_KEY, SecretCache()) is None


@pytest_twisted.ensureDeferred
async def test_record_delivered_marks_message_read_once_when_lease_held(db):
    """The single-statement record sets delivered + read, and a second record with the old attempts matches nothing."""
    user_id, _key, secret = await _user(db)
    agent = await _agent(db, user_id, "http://127.0.0.1:9/hook")
    message_id, delivery_id = await _message(db, user_id, agent, secret)
    now = datetime.now(UTC)
    (job,) = await deliveries.claim_due(db, now, 10, 60.0, 4)
    assert await deliveries.record_delivered(db, job, 204, "http://127.0.0.1:9/hook", now) is True
    assert await deliveries.record_delivered(db, job, 204, "http://127.0.0.1:9/hook", now) is False
    d = await db.fetchone("SELECT status, attempts, last_status_code, leased_until FROM deliveries WHERE id = %s",
                          (delivery_id,))
    assert d == {"status": "delivered", "attempts": 1, "last_status_code": 204, "leased_until": None}
    m = await db.fetchone("SELECT status, read_at FROM messages WHERE id = %s", (message_id,))
    assert m is not None and m["status"] == "read" and m["read_at"] == now
