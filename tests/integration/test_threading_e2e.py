"""Threading across the email boundary, end to end on sockets: a human mails agent A, A
replies through the API via the smarthost, the human answers e2a's Message-ID and the answer
arrives in A's conversation."""

from __future__ import annotations

import re

import dkim
import pytest_twisted

from twisted.internet import reactor

from e2a.config import DnsConfig, OutboundSmtpConfig
from e2a.store import accounts
from tests.integration.test_inbound_e2e import KEY, dns_zone  # noqa: F401 - fixture
from tests.integration.test_send_internal import Client
from tests.support.mail import make_message, send_mail
from tests.support.smtpsink import start_smtp_sink
from tests.support.waiting import wait_for


@pytest_twisted.ensureDeferred
async def test_human_reply_to_agent_mail_keeps_conversation(e2a_service_factory, dns_zone):  # noqa: F811
    """Reply via the smarthost carries <msg_…@M>, is DKIM-signed, and the human's answer
    (In-Reply-To = that id) gets the conversation id the agent used."""
    sink = await start_smtp_sink(reactor)
    try:
        service = await e2a_service_factory(
            dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2),
            outbound_smtp=OutboundSmtpConfig(host="127.0.0.1", port=sink.port, tls="none"),
        )
        boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
        api = Client(service, boot.api_key_plaintext)
        assert (await api.call("POST", "/api/v1/agents", {"slug": "alpha", "agent_mode": "local"})).code == 201
        smtp_port = service.smtp_port.getHost().port

        first = KEY.sign(make_message(from_addr="alice@example.org", to_addr="alpha@agents.test", subject="Quote?",
                                      message_id="<q1@example.org>"))
        assert (await send_mail(smtp_port, "alice@example.org", ["alpha@agents.test"], first)).code == 250
        [msg] = (await api.call("GET", "/api/v1/agents/alpha@agents.test/messages")).json()["messages"]
        assert "conversation_id" not in msg

        delivered = sink.wait_for("DOT")
        reply = await api.call(
            "POST",
            f"/api/v1/agents/alpha@agents.test/messages/{msg['message_id']}/reply",
            {"body": "It is 42.\n.\nQUIT\n", "conversation_id": "deal-7"},
        )
        assert reply.code == 200, reply.body
        out = reply.json()
        assert out["method"] == "smtp" and out["delivery_status"] == "queued"
        await delivered.addTimeout(30, reactor)

        async def recorded() -> bool:
            row = await service.db.fetchone("SELECT delivery_status FROM messages WHERE id = %s", (out["message_id"],))
            return row["delivery_status"] == "sent"

        await wait_for(recorded)
        [relayed] = sink.messages
        assert sink.violations == []
        assert relayed.mail_from == "alpha@agents.test" and relayed.recipients == ["alice@example.org"]
        content = relayed.content
        smtp_id = re.search(rb"^Message-ID: (<[^>]+>)", content, re.M).group(1).decode()
        assert smtp_id == out["smtp_message_id"]
        assert b"\r\nIn-Reply-To: <q1@example.org>\r\n" in content
        assert b"\r\nX-E2A-Conversation-Id: deal-7\r\n" in content
        assert content.startswith(b"DKIM-Signature:")
        assert b"\r\n.\r\nQUIT" not in relayed.raw  # the agent's "." line was stuffed

        # the signature verifies against the shared domain's generated key
        from e2a.outbound.dkimsign import public_key_b64, thd_load_deployment_key

        selector, pem = thd_load_deployment_key(service.config.data_dir, "agents.test", (), "e2a")

        def dnsfunc(name, timeout=5):
            assert name.decode().startswith(f"{selector}._domainkey.agents.test")
            return f"v=DKIM1; k=rsa; p={public_key_b64(pem)}".encode()

        assert dkim.verify(content, dnsfunc=dnsfunc)

        answer = KEY.sign(
            make_message(
                from_addr="alice@example.org",
                to_addr="alpha@agents.test",
                subject="Re: Quote?",
                message_id="<q2@example.org>",
                extra_headers=f"In-Reply-To: {smtp_id}\r\nReferences: <q1@example.org> {smtp_id}\r\n",
            )
        )
        assert (await send_mail(smtp_port, "alice@example.org", ["alpha@agents.test"], answer)).code == 250
        listing = (await api.call("GET", "/api/v1/agents/alpha@agents.test/messages")).json()["messages"]
        latest = [m for m in listing if m["subject"] == "Re: Quote?"]
        assert latest and latest[0]["conversation_id"] == "deal-7"

        detail = (await api.call("GET", f"/api/v1/messages/{out['message_id']}")).json()
        assert detail["delivery_status"] == "sent" and detail["recipients"][0]["status"] == "sent"
        assert detail["provider_message_id"] == "ABC123" or detail.get("provider_message_id")
    finally:
        await sink.stop()
