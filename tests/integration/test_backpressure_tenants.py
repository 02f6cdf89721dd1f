"""Issue 15.4: one tenant's stuck webhook slows only its own mail.

The attack: a user's cloud agent whose webhook never answers, plus 150 mails to it. With the
global gate every other user's cloud-agent mail then waited ``max_wait`` (5 s) for its 250.
Here the whole path runs on 127.0.0.1: SMTP → InboundPipeline → PostgreSQL → DeliveryService →
webhook sinks (one never answers, one answers 200 at once). The gate's clock is a
``task.Clock`` that the test never advances, so ``max_wait`` never passes: mail held by a gate
never gets its 250, and mail that gets one was not held, however slow the machine.
"""

from __future__ import annotations

import pytest_twisted

from twisted.internet import defer, reactor, task
from twisted.web import server

from e2a.config import WebhooksConfig
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.port import DeliveryPort
from e2a.delivery.worker import DeliveryService
from e2a.mailauth.dns import DnsClient
from e2a.store import accounts
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.inboundstack import DOMAIN, InboundStack, WebhookReceiver, message, send
from tests.support.waiting import wait_for

STUCK = f"stuck@{DOMAIN}"
VICTIM = f"victim@{DOMAIN}"
ATTACK_MAILS = 150


@pytest_twisted.async_yield_fixture
async def env(db):
    clock = task.Clock()
    bp = Backpressure(clock, high_water=64, low_water=32, max_wait=5.0)
    config = WebhooksConfig(allow_private=True, timeout=60)
    delivery_port = DeliveryPort(config, reactor, backpressure=bp)  # the inbound → delivery port
    stack = await InboundStack(db).setup({"stuck": "cloud"}, delivery=delivery_port)
    other = await accounts.bootstrap(db, TEST_MASTER_KEY, "other-tenant@example.com")
    await stack.add_agents({"victim": "cloud"}, user_id=other.user.id)
    hooks = {"stuck": WebhookReceiver(hang=True), "victim": WebhookReceiver(hang=False)}
    ports = {}
    for name, hook in hooks.items():
        site = server.Site(hook)
        site.noisy = False
        ports[name] = reactor.listenTCP(0, site, interface="127.0.0.1")
        await db.execute(
            "UPDATE agents SET webhook_url = %s WHERE id = %s",
            (f"http://127.0.0.1:{ports[name].getHost().port}/hook", f"{name}@{DOMAIN}"),
        )
    svc = DeliveryService(
        db, None, DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor),
        config, False, TEST_MASTER_KEY, reactor, reactor, poll_interval=0.1, port=delivery_port,
    )
    await svc.start()
    yield stack, bp, hooks, clock
    bp.open()
    for hook in hooks.values():
        for request in hook.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
    await svc.stop()
    await stack.close()
    for port in ports.values():
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_stuck_tenant_backlog_does_not_slow_other_tenants(env, db):
    """150 mails to a never-answering webhook close that agent's gate; another tenant's
    cloud-agent mail still gets its 250 (without ``max_wait`` passing) and is delivered exactly
    once, while new mail to the stuck agent waits."""
    stack, bp, hooks, clock = env
    port = stack.listen()
    accepts = [
        defer.Deferred.fromCoroutine(stack.pipeline.accept(_Envelope((STUCK,)), message(f"<a{i}@x>")))
        for i in range(ATTACK_MAILS)
    ]
    await defer.gatherResults(accepts)
    clock.advance(bp.refresh_interval)  # the gate's next count is due (sees the backlog)

    async def holding() -> bool:
        return bp.holding

    await wait_for(holding, timeout=10, step=0.02)

    victim = defer.Deferred.fromCoroutine(send(port, "alice@example.com", [VICTIM], message("<victim@x>")))
    await wait_for(lambda: victim.called, timeout=10, step=0.02)
    reply = await victim
    assert reply.code == 250, reply
    assert bp.waiting == 0

    async def delivered() -> bool:
        row = await db.fetchone(
            "SELECT count(*) AS n FROM deliveries WHERE agent_id = %s AND status = 'delivered'", (VICTIM,)
        )
        return row["n"] == 1

    await wait_for(delivered, timeout=10, step=0.05)
    assert len(hooks["victim"].bodies) == 1  # exactly once

    # The stuck agent's own new mail is still held back (before its 250).
    held = defer.Deferred.fromCoroutine(send(port, "alice@example.com", [STUCK], message("<more@x>")))

    async def waiting() -> bool:
        return bp.waiting == 1

    await wait_for(waiting, timeout=10, step=0.02)
    assert not held.called
    bp.open()  # release it (the fixture stops the worker)
    assert (await held).code == 250


class _Envelope:
    def __init__(self, recipients: tuple[str, ...]) -> None:
        self.recipients = recipients
        self.client_ip = "127.0.0.1"
        self.helo = "client.example"
        self.helo_kind = "EHLO"
        self.tls = False
        self.mail_from = "alice@example.com"
