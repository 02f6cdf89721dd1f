"""Fresh webhook jobs handed from the accept transaction to this process's worker through the
inbound → delivery port (``InboundPipeline(delivery=…)`` → ``DeliveryPort.reserve_fresh``/
``start_fresh``). The slot rules themselves are table-tested in tests/unit/test_delivery_slots.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.delivery.port import DeliveryPort, InboundDelivery
from e2a.inbound import InboundPipeline
from e2a.store import deliveries
from e2a.store.accounts import SecretCache
from e2a.store.database import Database
from e2a.store.deliveries import ClaimedJob
from tests.integration.test_backpressure_inbound import TRACE, CountingVerifier, Envelope
from tests.integration.test_delivery_hand_on import _Probe, _worker
from tests.integration.test_webhook_delivery import _agent, _clock, _sink, _user
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.waiting import wait_for, wait_for_advisory_lock_wait

URL = "http://127.0.0.1:9/hook"
LEASE = 50.0


def _raw(n: int) -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\nTo: bot@acme.test\r\nSubject: hi\r\n"
        + f"Message-ID: <m{n}@example.com>\r\n\r\nHello {n}\r\n".encode()
    )


class RecordingFreshJobs:
    """A port stand-in: reserves while ``free`` > 0, records what is started or released."""

    max_per_agent = 4

    def __init__(self, free: int = 10) -> None:
        self.free = free
        self.reserved: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.started: list[ClaimedJob] = []

    def reserve_fresh(
        self, agent_id: str, in_flight_everywhere: int, user_id: str | None = None
    ) -> datetime | None:
        self.reserved.append((agent_id, in_flight_everywhere))
        if self.free <= 0:
            return None
        self.free -= 1
        return datetime.now(UTC) + timedelta(seconds=LEASE)

    def release_fresh(self, agent_id: str) -> None:
        self.released.append(agent_id)

    def start_fresh(self, job: ClaimedJob) -> None:
        self.started.append(job)

    def holds(self, agents: Any) -> bool:
        return False

    def wait(self, agents: Any) -> defer.Deferred[float]:
        return defer.succeed(0.0)


def _pipeline(db: Database, fresh: InboundDelivery) -> InboundPipeline:
    return InboundPipeline(
        db, CountingVerifier(), TEST_MASTER_KEY, "mx.test", "mx.test", to_trace=lambda _v: TRACE, delivery=fresh
    )


@pytest_twisted.ensureDeferred
async def test_fresh_job_is_committed_leased_and_carries_what_a_claim_would_read(db):
    """The accept inserts the job leased and hands over an attempt context equal to the one a
    claim of the same row builds (so the first attempt needs no read of its own)."""
    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    fresh = RecordingFreshJobs()
    msg_id = await _pipeline(db, fresh).accept(Envelope((agent,)), _raw(1))
    (job,) = fresh.started
    assert (job.message_id, job.agent_id, job.attempts) == (msg_id, agent, 0)
    assert fresh.reserved == [(agent, 0)] and fresh.released == []
    row = await db.fetchone("SELECT status, leased_until, attempts FROM deliveries WHERE id = %s", (job.id,))
    assert row["status"] == "pending" and row["leased_until"] is not None and row["attempts"] == 0

    cache = SecretCache()
    handed = await deliveries.load_attempt(db, job, TEST_MASTER_KEY, cache)
    await db.execute("UPDATE deliveries SET leased_until = NULL WHERE id = %s", (job.id,))
    now = datetime.now(UTC) + timedelta(seconds=1)
    (claimed,) = await deliveries.claim_due(db, now, 10, LEASE, 4)
    assert claimed.id == job.id
    assert handed == await deliveries.load_attempt(db, claimed, TEST_MASTER_KEY, cache)


@pytest_twisted.ensureDeferred
async def test_context_counts_the_agents_leased_attempts_everywhere(db):
    """The in-flight figure given to reserve_fresh is the agent's leased pending rows in the
    database (any process), so the per-agent limit holds across processes."""
    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    fresh = RecordingFreshJobs(free=0)  # refuse: the jobs stay queued, unleased
    pipeline = _pipeline(db, fresh)
    for n in range(3):
        await pipeline.accept(Envelope((agent,)), _raw(n))
    await db.execute(
        "UPDATE deliveries SET leased_until = now() + interval '1 minute'"
        " WHERE id IN (SELECT id FROM deliveries ORDER BY created_at LIMIT 2)"
    )
    await pipeline.accept(Envelope((agent,)), _raw(9))
    assert [n for _a, n in fresh.reserved] == [0, 0, 0, 2]
    queued = await db.fetchone("SELECT count(*) AS n FROM deliveries WHERE leased_until IS NULL")
    assert queued["n"] == 2 and fresh.started == []


@pytest_twisted.ensureDeferred
async def test_reservation_is_released_when_the_accept_does_not_commit(db):
    """A failed write gives the reserved slot back and starts nothing; nothing is stored."""
    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    fresh = RecordingFreshJobs()
    await db.execute(
        "CREATE FUNCTION test_refuse_delivery() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused'; END $$"
    )
    await db.execute(
        "CREATE TRIGGER test_refuse BEFORE INSERT ON deliveries FOR EACH ROW EXECUTE FUNCTION test_refuse_delivery()"
    )
    with pytest.raises(Exception, match="refused"):
        await _pipeline(db, fresh).accept(Envelope((agent,)), _raw(1))
    assert fresh.released == [agent] and fresh.started == []
    assert (await db.fetchone("SELECT count(*) AS n FROM messages"))["n"] == 0


@pytest_twisted.ensureDeferred
async def test_lease_taken_by_another_process_meanwhile_queues_the_job_and_starts_nothing(db, db_dsn):
    """The accept's count of the agent's leases is read before its writes; another process
    leasing the agent's last free slots meanwhile wins: the accept's insert waits for the
    agent's lock and counts them once committed. The copy is stored, its job is queued
    unleased, the reservation goes back, and no attempt starts here (starting one would
    exceed the limit across the two processes)."""
    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    queued = RecordingFreshJobs(free=0)
    earlier = [await _pipeline(db, queued).accept(Envelope((agent,)), _raw(n)) for n in range(4)]
    await db.execute("DELETE FROM deliveries")  # the other process's accept inserts their jobs
    gate: defer.Deferred = defer.Deferred()
    leased: defer.Deferred = defer.Deferred()
    now = datetime.now(UTC)

    async def other_process(txn):
        # Another process's accept: the agent's lock, then four fresh jobs leased, uncommitted.
        await txn.execute("SELECT e2a_webhook_slots_free(%s, 4, %s, NULL)", (agent, now))
        for n, msg_id in enumerate(earlier):
            await txn.execute(
                "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at, leased_until)"
                " VALUES (%s, %s, %s, %s, 'pending', now(), %s)",
                (f"dlv_other{n}", msg_id, agent, URL, now + timedelta(seconds=LEASE)),
            )
        leased.callback(None)
        await gate

    held = defer.ensureDeferred(db.run("other_process", other_process))
    await leased
    fresh = RecordingFreshJobs()  # this process: every slot free
    accepted = defer.ensureDeferred(_pipeline(db, fresh).accept(Envelope((agent,)), _raw(9)))
    await wait_for_advisory_lock_wait(db_dsn)
    gate.callback(None)
    await held
    msg_id = await accepted
    assert [a for a, _n in fresh.reserved] == [agent]
    assert fresh.started == [] and fresh.released == [agent]
    row = await db.fetchone("SELECT status, leased_until FROM deliveries WHERE message_id = %s", (msg_id,))
    assert row["status"] == "pending" and row["leased_until"] is None


@pytest_twisted.ensureDeferred
async def test_accepted_mail_is_delivered_without_claims_or_notify(db, monkeypatch):
    """With the real worker, each accepted message is POSTed once without a claim: the first
    four straight from the accept, the two accepted while the agent's four slots were busy by
    the hand-on of the attempts that free them. No claim statement beyond the start-up pass,
    never more than 4 attempts at once, all delivered and read.

    The receiver holds every request until all six are accepted, so the order is the same on
    every run: nothing here subscribes to NOTIFY, and a queued job committed after every busy
    slot's hand-on had looked would wait for the claim loop's next pass."""
    sink = await _sink()
    svc = None
    try:
        user_id, _key, _secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        svc = _worker(db, _clock())
        accepted: defer.Deferred[None] = defer.Deferred()
        real_post = svc.client.post

        async def post_once_all_accepted(*args: Any) -> Any:
            await accepted
            return await real_post(*args)

        svc.client.post = post_once_all_accepted  # type: ignore[method-assign]
        probe = _Probe(monkeypatch, svc)
        await svc.start()
        await svc.wait_idle()
        claims_at_start = probe.claims
        pipeline = _pipeline(db, svc.port)
        sent = [await pipeline.accept(Envelope((agent,)), _raw(n)) for n in range(6)]
        await wait_for(lambda: probe.posting == 4)  # the agent's limit; the other two are queued
        accepted.callback(None)
        await svc.wait_idle()  # every started attempt and its hand-ons
        done = (await db.fetchone("SELECT count(*) AS n FROM deliveries WHERE status = 'delivered'"))["n"]
        assert done == 6
        assert sorted(r.headers["webhook-id"] for r in sink.received) == sorted(sent)
        assert probe.claims == claims_at_start  # no NOTIFY (none is subscribed here) and no claim
        assert probe.most_posting == 4
        assert svc.slots.idle
        unread = await db.fetchone("SELECT count(*) AS n FROM messages WHERE status <> 'read'")
        assert unread["n"] == 0
    finally:
        if svc is not None:
            await svc.stop()
        await sink.stop()


def test_port_provides_what_the_pipeline_calls():
    """The pipeline's InboundDelivery protocol is what DeliveryPort provides."""
    for name in ("holds", "wait", "reserve_fresh", "release_fresh", "start_fresh"):
        assert callable(getattr(DeliveryPort, name))


@pytest_twisted.ensureDeferred
async def test_slot_freed_after_a_skipped_notify_wakes_the_claim_loop(db, monkeypatch):
    """A NOTIFY skipped because the agent's slots were busy makes the next slot that frees
    without a hand-on wake the claim loop; otherwise a delivered attempt whose hand-on found
    nothing frees its slot quietly."""
    from e2a.config import WebhooksConfig
    from e2a.delivery.worker import DeliveryService
    from e2a.mailauth.dns import DnsClient
    from tests.integration.test_webhook_delivery import _message

    sink = await _sink()
    svc = None
    try:
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        await _message(db, user_id, agent, secret)
        cfg = WebhooksConfig(allow_private=True, max_concurrency_per_agent=1)
        dns = DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor)
        svc = DeliveryService(db, None, dns, cfg, False, TEST_MASTER_KEY, reactor, _clock(), rng=lambda: 0.5)
        probe = _Probe(monkeypatch, svc)
        real_post = svc.client.post
        notified: list[bool] = []

        async def post(*args: Any) -> Any:
            if not notified:  # while the only slot is busy, a NOTIFY for its agent arrives
                notified.append(True)
                svc.on_notify(agent)
                assert svc.slots.marked(agent) and probe.claims == 1
            return await real_post(*args)

        svc.client.post = post  # type: ignore[method-assign]
        await svc.start()  # the start-up claim takes the job
        await svc.wait_idle()
        assert probe.claims == 2  # start-up + the wake of the freed slot
        assert not svc.slots.marked(agent)

        # Without a skipped NOTIFY the same kind of finish wakes nobody.
        await _message(db, user_id, agent, secret)
        svc.wake()
        await svc.wait_idle()
        done = (await db.fetchone("SELECT count(*) AS n FROM deliveries WHERE status = 'delivered'"))["n"]
        assert done == 2
        assert probe.claims == 3  # only the explicit wake
    finally:
        if svc is not None:
            await svc.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_claimed_jobs_beyond_a_local_reservation_are_given_back(db, monkeypatch):
    """A claim cannot see a slot reserved for an accept still committing: the claimed job that
    would exceed the agent's limit in this process is unleased at once, not started."""
    from tests.integration.test_webhook_delivery import _message

    sink = await _sink()
    svc = None
    try:
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        for _ in range(4):
            await _message(db, user_id, agent, secret)
        svc = _worker(db, _clock())
        probe = _Probe(monkeypatch, svc)
        svc.slots.start()  # reserve as a started service would, before its first claim
        assert svc.port.reserve_fresh(agent, 0) is not None  # an accept is committing meanwhile
        await svc.start()  # the start-up claim leases all 4; only 3 fit beside the reservation
        await svc.wait_idle()
        # The fourth was given back unstarted, then taken by a hand-on or the freed slot's claim.
        assert probe.most_posting == 3
        assert not svc.slots.marked(agent)  # marked at the give-back, consumed by the next freed slot
        delivered = await db.fetchone("SELECT count(*) AS n FROM deliveries WHERE status = 'delivered'")
        assert delivered["n"] == 4 and len(sink.received) == 4
        svc.port.release_fresh(agent)
        assert svc.slots.idle
    finally:
        if svc is not None:
            await svc.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_reservation_is_released_when_storing_the_copy_raises(db, monkeypatch):
    """A failure inside store_copy_txn (after the reservation, before the job exists) still
    gives the slot back."""
    import e2a.inbound as inbound

    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    fresh = RecordingFreshJobs()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("connection broke while preparing the insert")

    monkeypatch.setattr(inbound, "store_copy_txn", broken)
    with pytest.raises(RuntimeError):
        await _pipeline(db, fresh).accept(Envelope((agent,)), _raw(1))
    assert [a for a, _n in fresh.reserved] == [agent] and fresh.released == [agent] and fresh.started == []


@pytest_twisted.ensureDeferred
async def test_fresh_job_committed_after_stop_is_given_back(db):
    """An accept that commits after the worker stopped leaves a claimable job, not a lease."""
    user_id, _key, _secret = await _user(db)
    agent = await _agent(db, user_id, URL)
    svc = _worker(db, _clock())
    await svc.start()
    port = svc.port
    pipeline = _pipeline(db, port)
    real_start = port.start_fresh
    stopped: list[bool] = []

    def start_after_stop(job: ClaimedJob) -> None:
        stopped.append(True)
        real_start(job)

    port.start_fresh = start_after_stop  # type: ignore[method-assign]
    original_run_batched = db.run_batched

    async def commit_then_stop(*args: Any, **kwargs: Any) -> Any:
        result = await original_run_batched(*args, **kwargs)
        await svc.stop()  # the worker stops between the commit and start_fresh
        return result

    db.run_batched = commit_then_stop  # type: ignore[method-assign]
    try:
        await pipeline.accept(Envelope((agent,)), _raw(1))
    finally:
        db.run_batched = original_run_batched  # type: ignore[method-assign]
    assert stopped == [True]
    await svc.wait_idle()  # the give-back statement
    row = await db.fetchone("SELECT leased_until, status FROM deliveries")
    assert row["leased_until"] is None and row["status"] == "pending"
    assert svc.slots.idle
