"""Webhook delivery end to end: real database, real loopback sockets, a task.Clock schedule (mail.md §4)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_twisted
from standardwebhooks.webhooks import Webhook

from twisted.internet import defer, reactor, task
from twisted.web import resource, server

from e2a import ids
from e2a.config import WebhooksConfig
from e2a.delivery.worker import DeliveryService
from e2a.mailauth import authheaders
from e2a.mailauth.dns import DnsClient
from e2a.store import accounts
from e2a.store.database import Database
from e2a.store.events import CHANNEL_DELIVERY, EventListener
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.dnsserver import start_dns_server

DOMAIN = "acme.test"


# ---------------------------------------------------------------- the sink


@dataclass
class Received:
    path: bytes
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hang: bool = False


class _SinkResource(resource.Resource):
    isLeaf = True

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink

    def render_POST(self, request):  # noqa: N802 - twisted.web API
        sink = self.sink
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        got = Received(request.path, headers, request.content.read())
        sink.received.append(got)
        reply = sink.replies.pop(0) if sink.replies else sink.default
        sink.arrivals.put(got)
        if reply.hang:
            sink.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body


class Sink:
    """A twisted.web Site on 127.0.0.1:0 answering scripted replies; one queue entry per request."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: list[Reply] = []
        self.default = Reply()
        self.arrivals: defer.DeferredQueue[Received] = defer.DeferredQueue()
        self.hanging: list[Any] = []
        self.port: Any = None

    async def start(self) -> Sink:
        site = server.Site(_SinkResource(self))
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return self

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port.getHost().port}{path}"

    async def stop(self) -> None:
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        await self.port.stopListening()


# ---------------------------------------------------------------- fixtures and helpers


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(time.time() + 1)  # jobs inserted soon with the database's now() are due on this clock
    return clock


def _now(clock: task.Clock) -> datetime:
    return datetime.fromtimestamp(clock.seconds(), UTC)


async def _user(db: Database, email: str = "owner@example.com") -> tuple[str, str, str]:
    """(user id, user API key, newest signing secret)."""
    boot = await accounts.bootstrap(db, TEST_MASTER_KEY, email)
    await db.execute(
        "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE) ON CONFLICT DO NOTHING",
        (DOMAIN, boot.user.id),
    )
    return boot.user.id, boot.api_key_plaintext, boot.signing_secret


async def _agent(db: Database, user_id: str, url: str, local: str = "bot", mode: str = "cloud") -> str:
    address = f"{local}@{DOMAIN}"
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (address, user_id, DOMAIN, mode, url if mode == "cloud" else "", "active" if mode == "cloud" else "none"),
    )
    return address


RAW = b"From: Alice <alice@example.com>\r\nTo: bot@acme.test\r\nSubject: hi\r\nMessage-ID: <m@example.com>\r\n\r\nHello\r\n"


async def _message(db: Database, user_id: str, agent: str, secret: str, *, delivery: bool = True) -> tuple[str, str]:
    """An inbound message signed at receipt plus a pending delivery due now. Returns (msg id, dlv id)."""
    message_id = ids.new_message_id()
    delivery_id = ids.new_delivery_id()
    fields = authheaders.build_fields(
        verified=True, sender="alice@example.com", entity_type="human",
        domain_check="spf=pass; dkim=none; dmarc=none", signed_at=datetime.now(UTC),
        message_id=message_id, stored=RAW,
    )

    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, sender, display_from, recipient,"
            " to_addrs, raw_message, auth_headers) VALUES (%s, %s, %s, 'inbound', 'unread', %s, %s, %s, %s, %s, %s)",
            (message_id, agent, user_id, "alice@example.com", "alice@example.com", agent,
             json.dumps([agent]), RAW, json.dumps(authheaders.auth_headers(fields, secret))),
        )
        if delivery:
            await txn.execute(
                "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
                " SELECT %s, %s, id, webhook_url, 'pending', now() FROM agents WHERE id = %s",
                (delivery_id, message_id, agent),
            )
            await txn.notify(CHANNEL_DELIVERY, "")

    await db.run("test_insert_message", _txn)
    return message_id, delivery_id


async def _delivery(db: Database, delivery_id: str) -> dict[str, Any]:
    row = await db.fetchone("SELECT * FROM deliveries WHERE id = %s", (delivery_id,))
    assert row is not None
    return row


def _service(db, clock, dns=None, **config) -> DeliveryService:
    cfg = replace(WebhooksConfig(allow_private=True), **config)
    dns = dns or DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor)
    return DeliveryService(db, None, dns, cfg, False, TEST_MASTER_KEY, reactor, clock, rng=lambda: 0.5)


def _verify(got: Received, secret: str, clock: task.Clock) -> dict[str, Any]:
    """Both signatures of one request verify; returns the parsed body."""
    authheaders.verify(got.headers, RAW, [secret], now=_now(clock))
    body = Webhook(authheaders.whsec(secret)).verify(got.body, got.headers)
    signed = {k.lower(): v for k, v in body["auth_headers"].items()}
    assert signed == {k: v for k, v in got.headers.items() if k.startswith("x-e2a-auth-")}
    return body


async def _sink():
    return await Sink().start()


# ---------------------------------------------------------------- tests


@pytest_twisted.ensureDeferred
async def test_delivery_retries_until_success_exactly_once(db):
    """Three 500s then 200: one successful delivery, 4 attempts on the schedule, each attempt verifies."""
    sink = await _sink()
    try:
        sink.replies = [Reply(500, body=b"secret internals"), Reply(500), Reply(503)]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        message_id, delivery_id = await _message(db, user_id, agent, secret)
        svc = _service(db, clock)
        start = clock.seconds()
        assert await svc.run_once() == 1
        row = await _delivery(db, delivery_id)
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("pending", 1, 500)
        assert row["last_error"] == "HTTP 500" and "secret" not in row["last_error"]
        assert row["next_attempt_at"].timestamp() == pytest.approx(start + 5, abs=1e-3)
        clock.advance(4.9)
        assert await svc.run_once() == 0  # not due yet
        for step in (0.1, 30, 120):
            clock.advance(step)
            assert await svc.run_once() == 1
        row = await _delivery(db, delivery_id)
        assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == ("delivered", 4, 200, "")
        assert row["delivered_at"] is not None and row["leased_until"] is None
        msg = await db.fetchone("SELECT status FROM messages WHERE id = %s", (message_id,))
        assert msg["status"] == "read"
        assert len(sink.received) == 4
        stamps = set()
        for n, got in enumerate(sink.received, start=1):
            assert got.path == b"/hook"
            assert got.headers["webhook-id"] == message_id
            body = _verify(got, secret, clock) if n == 4 else json.loads(got.body)
            assert body["attempt"] == n and body["delivery_id"] == delivery_id
            stamps.add(got.headers["x-e2a-auth-timestamp"])
        assert len(stamps) == 4  # re-signed at every attempt
        clock.advance(100000)
        assert await svc.run_once() == 0
        assert len(sink.received) == 4
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_every_attempt_verifies_at_its_time(db):
    """Each attempt's X-E2A-Auth set verifies at the attempt's clock time and Standard Webhooks verifies."""
    sink = await _sink()
    try:
        sink.replies = [Reply(500)]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        await _message(db, user_id, agent, secret)
        svc = _service(db, clock)
        await svc.run_once()
        _verify(sink.received[0], secret, clock)
        clock.advance(5)
        await svc.run_once()
        _verify(sink.received[1], secret, clock)
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_410_disables_webhook_and_pauses_other_deliveries(db):
    """410: that delivery failed, agent webhook disabled, the agent's other pending deliveries paused."""
    sink = await _sink()
    try:
        sink.replies = [Reply(410)]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        _m1, d1 = await _message(db, user_id, agent, secret)
        _m2, d2 = await _message(db, user_id, agent, secret)
        _m3, d3 = await _message(db, user_id, agent, secret)
        svc = _service(db, clock, max_concurrency_per_agent=1)
        assert await svc.run_once() == 1
        rows = {d: await _delivery(db, d) for d in (d1, d2, d3)}
        statuses = sorted(r["status"] for r in rows.values())
        assert statuses == ["failed", "paused", "paused"]
        failed = next(r for r in rows.values() if r["status"] == "failed")
        assert failed["last_status_code"] == 410 and failed["attempts"] == 1
        a = await db.fetchone("SELECT webhook_status, webhook_disabled_at FROM agents WHERE id = %s", (agent,))
        assert a["webhook_status"] == "disabled" and a["webhook_disabled_at"] is not None
        clock.advance(3600)
        assert await svc.run_once() == 0
        assert len(sink.received) == 1
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_429_retry_after_delays_next_attempt(db):
    """429 with Retry-After: 120 → next attempt 120 s later, not at the 5 s step."""
    sink = await _sink()
    try:
        sink.replies = [Reply(429, headers={"Retry-After": "120"})]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        _m, d = await _message(db, user_id, agent, secret)
        svc = _service(db, clock)
        start = clock.seconds()
        assert await svc.run_once() == 1
        row = await _delivery(db, d)
        assert row["next_attempt_at"].timestamp() == pytest.approx(start + 120, abs=1e-3)
        assert row["last_status_code"] == 429
        clock.advance(119)
        assert await svc.run_once() == 0
        clock.advance(1)
        assert await svc.run_once() == 1
        assert (await _delivery(db, d))["status"] == "delivered"
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_redirect_is_not_followed(db):
    """302 to another path on the sink: a failed attempt, and the Location is never requested."""
    sink = await _sink()
    try:
        sink.replies = [Reply(302, headers={"Location": sink.url("/other")})]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        _m, d = await _message(db, user_id, agent, secret)
        svc = _service(db, clock)
        assert await svc.run_once() == 1
        row = await _delivery(db, d)
        assert (row["status"], row["last_status_code"]) == ("pending", 302)
        assert [r.path for r in sink.received] == [b"/hook"]
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_blocked_address_fails_attempt_without_connecting(db):
    """A host resolving to 127.0.0.1 with allow_private off: last_error 'blocked address', no connection."""
    sink = await _sink()
    zone = await start_dns_server(reactor, {"hook.example.com": {"A": ["127.0.0.1"]}})
    try:
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url(host="hook.example.com"))
        _m, d = await _message(db, user_id, agent, secret)
        dns = DnsClient(zone.nameservers, timeout=2, reactor=reactor)
        svc = _service(db, clock, dns=dns, allow_private=False)
        assert await svc.run_once() == 1
        row = await _delivery(db, d)
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "blocked address")
        assert row["last_status_code"] is None
        assert row["next_attempt_at"].timestamp() == pytest.approx(clock.seconds() + 5, abs=1e-3)
        assert sink.received == [] and svc.client.connects == []
        assert ("hook.example.com", "A") in zone.queries
        await svc.stop()
    finally:
        await zone.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_timeout_is_measured_on_the_clock(db):
    """A receiver that never answers: the attempt fails with 'timeout' when the clock passes webhooks.timeout."""
    sink = await _sink()
    try:
        sink.replies = [Reply(hang=True)]
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        _m, d = await _message(db, user_id, agent, secret)
        svc = _service(db, clock, timeout=10)
        running = defer.Deferred.fromCoroutine(svc.run_once())
        await sink.arrivals.get()
        clock.advance(9.9)
        assert not running.called
        clock.advance(0.1)
        assert await running == 1
        row = await _delivery(db, d)
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "timeout")
        assert row["last_status_code"] is None
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_message_gone_fails_without_attempt(db):
    """A delivery whose agent switched to local mode fails without any HTTP request."""
    sink = await _sink()
    try:
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        _m, d = await _message(db, user_id, agent, secret)
        await db.execute("UPDATE agents SET agent_mode = 'local' WHERE id = %s", (agent,))
        svc = _service(db, clock)
        assert await svc.run_once() == 1
        row = await _delivery(db, d)
        assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 0, "agent is in local mode")
        assert sink.received == []
        await svc.stop()
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_two_services_never_deliver_a_job_twice(db, db_dsn):
    """Two DeliveryServices (own pools and LISTEN connections) on one database: 20 messages, each delivered once."""
    sink = await _sink()
    db2 = Database(db_dsn, pool_size=4, reactor=reactor)
    await db2.start()
    events1 = EventListener(db_dsn, reactor)
    events2 = EventListener(db_dsn, reactor)
    await events1.start()
    await events2.start()
    services = []
    try:
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agents = [await _agent(db, user_id, sink.url(), local=f"bot{i}") for i in range(2)]
        cfg = WebhooksConfig(allow_private=True)
        dns = DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor)
        for database, events in ((db, events1), (db2, events2)):
            svc = DeliveryService(database, events, dns, cfg, False, TEST_MASTER_KEY, reactor, clock)
            await svc.start()
            services.append(svc)
        sent = [await _message(db, user_id, agents[i % 2], secret) for i in range(20)]
        for _ in range(20):
            await sink.arrivals.get()
        # Wait (real time, bounded) until every row is recorded as delivered.
        for _ in range(200):
            n = (await db.fetchone("SELECT count(*) AS n FROM deliveries WHERE status = 'delivered'"))["n"]
            if n == 20:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        for svc in services:
            await svc.stop()
        services.clear()
        got = [r.headers["webhook-id"] for r in sink.received]
        assert sorted(got) == sorted(m for m, _d in sent)
        rows = await db.fetchall("SELECT status, attempts FROM deliveries")
        assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 1)] * 20
    finally:
        for svc in services:
            await svc.stop()
        events1.stop()
        events2.stop()
        db2.close()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_per_agent_concurrency_is_bounded(db):
    """With 6 due jobs for one agent and a limit of 4, one claim starts 4 attempts."""
    sink = await _sink()
    try:
        sink.default = Reply(hang=True)
        clock = _clock()
        user_id, _key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        for _ in range(6):
            await _message(db, user_id, agent, secret)
        svc = _service(db, clock, timeout=10)
        running = defer.Deferred.fromCoroutine(svc.run_once())
        for _ in range(4):
            await sink.arrivals.get()
        leased = await db.fetchone(
            "SELECT count(*) AS n FROM deliveries WHERE leased_until IS NOT NULL AND status = 'pending'"
        )
        assert leased["n"] == 4
        assert await defer.Deferred.fromCoroutine(svc.run_once()) == 0  # agent saturated
        clock.advance(10)
        assert await running == 4
        await svc.stop()
    finally:
        await sink.stop()


# ---------------------------------------------------------------- API


@pytest_twisted.ensureDeferred
async def test_deliveries_list_and_redeliver_endpoints(db, api_server_factory):
    """List (filters, pagination, newest first) and redeliver (reuse pending, new after delivered, 409s)."""
    sink = await _sink()
    try:
        api = await api_server_factory()
        clock = _clock()
        user_id, key, secret = await _user(db)
        agent = await _agent(db, user_id, sink.url())
        local = await _agent(db, user_id, "", local="local", mode="local")
        m1, d1 = await _message(db, user_id, agent, secret)
        m2, d2 = await _message(db, user_id, agent, secret)
        base = f"/api/v1/agents/{agent}"

        r = await api.request("POST", f"{base}/messages/{m1}/redeliver", key=key)
        assert r.code == 202, r.body
        assert r.json() == {"status": "queued", "delivery_id": d1, "message_id": m1}  # pending one reused

        svc = _service(db, clock)
        assert await svc.run_once() == 2
        r = await api.request("POST", f"{base}/messages/{m1}/redeliver", key=key)
        assert r.code == 202
        d3 = r.json()["delivery_id"]
        assert d3 not in (d1, d2) and d3.startswith("dlv_")
        assert await svc.run_once() == 1
        assert sink.received[-1].json()["delivery_id"] == d3
        assert sink.received[-1].json()["attempt"] == 1
        assert sink.received[-1].headers["webhook-id"] == m1

        r = await api.request("GET", f"{base}/deliveries", key=key)
        assert r.code == 200, r.body
        items = r.json()["deliveries"]
        assert [d["id"] for d in items][0] == d3 and len(items) == 3
        first = items[0]
        assert list(first) == ["id", "message_id", "agent_id", "webhook_url", "status", "attempts",
                               "last_status_code", "last_error", "created_at", "last_attempt_at", "delivered_at"]
        assert first["status"] == "delivered" and first["last_error"] == ""

        r = await api.request("GET", f"{base}/deliveries?message_id={m1}", key=key)
        assert sorted(d["id"] for d in r.json()["deliveries"]) == sorted([d1, d3])
        r = await api.request("GET", f"{base}/deliveries?status=pending", key=key)
        assert r.json() == {"deliveries": []}
        r = await api.request("GET", f"{base}/deliveries?status=bogus", key=key)
        assert (r.code, r.json()["error"]["code"]) == (400, "invalid_field")

        seen = []
        token = None
        while True:
            path = f"{base}/deliveries?page_size=1" + (f"&token={token}" if token else "")
            r = await api.request("GET", path, key=key)
            assert r.code == 200
            seen += [d["id"] for d in r.json()["deliveries"]]
            token = r.json().get("next_token")
            if not token:
                break
        assert seen == [d["id"] for d in items]
        r = await api.request("GET", f"{base}/deliveries?status=delivered&token={token or 'x'}", key=key)
        assert (r.code, r.json()["error"]["code"]) == (400, "invalid_pagination_token")

        r = await api.request("POST", f"{base}/messages/msg_{'0' * 32}/redeliver", key=key)
        assert (r.code, r.json()["error"]["code"]) == (404, "message_not_found")
        r = await api.request("POST", f"/api/v1/agents/nobody@{DOMAIN}/messages/{m1}/redeliver", key=key)
        assert (r.code, r.json()["error"]["code"]) == (404, "agent_not_found")
        lm, _ld = await _message(db, user_id, local, secret, delivery=False)
        r = await api.request("POST", f"/api/v1/agents/{local}/messages/{lm}/redeliver", key=key)
        assert (r.code, r.json()["error"]["code"]) == (409, "agent_not_cloud")
        await db.execute("UPDATE agents SET webhook_status = 'disabled', webhook_disabled_at = now() WHERE id = %s", (agent,))
        r = await api.request("POST", f"{base}/messages/{m2}/redeliver", key=key)
        assert (r.code, r.json()["error"]["code"]) == (409, "webhook_disabled")
        r = await api.request("GET", f"{base}/deliveries")
        assert r.code == 401
        await svc.stop()
    finally:
        await sink.stop()
