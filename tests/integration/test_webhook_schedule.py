"""The worker's whole webhook retry schedule under task.Clock (mail.md §4.3, §4.4; issue 4).

backoff's pure functions are table-tested in tests/unit; this drives a real DeliveryService
against the real database and a loopback sink that always fails, step by step along a short
``webhooks.retry_schedule`` with no jitter, so every due time is exact: nothing is attempted a
moment before a step is due, exactly one attempt when it is, ``failed`` after
``len(schedule) + 1`` attempts and silence afterwards. Then the ``Retry-After`` cap.

The setup is a minimal copy of tests/integration/test_webhook_delivery.py's (that file belongs
to another change); the clock starts on a whole second so that every step lands on a value
PostgreSQL's microsecond timestamps and the float clock both represent exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor, task
from twisted.web import resource, server

from e2a import ids
from e2a.config import WebhooksConfig
from e2a.delivery.worker import DeliveryService
from e2a.mailauth import authheaders
from e2a.mailauth.dns import DnsClient
from e2a.store import accounts
from e2a.store.database import Database
from tests.support.apiserver import TEST_MASTER_KEY

DOMAIN = "acme.test"
SCHEDULE = (5, 30, 120)
RAW = b"From: Alice <alice@example.com>\r\nTo: bot@acme.test\r\nSubject: hi\r\nMessage-ID: <m@example.com>\r\n\r\nHello\r\n"


class _FailingSink(resource.Resource):
    """Answers every POST with one fixed status (and headers); records the clock time of each."""

    isLeaf = True

    def __init__(self, clock: task.Clock, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.status = status
        self.headers = headers or {}
        self.arrivals: list[tuple[float, dict[str, Any]]] = []

    def render_POST(self, request: server.Request) -> bytes:  # noqa: N802 - twisted.web API
        self.arrivals.append((self.clock.seconds(), json.loads(request.content.read())))
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return b"no"


@pytest_twisted.async_yield_fixture
async def sinks():
    """``start(clock, status, headers) -> (sink, url)``; every listener is closed afterwards."""
    ports = []

    def start(clock: task.Clock, status: int, headers: dict[str, str] | None = None):
        sink = _FailingSink(clock, status, headers)
        site = server.Site(sink)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return sink, f"http://127.0.0.1:{port.getHost().port}/hook"

    yield start
    for port in ports:
        await port.stopListening()


def _clock() -> task.Clock:
    """A clock on a whole second just after real time: rows inserted with the database's now()
    are already due, and every later due time is an exact float."""
    clock = task.Clock()
    clock.advance(math.ceil(time.time()) + 1)
    return clock


async def _pending_delivery(db: Database, url: str) -> tuple[str, str]:
    """A cloud agent with webhook ``url``, one inbound message signed at receipt and its delivery
    due now. Returns (message id, delivery id)."""
    boot = await accounts.bootstrap(db, TEST_MASTER_KEY, "owner@example.com")
    agent = f"bot@{DOMAIN}"
    await db.execute("INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE)", (DOMAIN, boot.user.id))
    await db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
        " VALUES (%s, %s, %s, 'cloud', %s, 'active')",
        (agent, boot.user.id, DOMAIN, url),
    )
    message_id, delivery_id = ids.new_message_id(), ids.new_delivery_id()
    fields = authheaders.build_fields(
        verified=True, sender="alice@example.com", entity_type="human",
        domain_check="spf=pass; dkim=none; dmarc=none", signed_at=datetime.now(UTC),
        message_id=message_id, stored=RAW,
    )

    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, sender, display_from, recipient,"
            " to_addrs, raw_message, auth_headers) VALUES (%s, %s, %s, 'inbound', 'unread', %s, %s, %s, %s, %s, %s)",
            (message_id, agent, boot.user.id, "alice@example.com", "alice@example.com", agent,
             json.dumps([agent]), RAW, json.dumps(authheaders.auth_headers(fields, boot.signing_secret))),
        )
        await txn.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at)"
            " VALUES (%s, %s, %s, %s, 'pending', now())",
            (delivery_id, message_id, agent, url),
        )

    await db.run("test_insert_message", _txn)
    return message_id, delivery_id


def _service(db: Database, clock: task.Clock, **config: Any) -> DeliveryService:
    cfg = replace(WebhooksConfig(allow_private=True, retry_schedule=SCHEDULE, jitter=0.0), **config)
    dns = DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor)  # never asked: the URL is an IP literal
    # rng is irrelevant with jitter 0; a value far from 0.5 would expose jitter leaking in.
    return DeliveryService(db, None, dns, cfg, False, TEST_MASTER_KEY, reactor, clock, rng=lambda: 0.99)


async def _row(db: Database, delivery_id: str) -> dict[str, Any]:
    row = await db.fetchone("SELECT * FROM deliveries WHERE id = %s", (delivery_id,))
    assert row is not None
    return row


@pytest_twisted.ensureDeferred
async def test_always_500_follows_whole_schedule_then_failed(db, sinks):
    """Always 500: attempts exactly at t0, +5, +35, +155, then failed with 4 attempts, then nothing."""
    clock = _clock()
    sink, url = sinks(clock, 500)
    message_id, delivery_id = await _pending_delivery(db, url)
    svc = _service(db, clock)
    t0 = clock.seconds()
    expected_times = [t0]
    for step in SCHEDULE:
        expected_times.append(expected_times[-1] + step)
    try:
        assert await svc.run_once() == 1
        for attempt, step in enumerate(SCHEDULE, start=1):
            row = await _row(db, delivery_id)
            assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == (
                "pending", attempt, 500, "HTTP 500")
            assert row["last_attempt_at"].timestamp() == expected_times[attempt - 1]
            assert row["next_attempt_at"].timestamp() == expected_times[attempt]  # exactly one step later
            clock.advance(step - 0.001)
            assert await svc.run_once() == 0  # a millisecond early: not due
            clock.advance(0.001)
            assert await svc.run_once() == 1
        row = await _row(db, delivery_id)
        assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == (
            "failed", len(SCHEDULE) + 1, 500, "HTTP 500")
        assert row["next_attempt_at"] is None and row["leased_until"] is None and row["delivered_at"] is None
        assert [when for when, _body in sink.arrivals] == expected_times
        assert [body["attempt"] for _when, body in sink.arrivals] == [1, 2, 3, 4]
        assert {body["delivery_id"] for _when, body in sink.arrivals} == {delivery_id}
        assert {body["message_id"] for _when, body in sink.arrivals} == {message_id}
        # Exhausted for good: a day later (and the whole default schedule later) nothing is attempted.
        for later in (86400, sum(WebhooksConfig().retry_schedule)):
            clock.advance(later)
            assert await svc.run_once() == 0
        assert len(sink.arrivals) == len(SCHEDULE) + 1
        assert (await _row(db, delivery_id))["attempts"] == len(SCHEDULE) + 1
    finally:
        await svc.stop()


@pytest.mark.parametrize("cap", [None, 600])
@pytest_twisted.ensureDeferred
async def test_503_huge_retry_after_is_capped(db, sinks, cap):
    """503 with Retry-After: 999999 → the next attempt is due exactly webhooks.retry_after_cap later."""
    config = {} if cap is None else {"retry_after_cap": cap}
    expected_cap = WebhooksConfig().retry_after_cap if cap is None else cap
    clock = _clock()
    sink, url = sinks(clock, 503, {"Retry-After": "999999"})
    _message_id, delivery_id = await _pending_delivery(db, url)
    svc = _service(db, clock, **config)
    t0 = clock.seconds()
    try:
        assert await svc.run_once() == 1
        row = await _row(db, delivery_id)
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("pending", 1, 503)
        assert row["next_attempt_at"].timestamp() == t0 + expected_cap  # not 999999 s, not the 5 s step
        clock.advance(expected_cap - 0.001)
        assert await svc.run_once() == 0
        clock.advance(0.001)
        assert await svc.run_once() == 1
        assert [when for when, _body in sink.arrivals] == [t0, t0 + expected_cap]
        row = await _row(db, delivery_id)
        assert row["next_attempt_at"].timestamp() == t0 + 2 * expected_cap  # capped again, not the 30 s step
    finally:
        await svc.stop()
