"""The attacker's next step after issue 15.4: many stuck agents instead of one.

Per-agent SMTP backpressure keeps one stuck agent from holding other tenants' 250s, but the
webhook attempt slots of a process are shared (``max_in_flight``, 64 by default, at most
``webhooks.max_concurrency_per_agent`` = 4 per agent) and claimed oldest first. A tenant with
``max_in_flight / 4`` agents whose webhooks never answer (16 with the defaults) holds every slot
for ``webhooks.timeout`` per attempt, and a steady trickle of mail to them keeps it that way:
another tenant's webhook then waited for a slot. Scaled down here (8 slots, 3 stuck agents).
The fix: no user holds more than its share of a process's slots (``Slots.max_per_user``, half
of them by default; docs/decisions.md), so the other half stays open to other tenants.
"""

from __future__ import annotations

import pytest_twisted

from twisted.internet import defer, reactor
from twisted.web import server

from e2a.config import WebhooksConfig
from e2a.delivery.port import DeliveryPort
from e2a.delivery.worker import DeliveryService
from e2a.mailauth.dns import DnsClient
from e2a.store import accounts
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.inboundstack import DOMAIN, InboundStack, WebhookReceiver, message
from tests.support.waiting import wait_for

STUCK = [f"stuck{i}@{DOMAIN}" for i in range(3)]
VICTIM = f"victim@{DOMAIN}"


class _Envelope:
    def __init__(self, recipients: tuple[str, ...]) -> None:
        self.recipients = recipients
        self.client_ip = "127.0.0.1"
        self.helo = "client.example"
        self.helo_kind = "EHLO"
        self.tls = False
        self.mail_from = "alice@example.com"


@pytest_twisted.async_yield_fixture
async def env(db):
    config = WebhooksConfig(allow_private=True, timeout=60, max_concurrency_per_agent=4)
    delivery_port = DeliveryPort(config, reactor, max_in_flight=8)  # the inbound → delivery port
    stack = await InboundStack(db).setup({f"stuck{i}": "cloud" for i in range(3)}, delivery=delivery_port)
    other = await accounts.bootstrap(db, TEST_MASTER_KEY, "other-tenant@example.com")
    await stack.add_agents({"victim": "cloud"}, user_id=other.user.id)
    hooks = {"stuck": WebhookReceiver(hang=True), "victim": WebhookReceiver(hang=False)}
    ports = {}
    for name, hook in hooks.items():
        site = server.Site(hook)
        site.noisy = False
        ports[name] = reactor.listenTCP(0, site, interface="127.0.0.1")
    for agent in [*STUCK, VICTIM]:
        name = "victim" if agent == VICTIM else "stuck"
        await db.execute("UPDATE agents SET webhook_url = %s WHERE id = %s",
                         (f"http://127.0.0.1:{ports[name].getHost().port}/hook", agent))
    svc = DeliveryService(
        db, None, DnsClient([("127.0.0.1", 9)], timeout=1, reactor=reactor),
        config, False, TEST_MASTER_KEY, reactor, reactor, poll_interval=0.1, port=delivery_port,
    )
    await svc.start()
    yield stack, hooks
    for hook in hooks.values():
        for request in hook.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
    await svc.stop()
    await stack.close()
    for port in ports.values():
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_many_stuck_agents_do_not_starve_other_tenants_webhooks(env, db):
    """30 mails to 3 never-answering agents of one tenant take only that tenant's share of the
    8 slots (4); another tenant's mail still reaches its (prompt) webhook within 5 s."""
    stack, hooks = env
    await defer.gatherResults([
        defer.Deferred.fromCoroutine(stack.pipeline.accept(_Envelope((STUCK[i % 3],)), message(f"<a{i}@x>")))
        for i in range(30)
    ])

    async def slots_taken() -> bool:
        return len(hooks["stuck"].hanging) >= 4

    await wait_for(slots_taken, timeout=10, step=0.05)
    await defer.Deferred.fromCoroutine(stack.pipeline.accept(_Envelope((VICTIM,)), message("<victim@x>")))

    async def delivered() -> bool:
        return len(hooks["victim"].bodies) == 1

    await wait_for(delivered, timeout=5, step=0.05)
    assert len(hooks["stuck"].hanging) == 4  # never more than the tenant's share
