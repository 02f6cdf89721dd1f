"""The 2xx record leases the agent's next due job in the same statement (the slot hand-on).

``deliveries.record_delivered_and_claim_next`` replaces the record + claim round trips of a busy
agent's slot with one. These tests pin the statement's rules on the real database (it leases
only after a matching guarded update, one job of the same agent, due and unleased, oldest first,
within the per-agent limit not counting the finishing row, all or nothing) and the worker's use
of it against a loopback sink: a backlog is delivered exactly once, never more than
``max_concurrency_per_agent`` at a time, with far fewer claim statements.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.config import WebhooksConfig
from e2a.delivery import worker
from e2a.delivery.worker import DeliveryService
from e2a.mailauth.dns import DnsClient
from e2a.store import deliveries
from e2a.store.accounts import SecretCache
from e2a.store.database import Database
from tests.integration.test_webhook_delivery import _agent, _clock, _message, _sink, _user
from tests.support.apiserver import TEST_MASTER_KEY

URL = "http://127.0.0.1:9/hook"
LEASE = 60.0


async def _backlog(db: Database, n: int, local: str = "bot", user: tuple[str, str] | None = None) -> dict[str, Any]:
    """An agent with ``n`` due deliveries, due one second apart (oldest first) before ``now``."""
    if user is None:
        user_id, _key, secret = await _user(db)
    else:
        user_id, secret = user
    agent = await _agent(db, user_id, URL, local=local)
    now = datetime.now(UTC) + timedelta(seconds=1)
    ids = []
    for i in range(n):
        message_id, delivery_id = await _message(db, user_id, agent, secret)
        await db.execute(
            "UPDATE deliveries SET next_attempt_at = %s WHERE id = %s", (now - timedelta(seconds=n - i), delivery_id)
        )
        ids.append((message_id, delivery_id))
    return {"user": (user_id, secret), "agent": agent, "now": now, "ids": ids, "secret": secret}


async def _row(db: Database, delivery_id: str) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT status, attempts, leased_until, last_status_code FROM deliveries WHERE id = %s", (delivery_id,)
    )
    assert row is not None
    return row


async def _message_status(db: Database, message_id: str) -> str:
    row = await db.fetchone("SELECT status FROM messages WHERE id = %s", (message_id,))
    assert row is not None
    return row["status"]


async def _claim_one(db: Database, now: datetime, per_agent: int = 4) -> deliveries.ClaimedJob:
    (job,) = await deliveries.claim_due(db, now, 1, LEASE, per_agent)
    return job


# ---------------------------------------------------------------- the statement


@pytest_twisted.ensureDeferred
async def test_claim_next_leases_oldest_due_job_of_agent_with_context(db):
    """Delivered + read, and the agent's oldest due job comes back leased with the same context a claim carries."""
    b = await _backlog(db, 3)
    (m1, d1), (_m2, d2), (_m3, d3) = b["ids"]
    now = b["now"]
    job = await _claim_one(db, now)
    assert job.id == d1
    delivered, nxt = await deliveries.record_delivered_and_claim_next(db, job, 200, URL, now, LEASE, 4)
    assert delivered is True and nxt is not None
    assert (nxt.id, nxt.agent_id, nxt.attempts) == (d2, b["agent"], 0)
    assert await _row(db, d1) == {"status": "delivered", "attempts": 1, "leased_until": None, "last_status_code": 200}
    assert await _message_status(db, m1) == "read"
    assert (await _row(db, d2))["leased_until"] == now + timedelta(seconds=LEASE)
    assert (await _row(db, d3))["leased_until"] is None
    carried = await deliveries.load_attempt(db, nxt, TEST_MASTER_KEY, SecretCache())
    loaded = await deliveries.load_attempt(db, replace(nxt, row=None), TEST_MASTER_KEY)
    assert carried is not None and carried == loaded and carried.secrets == [b["secret"]]


@pytest_twisted.ensureDeferred
async def test_claim_next_leases_nothing_when_lease_lost(db):
    """A guarded update that matches nothing (a lease that is no longer the row's, or already
    recorded) leases nothing."""
    b = await _backlog(db, 3)
    (m1, d1), (_m2, d2), (_m3, d3) = b["ids"]
    now = b["now"]
    job = await _claim_one(db, now)
    stale = replace(job, lease_until=job.lease_until - timedelta(seconds=1))
    assert await deliveries.record_delivered_and_claim_next(db, stale, 200, URL, now, LEASE, 4) == (False, None)
    assert (await _row(db, d1))["status"] == "pending"
    assert await _message_status(db, m1) == "unread"
    assert await deliveries.record_delivered(db, job, 200, URL, now) is True
    assert await deliveries.record_delivered_and_claim_next(db, job, 200, URL, now, LEASE, 4) == (False, None)
    assert (await _row(db, d2))["leased_until"] is None and (await _row(db, d3))["leased_until"] is None


@pytest_twisted.ensureDeferred
async def test_claim_next_respects_limit_without_counting_finished_job(db):
    """Other leased rows count toward max_per_agent; the finishing row does not (its slot is handed on)."""
    b = await _backlog(db, 7)
    ids = [d for _m, d in b["ids"]]
    now = b["now"]
    claimed = await deliveries.claim_due(db, now, 10, LEASE, 4)
    assert [j.id for j in claimed] == ids[:4]
    # Three others leased + the finishing one: only the finishing one is left out, 3 < 4.
    _ok, e = await deliveries.record_delivered_and_claim_next(db, claimed[0], 200, URL, now, LEASE, 4)
    assert e is not None and e.id == ids[4]
    _ok, f = await deliveries.record_delivered_and_claim_next(db, claimed[1], 200, URL, now, LEASE, 4)
    assert f is not None and f.id == ids[5]
    # A lower limit (or another process's leases): 3 others in flight, not below 3.
    assert await deliveries.record_delivered_and_claim_next(db, claimed[2], 200, URL, now, LEASE, 3) == (True, None)
    assert (await _row(db, ids[2]))["status"] == "delivered"
    assert (await _row(db, ids[6]))["leased_until"] is None
    leased = await db.fetchone(
        "SELECT count(*) AS n FROM deliveries WHERE status = 'pending' AND leased_until > %s", (now,)
    )
    assert leased["n"] == 3


@pytest_twisted.ensureDeferred
async def test_claim_next_skips_other_agents_undue_leased_and_locked_jobs(db, db_dsn):
    """Never another agent's job, a job not yet due, one leased elsewhere, a row locked by another claim, or itself."""
    a = await _backlog(db, 5)
    other = await _backlog(db, 2, local="other", user=a["user"])
    now = a["now"]
    ids = [d for _m, d in a["ids"]]
    job = await _claim_one(db, now)
    assert job.id == ids[0]
    await db.execute("UPDATE deliveries SET next_attempt_at = %s WHERE id = %s", (now + timedelta(seconds=5), ids[1]))
    await db.execute("UPDATE deliveries SET leased_until = %s WHERE id = %s", (now + timedelta(seconds=5), ids[2]))
    await db.execute("UPDATE deliveries SET status = 'paused', next_attempt_at = NULL WHERE id = %s", (ids[3],))
    locker = psycopg2.connect(db_dsn)
    try:
        with locker.cursor() as cur:  # a concurrent claim holding the last candidate's row lock
            cur.execute("SELECT id FROM deliveries WHERE id = %s FOR UPDATE", (ids[4],))
            assert await deliveries.record_delivered_and_claim_next(db, job, 200, URL, now, LEASE, 4) == (True, None)
        locker.rollback()
    finally:
        locker.close()
    for _m, d in other["ids"]:
        assert (await _row(db, d))["leased_until"] is None
    assert (await _row(db, ids[4]))["leased_until"] is None

    # The finishing row itself, even with its lease run out, is never leased again.
    b = await _backlog(db, 1, local="single", user=a["user"])
    (_m, d) = b["ids"][0]
    (single,) = [j for j in await deliveries.claim_due(db, b["now"], 10, LEASE, 4) if j.id == d]
    later = b["now"] + timedelta(seconds=LEASE + 1)
    assert await deliveries.record_delivered_and_claim_next(db, single, 200, URL, later, LEASE, 4) == (True, None)
    assert await _row(db, d) == {"status": "delivered", "attempts": 1, "leased_until": None, "last_status_code": 200}


@pytest_twisted.ensureDeferred
async def test_claim_next_is_atomic_when_lease_fails(db):
    """When the lease part fails, the delivered mark and the read flag roll back with it (one statement)."""
    b = await _backlog(db, 2)
    (m1, d1), (_m2, d2) = b["ids"]
    now = b["now"]
    job = await _claim_one(db, now)
    await db.execute(
        "CREATE FUNCTION test_refuse_lease() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF NEW.id = '" + d2 + "' AND NEW.leased_until IS NOT NULL THEN RAISE EXCEPTION 'refused'; END IF;"
        " RETURN NEW; END $$"
    )
    await db.execute(
        "CREATE TRIGGER test_refuse_lease BEFORE UPDATE ON deliveries FOR EACH ROW EXECUTE FUNCTION test_refuse_lease()"
    )
    with pytest.raises(Exception, match="refused"):
        await deliveries.record_delivered_and_claim_next(db, job, 200, URL, now, LEASE, 4)
    assert (await _row(db, d1))["status"] == "pending" and (await _row(db, d1))["attempts"] == 0
    assert await _message_status(db, m1) == "unread"
    await db.execute("DROP TRIGGER test_refuse_lease ON deliveries")
    delivered, nxt = await deliveries.record_delivered_and_claim_next(db, job, 200, URL, now, LEASE, 4)
    assert delivered is True and nxt is not None and nxt.id == d2
    assert (await _row(db, d1))["status"] == "delivered" and await _message_status(db, m1) == "read"


# ---------------------------------------------------------------- the worker


def _worker(db: Database, clock: task.Clock, **kwargs: Any) -> DeliveryService:
    cfg = WebhooksConfig(allow_private=True)
    dns = DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor)
    return DeliveryService(db, None, dns, cfg, False, TEST_MASTER_KEY, reactor, clock, rng=lambda: 0.5, **kwargs)


class _Probe:
    """Counts claim statements and concurrent POSTs of one service."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, svc: DeliveryService) -> None:
        self.claims = 0
        self.posting = 0
        self.most_posting = 0
        real_claim = deliveries.claim_due
        real_post = svc.client.post

        async def claim_due(*args: Any) -> list[deliveries.ClaimedJob]:
            self.claims += 1
            return await real_claim(*args)

        async def post(*args: Any) -> Any:
            self.posting += 1
            self.most_posting = max(self.most_posting, self.posting)
            try:
                return await real_post(*args)
            finally:
                self.posting -= 1

        monkeypatch.setattr(worker.deliveries, "claim_due", claim_due)
        svc.client.post = post  # type: ignore[method-assign]


async def _seed(db: Database, sink: Any, n: int) -> tuple[list[tuple[str, str]], str]:
    user_id, _key, secret = await _user(db)
    agent = await _agent(db, user_id, sink.url())
    return [await _message(db, user_id, agent, secret) for _ in range(n)], agent


async def _all_delivered_once(db: Database, sink: Any, sent: list[tuple[str, str]]) -> None:
    assert sorted(r.headers["webhook-id"] for r in sink.received) == sorted(m for m, _d in sent)
    rows = await db.fetchall("SELECT status, attempts, leased_until FROM deliveries")
    assert [(r["status"], r["attempts"], r["leased_until"]) for r in rows] == [("delivered", 1, None)] * len(sent)
    unread = await db.fetchone("SELECT count(*) AS n FROM messages WHERE status <> 'read'")
    assert unread["n"] == 0


@pytest_twisted.ensureDeferred
async def test_run_once_drains_agent_backlog_with_one_claim(db, monkeypatch):
    """run_once: 12 jobs of one agent, limit 4 — one claim, 12 attempts via hand-ons, each delivered once."""
    sink = await _sink()
    try:
        sent, _agent_id = await _seed(db, sink, 12)
        svc = _worker(db, _clock())
        probe = _Probe(monkeypatch, svc)
        assert await svc.run_once() == 12
        assert probe.claims == 1
        assert probe.most_posting == 4
        assert svc.slots.idle
        await _all_delivered_once(db, sink, sent)
        await svc.stop()
    finally:
        await sink.stop()


@pytest.mark.parametrize("hand_on", [True, False])
@pytest_twisted.ensureDeferred
async def test_running_service_delivers_backlog_once_with_fewer_claims(db, monkeypatch, hand_on):
    """A started service drains 20 jobs of one agent exactly once, ≤ 4 POSTs at a time; hand-on needs ≤ 5 claims
    where waking on every finish needs at least 6 (20 jobs, 4 per pass, then an empty pass)."""
    sink = await _sink()
    svc = None
    try:
        sent, _agent_id = await _seed(db, sink, 20)
        svc = _worker(db, _clock())  # the safety poll never fires: the clock is not advanced
        probe = _Probe(monkeypatch, svc)
        svc.slots.hand_on = hand_on
        await svc.start()
        await svc.wait_idle()  # the claims, the attempts and the hand-ons they chained
        await svc.stop()
        await _all_delivered_once(db, sink, sent)
        assert len(sink.received) == 20
        assert probe.most_posting <= 4
        assert svc.slots.idle
        if hand_on:
            assert probe.claims <= 5
        else:
            assert probe.claims >= 6
    finally:
        if svc is not None:
            await svc.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_stopped_or_saturated_service_does_not_hand_on(db):
    """After stop(), and while max_in_flight is reached, a 2xx only records: no new job is leased."""
    sink = await _sink()
    try:
        sent, _agent_id = await _seed(db, sink, 6)
        saturated = _worker(db, _clock(), max_in_flight=2)
        assert await saturated.run_once() == 2
        await saturated.stop()
        stopped = _worker(db, _clock())
        await stopped.stop()
        assert await stopped.run_once() == 4
        rows = await db.fetchall("SELECT status, leased_until FROM deliveries ORDER BY status")
        assert [(r["status"], r["leased_until"]) for r in rows] == [("delivered", None)] * 6
        assert len(sink.received) == len(sent) == 6
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_notify_naming_an_agent_whose_slots_are_busy_claims_nothing(db, monkeypatch):
    """A delivery NOTIFY naming an agent with all its local slots busy starts no claim (its busy
    slots hand on); one naming another agent, or no agent, does."""
    svc = _worker(db, _clock())
    probe = _Probe(monkeypatch, svc)
    await svc.start()  # one claim at start (nothing due)
    busy = "busy@agents.test"
    try:
        await svc.wait_idle()
        base = probe.claims
        for _ in range(svc.slots.max_per_agent):  # every local slot of the agent is running
            svc.slots.attempt_started(busy)
        svc.on_notify(busy)
        await svc.wait_idle()
        assert probe.claims == base
        for payload in ("idle@agents.test", ""):
            svc.on_notify(payload)
            await svc.wait_idle()
        assert probe.claims == base + 2
    finally:
        while svc.slots.busy(busy):
            svc.slots.attempt_finished(busy)
        await svc.stop()


@pytest_twisted.ensureDeferred
async def test_inbound_notify_names_the_single_cloud_agent(db):
    """The accept transaction's delivery NOTIFY carries the agent address when exactly one cloud
    agent received a copy, and an empty payload for several."""
    from e2a.inbound import InboundPipeline
    from e2a.store.events import CHANNEL_DELIVERY, EventListener
    from tests.integration.test_backpressure_inbound import TRACE, CountingVerifier, Envelope

    events = EventListener(db.dsn, reactor)
    await events.start()
    got: list[str] = []
    two_arrived: defer.Deferred[None] = defer.Deferred()

    def arrived(payload: str) -> None:
        got.append(payload)
        if len(got) == 2:
            two_arrived.callback(None)

    unsubscribe = events.subscribe(CHANNEL_DELIVERY, arrived)
    try:
        user_id, _key, _secret = await _user(db)
        one = await _agent(db, user_id, URL, local="one")
        two = await _agent(db, user_id, URL, local="two")
        pipeline = InboundPipeline(
            db, CountingVerifier(), TEST_MASTER_KEY, "mx.test", "mx.test", to_trace=lambda _v: TRACE
        )
        raw = b"From: a@example.org\r\nTo: x@acme.test\r\nSubject: s\r\nMessage-ID: <m1@example.org>\r\n\r\nhi\r\n"
        await pipeline.accept(Envelope((one,)), raw)
        await pipeline.accept(Envelope((one, two)), raw.replace(b"<m1@", b"<m2@"))
        # NOTIFYs arrive on another connection: wait for both (bounded by the reactor's clock).
        await two_arrived.addTimeout(10, reactor)
        assert got == [one, ""]
    finally:
        unsubscribe()
        events.stop()
