"""``webhooks.max_concurrency_per_agent`` across processes (mail.md §4: at most that many
attempts in flight per agent). Each test plays two processes with two PostgreSQL sessions:
one holds a transaction open at the point where a race used to let the other lease past the
limit (its leases not yet committed, so invisible to the other's count); the other now waits
for the agent's lock and counts those leases once they are committed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest_twisted

from twisted.internet import defer

from e2a.store import deliveries
from e2a.store.database import Database, Writes
from e2a.store.events import CHANNEL_DELIVERY
from tests.storage.storehelpers import agent_with_due_jobs, user_with_agent
from tests.support.waiting import wait_for, wait_for_advisory_lock_wait

LEASE = 60.0
LIMIT = 4
SLOT_LOCK_CLASS = 0x65326177  # schema/0008: the agents' slot locks


async def _backlog(db: Database, n: int) -> str:
    """An agent with ``n`` due, unleased jobs; returns its id."""
    _user, agent = await agent_with_due_jobs(db, n)
    return agent


async def _leased(db: Database, agent: str) -> int:
    row = await db.fetchone(
        "SELECT count(*) AS n FROM deliveries WHERE agent_id = %s AND status = 'pending' AND leased_until > now()",
        (agent,),
    )
    return row["n"]


class _Open:
    """A transaction of "the other process", held open until :meth:`commit`."""

    def __init__(self, db: Database, fn) -> None:
        self.result: defer.Deferred = defer.Deferred()
        self._gate: defer.Deferred = defer.Deferred()

        async def txn(t):
            value = await fn(t)
            self.result.callback(value)
            await self._gate
            return value

        self.done = defer.ensureDeferred(db.run("other_process", txn))

    async def commit(self):
        self._gate.callback(None)
        return await self.done


@pytest_twisted.ensureDeferred
async def test_a_claim_while_another_process_claims_the_same_agent_leases_nothing_more(db):
    """Before: the second claim skipped the rows the first had locked, counted none of its
    uncommitted leases and leased LIMIT more of the backlog (8 in flight). Now it finds the
    agent's lock taken and leaves the agent to a later claim (a claim never waits for a lock);
    after the first commits, a claim counts its leases. (A claim locks the 4 × limit oldest
    due rows it scans, so the backlog is larger than that, as in the race between two
    autocommit claims.)"""
    agent = await _backlog(db, 40)
    now = datetime.now(UTC)
    other = _Open(db, lambda t: deliveries.claim_due(t, now, LIMIT, LEASE, LIMIT))
    assert len(await other.result) == LIMIT
    assert await deliveries.claim_due(db, now, LIMIT, LEASE, LIMIT) == []
    await other.commit()
    assert await deliveries.claim_due(db, now, LIMIT, LEASE, LIMIT) == []
    assert await _leased(db, agent) == LIMIT


@pytest_twisted.ensureDeferred
async def test_the_free_slot_count_sees_leases_committed_after_its_statement_began(db, db_dsn):
    """The free-slot count runs on a snapshot taken after the agent's lock was granted, not on
    the calling statement's own (taken before it waited, as an accept's insert does): leases
    the lock's previous holder committed meanwhile are counted."""
    agent = await _backlog(db, 10)
    now = datetime.now(UTC)

    async def claim_holding_a_gate(t):
        await t.execute("SELECT pg_advisory_xact_lock(4242)")
        return await deliveries.claim_due(t, now, 10, LEASE, LIMIT)

    other = _Open(db, claim_holding_a_gate)
    assert len(await other.result) == LIMIT
    # This statement's snapshot is taken now, while the other's leases are uncommitted; it
    # then waits for the gate, which the other releases only by committing.
    free = defer.ensureDeferred(db.fetchone(
        "SELECT e2a_webhook_slots_free(%s, %s, %s, NULL) AS n FROM (SELECT pg_advisory_xact_lock(4242) OFFSET 0) gate",
        (agent, LIMIT, now),
    ))
    await wait_for_advisory_lock_wait(db_dsn)
    await other.commit()
    assert (await free)["n"] == 0


class _Listener:
    """A plain session LISTENing on the delivery channel (a worker of another process)."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg2.connect(dsn)
        self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL_DELIVERY}")

    def payloads(self) -> list[str]:
        self._conn.poll()
        return [n.payload for n in self._conn.notifies]

    def close(self) -> None:
        self._conn.close()


@pytest_twisted.ensureDeferred
async def test_a_fresh_lease_is_refused_while_another_process_leases_for_the_agent(db, db_dsn):
    """The accept's count of the agent's leases was read before its transaction; another
    process leasing meanwhile wins: the accept's insert waits for the agent's lock, counts
    the other's committed leases, and commits the job queued, announced on the delivery
    channel; the transaction reports the lease as not granted."""
    agent = await _backlog(db, 0)
    now = datetime.now(UTC)
    for mid in ("msg_new", "msg_a", "msg_b", "msg_c", "msg_d"):
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status)"
            " SELECT %s, id, user_id, 'inbound', 'unread' FROM agents WHERE id = %s",
            (mid, agent),
        )

    async def other_accept(t):
        # Another process's accept: the agent's lock, then LIMIT fresh jobs leased, uncommitted.
        await t.execute("SELECT e2a_webhook_slots_free(%s, %s, %s, NULL)", (agent, LIMIT, now))
        for mid in ("msg_a", "msg_b", "msg_c", "msg_d"):
            await t.execute(
                "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at, leased_until)"
                " VALUES (%s, %s, %s, 'https://hook.example/in', 'pending', now(), %s)",
                ("dlv_" + mid, mid, agent, now + timedelta(seconds=LEASE)),
            )

    other = _Open(db, other_accept)
    await other.result
    listener = _Listener(db_dsn)
    lease = deliveries.FreshLease(now + timedelta(seconds=LEASE), now, LIMIT)
    seen = {}

    async def accept(batch):
        seen["batch"] = batch
        await deliveries.insert_job_txn(batch, "dlv_new", "msg_new", agent, "https://hook.example/in",
                                        paused=False, lease=lease)
        await batch.fetchall("SELECT 1")  # a read after the writes are queued: they are not sent yet

    accepted = defer.ensureDeferred(db.run_batched("accept_inbound", accept))
    await wait_for_advisory_lock_wait(db_dsn)
    await other.commit()
    await accepted
    assert not deliveries.lease_granted(seen["batch"], "dlv_new")
    row = await db.fetchone("SELECT status, leased_until FROM deliveries WHERE id = 'dlv_new'")
    assert row["status"] == "pending" and row["leased_until"] is None
    await wait_for(lambda: agent in listener.payloads(), timeout=10, step=0.02)
    listener.close()
    assert await _leased(db, agent) == LIMIT


@pytest_twisted.ensureDeferred
async def test_a_fresh_lease_is_refused_when_other_processes_filled_the_slots(db):
    """The accept's stale count said a slot was free; PostgreSQL's count under the lock says
    the agent has LIMIT live leases: no lease, the job queued."""
    agent = await _backlog(db, 6)
    now = datetime.now(UTC)
    assert len(await deliveries.claim_due(db, now, 10, LEASE, LIMIT)) == LIMIT
    lease = deliveries.FreshLease(now + timedelta(seconds=LEASE), now, LIMIT)

    assert not await _fresh(db, agent, "dlv_03b", lease)
    assert await _leased(db, agent) == LIMIT
    # A slot frees up: the next fresh job gets it.
    await db.execute("UPDATE deliveries SET leased_until = NULL WHERE id = 'dlv_00'")
    assert await _fresh(db, agent, "dlv_03c", lease)
    assert await _leased(db, agent) == LIMIT


async def _fresh(db: Database, agent: str, delivery_id: str, lease: deliveries.FreshLease) -> bool:
    """An accept's fresh job for ``agent`` (on message msg_3); whether its lease was granted."""
    batches = []

    async def insert(batch):
        batches.append(batch)
        await deliveries.insert_job_txn(batch, delivery_id, "msg_3", agent, "https://hook.example/in",
                                        paused=False, lease=lease)

    await db.run_batched("t", insert)
    return deliveries.lease_granted(batches[-1], delivery_id)


@pytest_twisted.ensureDeferred
async def test_leases_of_paused_jobs_still_in_flight_are_counted(db):
    """A 410 pauses the agent's other jobs while their attempts are still running with their
    leases; those attempts count against the limit."""
    agent = await _backlog(db, 6)
    now = datetime.now(UTC)
    assert len(await deliveries.claim_due(db, now, LIMIT, LEASE, LIMIT)) == LIMIT
    await db.execute("UPDATE deliveries SET status = 'paused', next_attempt_at = NULL WHERE agent_id = %s", (agent,))
    await db.execute(
        "UPDATE deliveries SET status = 'pending', next_attempt_at = now() - interval '1 minute'"
        " WHERE agent_id = %s AND leased_until IS NULL",
        (agent,),
    )
    assert await deliveries.claim_due(db, now, LIMIT, LEASE, LIMIT) == []


@pytest_twisted.ensureDeferred
async def test_fresh_leases_in_one_transaction_count_each_other(db):
    """Several copies for one agent in one accept (or one group commit): each count sees the
    leases the same transaction took before it."""
    user_id, agent = await user_with_agent(db)
    now = datetime.now(UTC)
    lease = deliveries.FreshLease(now + timedelta(seconds=LEASE), now, 2)
    for i in range(3):
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES (%s, %s, %s, 'inbound', 'unread')",
            (f"msg_{i}", agent, user_id),
        )
    seen = {}

    async def accept(batch):
        seen["batch"] = batch
        for i in range(3):
            await deliveries.insert_job_txn(batch, f"dlv_{i}", f"msg_{i}", agent, "https://hook.example/in",
                                            paused=False, lease=lease)

    await db.run_batched("accept_inbound", accept)
    granted = [deliveries.lease_granted(seen["batch"], f"dlv_{i}") for i in range(3)]
    assert granted == [True, True, False]
    assert await _leased(db, agent) == 2


@pytest_twisted.ensureDeferred
async def test_hand_on_needs_the_finishing_attempts_lease_to_be_live(db):
    """A finishing attempt hands its slot on only while its own lease is live (then every count
    under the lock counted it). One whose lease ran out was counted by nobody: handing on
    would add an attempt, so it leaves the next job to the claim."""
    agent = await _backlog(db, 3)
    now = datetime.now(UTC)
    (job,) = await deliveries.claim_due(db, now, 1, LEASE, LIMIT)
    later = now + timedelta(seconds=LEASE + 1)  # the attempt outlived its lease
    delivered, following = await deliveries.record_delivered_and_claim_next(
        db, job, 200, "https://hook.example/in", later, LEASE, LIMIT
    )
    assert delivered and following is None
    (job2,) = await deliveries.claim_due(db, later, 1, LEASE, LIMIT)
    delivered, following = await deliveries.record_delivered_and_claim_next(
        db, job2, 200, "https://hook.example/in", later, LEASE, LIMIT
    )
    assert delivered and following is not None and following.agent_id == agent



def test_locking_writes_go_after_the_others_in_lock_order():
    """A transaction's lock-taking writes are sent after its other writes (so it never holds
    an agent's lock while waiting for a row lock) and sorted by agent id (so two accepts
    waiting for the same agents' locks never wait for each other in a cycle), then the
    reports."""
    writes = Writes(
        [b"INSERT m1", b"INSERT m2"],
        [],
        [("b-bot@other.test", b"LEASE b1"), ("A-bot@agents.test", b"LEASE A"), ("b-bot@other.test", b"LEASE b2")],
        [b"SELECT 'k' AS key"],
    )
    assert writes.statements(b"SET LOCAL x").split(b";\n") == [
        b"SET LOCAL x", b"INSERT m1", b"INSERT m2", b"LEASE A", b"LEASE b1", b"LEASE b2", b"(SELECT 'k' AS key)",
    ]


@pytest_twisted.ensureDeferred
async def test_a_claim_leaves_the_callers_reserved_slots_free(db):
    """Slots this process reserved for fresh jobs whose accepts have not committed are not in
    the database yet: the claim leaves them free instead of leasing jobs it would give back
    (whose leases would meanwhile make those accepts find the agent full)."""
    agent = await _backlog(db, 10)
    now = datetime.now(UTC)
    jobs = await deliveries.claim_due(db, now, 10, LEASE, LIMIT, reserved={agent: 3, "other@x.test": 4})
    assert len(jobs) == 1
    assert await deliveries.claim_due(db, now, 10, LEASE, LIMIT, reserved={agent: 4}) == []
    assert len(await deliveries.claim_due(db, now, 10, LEASE, LIMIT)) == LIMIT - 1


@pytest_twisted.ensureDeferred
async def test_a_claim_waits_only_briefly_for_a_busy_agent_and_serves_the_others(db):
    """An agent whose lock is held (here by a transaction that never ends during the claim)
    gets nothing from the claim after ``CLAIM_LOCK_WAIT_MS``; the claim still leases the other
    agents' jobs instead of failing as a whole."""
    agent = await _backlog(db, 2)
    user_b, agent_b = await user_with_agent(db, "other@agents.test", email="b@example.com")
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES ('msg_b', %s, %s, 'inbound', 'unread')",
        (agent_b, user_b),
    )
    await db.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
        " VALUES ('dlv_b', 'msg_b', %s, 'https://hook.example/in', 'pending', now() - interval '1 minute')",
        (agent_b,),
    )
    now = datetime.now(UTC)
    other = _Open(db, lambda t: t.execute("SELECT e2a_webhook_slots_free(%s, 4, %s, NULL)", (agent, now)))
    await other.result
    assert [j.id for j in await deliveries.claim_due(db, now, 10, LEASE, LIMIT)] == ["dlv_b"]
    await other.commit()
    assert [j.id for j in await deliveries.claim_due(db, now, 10, LEASE, LIMIT)] == ["dlv_00", "dlv_01"]
