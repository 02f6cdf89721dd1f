"""Delivery store contract on PostgreSQL: job insertion (pending, leased or paused) and the
latest delivery of a message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest_twisted

from e2a.store import deliveries
from e2a.store.models import Delivery
from tests.storage.storehelpers import agent_with_due_jobs, user_with_agent


async def _message(db, user_id, agent, mid="msg_1"):
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES (%s, %s, %s, 'inbound', 'unread')",
        (mid, agent, user_id),
    )


@pytest_twisted.ensureDeferred
async def test_insert_job_txn_pending_is_due_now_and_optionally_leased(db):
    """A pending job is due at once; asking for a lease with the agent's slots free, it is
    leased to this process, and the transaction reports it granted."""
    user_id, agent = await user_with_agent(db)
    await _message(db, user_id, agent)
    until = datetime.now(UTC) + timedelta(minutes=5)
    lease = deliveries.FreshLease(until, datetime.now(UTC), 4)

    batches = []

    async def insert(batch):
        batches.append(batch)
        await deliveries.insert_job_txn(batch, "dlv_1", "msg_1", agent, "https://hook.example/in",
                                        paused=False, lease=lease)

    await db.run_batched("t", insert)
    assert deliveries.lease_granted(batches[-1], "dlv_1")
    row = await db.fetchone("SELECT status, next_attempt_at, leased_until, webhook_url FROM deliveries")
    assert row["status"] == "pending" and row["next_attempt_at"] is not None
    assert row["leased_until"] == until and row["webhook_url"] == "https://hook.example/in"


@pytest_twisted.ensureDeferred
async def test_insert_job_txn_paused_has_no_due_time_nor_lease(db):
    """While the webhook is disabled the job is paused: not due, never leased."""
    user_id, agent = await user_with_agent(db)
    await _message(db, user_id, agent)
    await db.run("t", deliveries.insert_job_txn, "dlv_1", "msg_1", agent, "https://hook.example/in",
                 paused=True,
                 lease=deliveries.FreshLease(datetime.now(UTC), datetime.now(UTC), 4))
    row = await db.fetchone("SELECT status, next_attempt_at, leased_until FROM deliveries")
    assert dict(row) == {"status": "paused", "next_attempt_at": None, "leased_until": None}


@pytest_twisted.ensureDeferred
async def test_latest_for_message_returns_the_newest_delivery(db):
    """The inbox detail shows the newest delivery of the message, None without one."""
    user_id, agent = await user_with_agent(db)
    await _message(db, user_id, agent)
    assert await deliveries.latest_for_message(db, "msg_1") is None
    for n, age in ((1, "2 minutes"), (2, "1 minute")):
        await db.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, status, created_at)"
            f" VALUES (%s, 'msg_1', %s, 'failed', now() - interval '{age}')",
            (f"dlv_{n}", agent),
        )
    latest = await deliveries.latest_for_message(db, "msg_1")
    assert isinstance(latest, Delivery) and latest.id == "dlv_2" and latest.status == "failed"


@pytest_twisted.ensureDeferred
async def test_a_claim_skips_the_jobs_another_transaction_holds(db, db_dsn):
    """Two claims at once never lease one job: each locks the rows it leases ``FOR UPDATE SKIP
    LOCKED``, so a row another transaction holds is passed over, and the job after it taken."""
    await agent_with_due_jobs(db, 3)
    locker = psycopg2.connect(db_dsn)
    try:
        with locker.cursor() as cur:  # a concurrent claim holding the oldest due job's row
            cur.execute("SELECT id FROM deliveries WHERE id = 'dlv_00' FOR UPDATE")
            jobs = await deliveries.claim_due(db, datetime.now(UTC), 2, 60.0, 4)
        locker.rollback()
    finally:
        locker.close()
    assert [j.id for j in jobs] == ["dlv_01", "dlv_02"]
    held = await db.fetchone("SELECT leased_until FROM deliveries WHERE id = 'dlv_00'")
    assert held["leased_until"] is None
