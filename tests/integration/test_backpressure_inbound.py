"""Backpressure end to end on the database: a DeliveryService counts the due webhook backlog
and InboundPipeline.accept waits (before verification) while it is high; task.Clock for time."""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.config import WebhooksConfig
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.worker import DeliveryService
from e2a.inbound import InboundPipeline, TraceInput
from e2a.store import accounts
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.inboundstack import Envelope

DOMAIN = "acme.test"
RAW = b"From: Alice <alice@example.com>\r\nTo: bot@acme.test\r\nSubject: hi\r\nMessage-ID: <m@example.com>\r\n\r\nHi\r\n"
TRACE = TraceInput(
    spf="pass", dkim=[], dmarc="none", from_domain="example.com",
    domain_check="spf=pass; dkim=none; dmarc=none", verified=False, from_address="alice@example.com",
)


class CountingVerifier:
    def __init__(self) -> None:
        self.calls = 0

    async def verify(
        self, raw: bytes, client_ip: str, helo: str, mail_from: str, header_fields: Any = None, crlf_only: bool = False
    ) -> Any:
        self.calls += 1
        return None


class NoClient:
    async def close(self) -> None:
        pass


async def _setup(db) -> tuple[str, str]:
    boot = await accounts.bootstrap(db, TEST_MASTER_KEY, "owner@example.com")
    await db.execute("INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE)", (DOMAIN, boot.user.id))
    for local, mode in (("bot", "cloud"), ("local", "local")):
        await db.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (f"{local}@{DOMAIN}", boot.user.id, DOMAIN, mode,
             "http://127.0.0.1:9/hook" if mode == "cloud" else "", "active" if mode == "cloud" else "none"),
        )
    return boot.user.id, f"bot@{DOMAIN}"


async def _backlog(db, user_id: str, agent: str, n: int, tag: str) -> None:
    """``n`` messages with a pending delivery due a minute ago (due on the test clock too)."""
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status, recipient, raw_message, auth_headers)"
        " SELECT %(tag)s || g, %(agent)s, %(user)s, 'inbound', 'unread', %(agent)s, 'x', '{}'"
        " FROM generate_series(1, %(n)s) g",
        {"tag": f"msg_{tag}_", "agent": agent, "user": user_id, "n": n},
    )
    await db.execute(
        "INSERT INTO deliveries (id, message_id, agent_id, status, next_attempt_at)"
        " SELECT 'dlv_' || %(tag)s || g, %(tag0)s || g, %(agent)s, 'pending', now() - interval '1 minute'"
        " FROM generate_series(1, %(n)s) g",
        {"tag": tag + "_", "tag0": f"msg_{tag}_", "agent": agent, "n": n},
    )


async def _drain(db, n: int) -> None:
    await db.execute(
        "UPDATE deliveries SET status = 'delivered', next_attempt_at = NULL"
        " WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' ORDER BY id LIMIT %s)",
        (n,),
    )


async def _refreshed(svc: DeliveryService, bp: Backpressure, clock: task.Clock) -> None:
    """Let the worker's safety poll run on the clock, and wait for its backlog count."""
    counted = bp.next_update()
    clock.advance(1.0)
    await counted.addTimeout(10, reactor)
    assert not bp.refreshing


@pytest_twisted.ensureDeferred
async def test_accept_waits_while_webhook_backlog_is_high(db):
    """Backlog 70 ≥ 64: a cloud-bound accept waits before verification, local mail does not;
    a drain to ≤ 32 releases it; a backlog that stays high releases after max wait."""
    user_id, cloud = await _setup(db)
    clock = task.Clock()
    clock.advance(time.time())
    bp = Backpressure(clock, high_water=64, low_water=32, max_wait=5.0, stale_after=60.0)
    svc = DeliveryService(
        db, None, None, WebhooksConfig(), False, TEST_MASTER_KEY, reactor, clock,
        max_in_flight=0, client=NoClient(), backpressure=bp,  # counts, never claims
    )
    verifier = CountingVerifier()
    pipeline = InboundPipeline(
        db, verifier, TEST_MASTER_KEY, "mx.e2a.test", "mx.e2a.test", to_trace=lambda _v: TRACE, delivery=svc.port
    )
    await _backlog(db, user_id, cloud, 70, "a")
    await svc.start()
    await _refreshed(svc, bp, clock)
    assert bp.backlog == 70 and bp.holding

    held = defer.Deferred.fromCoroutine(pipeline.accept(Envelope((cloud,)), RAW))
    assert bp.waiting == 1  # the accept registered its wait before its first statement
    assert not held.called and verifier.calls == 0

    # Mail for a local agent adds nothing to the webhook backlog: it goes straight through.
    local_id = await pipeline.accept(Envelope((f"local@{DOMAIN}",)), RAW)
    assert local_id.startswith("msg_") and verifier.calls == 1

    await _drain(db, 30)  # 40 left: between the marks, still holding
    await _refreshed(svc, bp, clock)
    assert bp.backlog == 40 and not held.called
    await _drain(db, 10)  # 30 left: at or below low water, the gate opens
    await _refreshed(svc, bp, clock)
    msg_id = await held
    assert msg_id.startswith("msg_") and bp.expired == 0 and verifier.calls == 2
    row = await db.fetchone("SELECT status FROM deliveries WHERE message_id = %s", (msg_id,))
    assert row is not None and row["status"] == "pending"

    # A backlog that does not drain: the accept goes ahead after max_wait, never a failure.
    await _backlog(db, user_id, cloud, 40, "b")
    await _refreshed(svc, bp, clock)
    assert bp.holding
    late = defer.Deferred.fromCoroutine(pipeline.accept(Envelope((cloud,)), RAW))
    assert bp.waiting == 1
    clock.advance(4.9)
    assert not late.called
    clock.advance(0.1)
    assert (await late).startswith("msg_")
    assert bp.expired == 1

    await svc.stop()
    assert not bp.holding
