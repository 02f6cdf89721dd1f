"""Scale-out: two e2a nodes — each with its own data directory, listeners and workers, as two
hosts would run them — on ONE PostgreSQL database with the same master key and HMAC secret
(docs/deployment.md, "Several nodes on one PostgreSQL"). What one node accepts, the other
delivers and serves; what one node seals or mints, the other opens."""

from __future__ import annotations

import base64
import collections
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted
from standardwebhooks.webhooks import Webhook

from twisted.internet import defer, threads

from e2a.config import DnsConfig, SigningConfig, WebhooksConfig
from e2a.mailauth import authheaders
from e2a.outbound.dkimsign import thd_load_deployment_key
from e2a.store import accounts
from tests.integration.test_send_internal import Client
from tests.integration.test_webhook_delivery import Sink
from tests.support import wsclient
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

HMAC_SECRET = "scale-out-test-hmac-secret-0123456789abcdef"
SENDER = "alice@example.org"
LOCAL = "local@agents.test"
CLOUD = "cloud@agents.test"


@dataclass
class Nodes:
    a: Any  # E2AService of node A
    b: Any  # E2AService of node B
    boot: Any  # the owner's bootstrap result (user, API key, first signing secret)
    api_a: Client
    api_b: Client

    def smtp_a(self) -> int:
        return self.a.smtp_port.getHost().port

    def http_b(self) -> int:
        return self.b.http_port.getHost().port


async def two_nodes(e2a_service_factory: Any, dns_zone: Any) -> Nodes:
    """Node A and node B: separate data directories (the factory gives each its own and copies
    A's master.key into B's), one database, one HMAC secret, one owner with a local agent."""
    config = {
        "dns": DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2),
        "webhooks": WebhooksConfig(allow_private=True),
        "signing": SigningConfig(hmac_secret=HMAC_SECRET),
    }
    a = await e2a_service_factory(**config)
    b = await e2a_service_factory(**config)
    assert a.data_dir != b.data_dir and a.master_key == b.master_key
    boot = await accounts.bootstrap(a.db, a.master_key, "owner@example.com")
    nodes = Nodes(a, b, boot, Client(a, boot.api_key_plaintext), Client(b, boot.api_key_plaintext))
    r = await nodes.api_a.call("POST", "/api/v1/agents", {"slug": LOCAL.split("@")[0], "agent_mode": "local"})
    assert r.code == 201, r.body
    return nodes


def accepted_id(reply: Any) -> str:
    assert reply.code == 250, reply
    return reply.text.rsplit(" ", 1)[1]


def attempts(service: Any) -> float:
    """Webhook POSTs this node made (its own counter: with one process per node, per node)."""
    return sum(
        s.value for m in service.metrics.registry.collect() if m.name == "e2a_webhook_attempts"
        for s in m.samples if s.name == "e2a_webhook_attempts_total"
    )


def verify_auth_headers(detail: dict[str, Any], secret: str) -> None:
    """The agent's check of the X-E2A-Auth-* headers (docs/mailauth.md) with one secret."""
    headers = detail["auth_headers"]
    signed_at = datetime.strptime(headers["X-E2A-Auth-Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    authheaders.verify(headers, base64.b64decode(detail["raw_message"]), [secret], signed_at)


@pytest_twisted.ensureDeferred
async def test_mail_accepted_on_one_node_is_delivered_by_webhook_exactly_once(e2a_service_factory, dns_zone):
    """12 messages accepted concurrently on node A for a cloud agent, both nodes' delivery
    workers running: every message reaches the webhook exactly once (one attempt in all, one
    `webhook-id`), signed with the user's secret. (Node A takes these itself: a fresh job is
    leased to the accepting node and a delivered slot hands on to the agent's next job.)
    Redeliveries queued through both nodes' APIs wake both workers, which then claim from one
    queue: still one attempt per job. With A's worker stopped, B delivers A's mail."""
    nodes = await two_nodes(e2a_service_factory, dns_zone)
    sink = await Sink().start()
    try:
        await nodes.a.db.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
            " VALUES (%s, %s, 'agents.test', 'cloud', %s, 'active')",
            (CLOUD, nodes.boot.user.id, sink.url()),
        )

        async def deliver(count: int, tag: str) -> list[str]:
            replies = await defer.gatherResults([
                defer.ensureDeferred(send_mail(
                    nodes.smtp_a(), SENDER, [CLOUD],
                    make_message(from_addr=SENDER, to_addr=CLOUD, message_id=f"<{tag}{i}@example.org>"),
                ))
                for i in range(count)
            ])
            ids = [accepted_id(r) for r in replies]

            async def all_delivered() -> bool:
                rows = await nodes.a.db.fetchall(
                    "SELECT status FROM deliveries WHERE message_id = ANY(%s)", (ids,)
                )
                return len(rows) == count and all(r["status"] == "delivered" for r in rows)

            await wait_for(all_delivered, timeout=20)
            return ids

        first = await deliver(12, "burst")
        # Nothing is still in flight on either node, then count what arrived.
        await nodes.a.delivery.wait_idle()
        await nodes.b.delivery.wait_idle()
        got = collections.Counter(r.json()["message_id"] for r in sink.received)
        assert got == collections.Counter(first), got
        assert len({r.headers["webhook-id"] for r in sink.received}) == len(first)
        assert attempts(nodes.a) + attempts(nodes.b) == len(first)
        rows = await nodes.a.db.fetchall("SELECT attempts FROM deliveries WHERE message_id = ANY(%s)", (first,))
        assert [r["attempts"] for r in rows] == [1] * len(first)
        whsec = "whsec_" + base64.b64encode(nodes.boot.signing_secret.encode("ascii")).decode("ascii")
        sample = sink.received[0]
        sw_headers = {k: v for k, v in sample.headers.items() if k.startswith("webhook-")}
        assert Webhook(whsec).verify(sample.body, sw_headers)["message_id"] in first

        # Redeliveries queued through both nodes' APIs: each commit NOTIFYs every node and
        # both workers claim from the same queue (SKIP LOCKED): still one attempt per job.
        before = attempts(nodes.a) + attempts(nodes.b)
        redone = await defer.gatherResults([
            defer.ensureDeferred((nodes.api_a, nodes.api_b)[i % 2].call(
                "POST", f"/api/v1/agents/{CLOUD}/messages/{mid}/redeliver"
            ))
            for i, mid in enumerate(first)
        ])
        assert all(r.code == 202 for r in redone), [(r.code, r.body) for r in redone]
        jobs = [r.json()["delivery_id"] for r in redone]
        assert len(set(jobs)) == len(first)

        async def redelivered() -> bool:
            rows = await nodes.a.db.fetchall("SELECT status FROM deliveries WHERE id = ANY(%s)", (jobs,))
            return all(r["status"] == "delivered" for r in rows)

        await wait_for(redelivered, timeout=20)
        await nodes.a.delivery.wait_idle()
        await nodes.b.delivery.wait_idle()
        again = collections.Counter(r.json()["delivery_id"] for r in sink.received[len(first):])
        assert again == collections.Counter(jobs), again
        assert attempts(nodes.a) + attempts(nodes.b) - before == len(first)
        received = len(sink.received)

        # Node A's worker stops (say, that host is draining): mail it accepts waits in the
        # queue and node B's worker delivers it, once.
        await nodes.a.delivery.stop()
        before_a, before_b = attempts(nodes.a), attempts(nodes.b)
        second = await deliver(3, "later")
        await nodes.b.delivery.wait_idle()
        later = collections.Counter(r.json()["message_id"] for r in sink.received[received:])
        assert later == collections.Counter(second), later
        assert (attempts(nodes.a) - before_a, attempts(nodes.b) - before_b) == (0, 3)
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_websocket_on_one_node_gets_mail_accepted_on_the_other(e2a_service_factory, dns_zone):
    """A local agent's WebSocket held by node B is pushed the mail node A accepted (LISTEN/NOTIFY
    crosses nodes); REST on node B lists it unread; a key revoked through node A closes the
    agent-key socket on node B with 1008."""
    nodes = await two_nodes(e2a_service_factory, dns_zone)
    r = await nodes.api_a.call("POST", "/api/v1/keys", {"name": "agent", "agent": LOCAL})
    assert r.code == 201, r.body
    agent_key = r.json()
    user_ws = await wsclient.connect(nodes.http_b(), LOCAL, bearer=nodes.boot.api_key_plaintext)
    agent_ws = await wsclient.connect(nodes.http_b(), LOCAL, bearer=agent_key["key"])
    try:
        assert (await user_ws.frame()) == {"type": "drained", "count": 0}
        assert (await agent_ws.frame()) == {"type": "drained", "count": 0}
        assert nodes.b.websocket.registry.count(LOCAL) == 2 and nodes.a.websocket.registry.count(LOCAL) == 0

        mid = accepted_id(await send_mail(
            nodes.smtp_a(), SENDER, [LOCAL], make_message(from_addr=SENDER, to_addr=LOCAL, subject="Across")
        ))
        for ws in (user_ws, agent_ws):
            frame = await ws.frame()
            assert (frame["type"], frame["message_id"], frame["subject"]) == ("message", mid, "Across")

        listing = await nodes.api_b.call("GET", f"/api/v1/agents/{LOCAL}/messages?status=unread")
        assert listing.code == 200, listing.body
        assert [m["message_id"] for m in listing.json()["messages"]] == [mid]

        revoked = await nodes.api_a.call("DELETE", f"/api/v1/keys/{agent_key['id']}")
        assert revoked.code in (200, 204), revoked.body
        assert await wsclient.within(agent_ws.closed) == (1008, "key revoked")
        second = accepted_id(await send_mail(
            nodes.smtp_a(), SENDER, [LOCAL],
            make_message(from_addr=SENDER, to_addr=LOCAL, message_id="<m2@example.org>"),
        ))
        assert (await user_ws.frame())["message_id"] == second
    finally:
        await user_ws.close_and_wait()
        await agent_ws.close_and_wait()


@pytest_twisted.ensureDeferred
async def test_secrets_sealed_or_minted_on_one_node_open_on_the_other(e2a_service_factory, dns_zone):
    """A signing secret created through node B's API signs the X-E2A-Auth-* headers of mail node
    A accepts (A opens what B sealed), and those headers verify with the secret as B's API
    showed it, read back through either node; a magic-link token minted on A verifies on B."""
    nodes = await two_nodes(e2a_service_factory, dns_zone)
    created = await nodes.api_b.call("POST", "/api/v1/users/me/signing-secrets", {"name": "rotation"})
    assert created.code == 201, created.body
    secret = created.json()["secret"]

    mid = accepted_id(await send_mail(nodes.smtp_a(), SENDER, [LOCAL], make_message(from_addr=SENDER, to_addr=LOCAL)))
    for api in (nodes.api_b, nodes.api_a):
        detail = await api.call("GET", f"/api/v1/agents/{LOCAL}/messages/{mid}")
        assert detail.code == 200, detail.body
        verify_auth_headers(detail.json(), secret)  # the newest secret signs
        with pytest.raises(authheaders.VerificationError):
            verify_auth_headers(detail.json(), nodes.boot.signing_secret)

    expires = datetime.now(UTC) + timedelta(hours=1)
    token = nodes.a.approval_tokens.mint("msg_0123456789abcdef0123456789abcdef", "approve", expires)
    claims = nodes.b.approval_tokens.verify(token, "approve", datetime.now(UTC))
    assert claims.message_id == "msg_0123456789abcdef0123456789abcdef"


@pytest_twisted.ensureDeferred
async def test_deployment_dkim_key_is_per_data_dir_until_copied(e2a_service_factory, tmp_path):
    """The shared domain's deployment DKIM key lives in each node's data directory: a node
    started on a fresh data directory would generate a key of its own (mail it signs fails the
    one published TXT record); a node whose `dkim/` was copied from the first before its first
    start signs with the published key."""
    a = await e2a_service_factory()
    domain = a.config.shared_domain
    config = a.config
    # The factory gives the second service <tmp_path>/data1; copy A's dkim/ there first.
    shutil.copytree(tmp_path / "data0" / "dkim", tmp_path / "data1" / "dkim")
    b = await e2a_service_factory()
    assert b.data_dir == (tmp_path / "data1").absolute()

    def key(data_dir: Any) -> bytes:
        return thd_load_deployment_key(data_dir, domain, config.dkim.keys, config.dkim.selector)[1]

    key_a, key_b, key_fresh = await threads.deferToThread(
        lambda: (key(a.data_dir), key(b.data_dir), key(tmp_path / "fresh-node"))
    )
    assert key_a == key_b
    assert key_fresh != key_a
