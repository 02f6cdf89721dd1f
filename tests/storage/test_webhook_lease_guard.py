"""A webhook attempt's outcome is written only while the row still carries the lease the
attempt was taken with (e2a.store.deliveries: the lease's expiry is the fencing token).

An attempt can outlive its lease (a stalled process, a receiver slower than the lease); its
job is then claimed again. Guarded only by the attempt count, the stale attempt's finishing
write used to overwrite the new attempt's state and clear its lease (the agent's slot count
then missed a running attempt); and a webhook re-enabled while a retried attempt was in
flight reset the count, so that attempt's 2xx was dropped and the message POSTed again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest_twisted

from e2a.store import agents, deliveries
from e2a.store.database import Database
from tests.storage.storehelpers import agent_with_due_jobs

LEASE = 60.0
LIMIT = 4
URL = "https://hook.example/in"


async def _job(db: Database, n: int = 1) -> tuple[str, str]:
    """An agent with ``n`` jobs due an hour ago (``dlv_00`` the oldest); returns (user, agent)."""
    return await agent_with_due_jobs(db, n, due_ago_seconds=3600)


async def _row(db: Database, delivery_id: str = "dlv_00") -> dict:
    return await db.fetchone(
        "SELECT status, attempts, leased_until, last_error, last_status_code FROM deliveries WHERE id = %s",
        (delivery_id,),
    )


async def _stale_and_current(db: Database) -> tuple[deliveries.ClaimedJob, deliveries.ClaimedJob, datetime]:
    """The job claimed by a first attempt, whose lease then ran out, and claimed again."""
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    [stale] = await deliveries.claim_due(db, t0, 1, LEASE, LIMIT)
    later = t0 + timedelta(seconds=LEASE + 1)
    [current] = await deliveries.claim_due(db, later, 1, LEASE, LIMIT)
    assert stale.id == current.id == "dlv_00"
    assert stale.lease_until is not None and current.lease_until is not None
    assert current.lease_until > stale.lease_until
    return stale, current, later


@pytest_twisted.ensureDeferred
async def test_a_claimed_job_carries_the_lease_the_claim_wrote(db):
    await _job(db)
    now = datetime.now(UTC)
    [job] = await deliveries.claim_due(db, now, 1, LEASE, LIMIT)
    assert job.lease_until == now + timedelta(seconds=LEASE)
    assert (await _row(db))["leased_until"] == job.lease_until


@pytest_twisted.ensureDeferred
async def test_an_attempt_that_outlived_its_lease_writes_nothing_over_the_new_holder(db):
    """Every finishing write of the stale attempt matches nothing: the row keeps the new
    attempt's lease (so the agent's slot count still sees it) and its state."""
    await _job(db)
    stale, current, later = await _stale_and_current(db)
    before = await _row(db)
    assert before["leased_until"] == current.lease_until

    assert not await deliveries.record_retry(db, stale, 500, "HTTP 500", URL, later, later + timedelta(minutes=1))
    assert not await deliveries.record_failed(db, stale, 500, "HTTP 500", later, attempted=True, url=URL)
    assert not await deliveries.record_failed(db, stale, None, "message or agent gone", later, attempted=False)
    assert not await deliveries.record_paused(db, stale)
    assert not await deliveries.release_lease(db, stale)
    assert not await deliveries.record_gone(db, stale, URL, later)
    assert not await deliveries.record_delivered(db, stale, 200, URL, later)
    assert await deliveries.record_delivered_and_claim_next(db, stale, 200, URL, later, LEASE, LIMIT) == (False, None)
    assert await _row(db) == before
    agent = await db.fetchone("SELECT webhook_status FROM agents WHERE id = %s", (current.agent_id,))
    assert agent["webhook_status"] == "active"  # the stale 410 disabled nothing

    # The current holder's outcome is written.
    assert await deliveries.record_delivered(db, current, 200, URL, later)
    row = await _row(db)
    assert (row["status"], row["attempts"], row["leased_until"]) == ("delivered", 1, None)


@pytest_twisted.ensureDeferred
async def test_a_stale_2xx_does_not_hand_on_a_slot_it_no_longer_holds(db):
    """Before: the stale attempt's 2xx marked the row delivered, cleared the current attempt's
    lease and leased the agent's next job; with the current attempt still running, the agent
    had one attempt in flight more than its count said."""
    _user, agent = await _job(db, 2)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    [stale] = await deliveries.claim_due(db, t0, 1, LEASE, 1)
    later = t0 + timedelta(seconds=LEASE + 1)
    [current] = await deliveries.claim_due(db, later, 1, LEASE, 1)
    assert current.id == stale.id
    assert await deliveries.record_delivered_and_claim_next(db, stale, 200, URL, later, LEASE, 1) == (False, None)
    leased = await db.fetchall(
        "SELECT id FROM deliveries WHERE agent_id = %s AND leased_until > %s ORDER BY id", (agent, later)
    )
    assert [r["id"] for r in leased] == ["dlv_00"]


@pytest_twisted.ensureDeferred
async def test_an_attempt_whose_lease_ran_out_unclaimed_still_records_its_outcome(db):
    """Nobody leased the job again, so the row still carries the attempt's lease (run out but
    unchanged): the outcome is the only one there is and is written."""
    await _job(db)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    [job] = await deliveries.claim_due(db, t0, 1, LEASE, LIMIT)
    later = t0 + timedelta(seconds=LEASE * 3)
    assert await deliveries.record_retry(db, job, 503, "HTTP 503", URL, later, later + timedelta(minutes=5))
    row = await _row(db)
    assert (row["status"], row["attempts"], row["leased_until"], row["last_status_code"]) == ("pending", 1, None, 503)


@pytest_twisted.ensureDeferred
async def test_a_retried_attempt_in_flight_when_the_webhook_is_re_enabled_is_recorded_once(db):
    """A 410 from one attempt pauses the agent's other jobs while their attempts run on; a PUT
    that re-enables the webhook makes them pending again with attempts reset to 0 and their
    live leases kept. Before: a running attempt that was a retry (taken at attempts = 1) then
    matched nothing with its 2xx, so the row stayed pending, and once its lease ran out the
    message was POSTed again. Now its lease matches and the row is delivered."""
    user_id, agent = await _job(db, 2)
    now = datetime.now(UTC)
    # dlv_00 failed once already (attempts = 1) and is due again.
    first = await deliveries.claim_due(db, now, 1, LEASE, LIMIT)
    assert [j.id for j in first] == ["dlv_00"]
    assert await deliveries.record_retry(db, first[0], 500, "HTTP 500", URL, now, now)
    claimed = {j.id: j for j in await deliveries.claim_due(db, now, 2, LEASE, LIMIT)}
    retry, gone = claimed["dlv_00"], claimed["dlv_01"]
    assert retry.attempts == 1

    assert await deliveries.record_gone(db, gone, URL, now)
    assert (await _row(db))["status"] == "paused"
    await agents.update_agent(db, user_id, agent, agents.AgentUpdate(webhook_url=URL))
    reenabled = await _row(db)
    assert (reenabled["status"], reenabled["attempts"], reenabled["leased_until"]) == (
        "pending", 0, retry.lease_until,
    )

    assert await deliveries.record_delivered(db, retry, 200, URL, now)
    row = await _row(db)
    assert (row["status"], row["leased_until"]) == ("delivered", None)
    later = now + timedelta(seconds=LEASE * 2)
    assert await deliveries.claim_due(db, later, LIMIT, LEASE, LIMIT) == []
