"""The Python SDK against a real e2a service: sync and asyncio clients, listen(), webhooks.

The SDK is blocking (sync) or runs its own asyncio loop, so each SDK session runs in a
worker thread while the reactor keeps serving the e2a service the test started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

from e2a.config import DnsConfig, WebhooksConfig
from e2a.store import accounts
from e2a.v1 import AsyncE2AClient, E2AApiError, E2AClient, MessageList, SendResult, UnverifiedEmailError
from e2a.v1.verify import canonical_string
from tests.integration.test_cli_e2e import http_sink  # noqa: F401 - fixture
from tests.integration.test_inbound_e2e import KEY, dns_zone  # noqa: F401 - fixture
from tests.support.mail import make_message, send_mail

SDK_NAMES = [
    "E2AApi", "AsyncE2AApi", "E2AClient", "AsyncE2AClient", "InboundEmail", "AsyncInboundEmail", "Attachment",
    "AuthHeaders", "MessageList", "MessageSummary", "SendResult",
]


def in_thread(func, *args):
    return deferToThreadPool(reactor, reactor.getThreadPool(), func, *args)


def test_client_imports_resolve_without_server_modules():
    """Both import paths resolve and are in __all__; the client pulls in no twisted/psycopg2/autobahn."""
    code = (
        "import sys, e2a\n"
        "from e2a import E2AClient, E2AApiError\n"
        f"from e2a.v1 import {', '.join(SDK_NAMES)}\n"
        "import e2a.v1\n"
        "assert {'E2AClient', 'E2AApiError'} <= set(e2a.__all__)\n"
        f"assert set({SDK_NAMES!r}) | {{'E2AApiError', 'UnverifiedEmailError'}} <= set(e2a.v1.__all__)\n"
        "assert e2a.E2AClient is e2a.v1.E2AClient\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'psycopg2', 'autobahn', 'klein'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, e2a; print(sorted(m for m in sys.modules if m.startswith(('httpx', 'e2a.'))))"],
        capture_output=True, text=True, timeout=60,
    )
    assert lazy.stdout.strip() == "[]", lazy  # `import e2a` alone stays cheap for the server
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c", "import e2a.v1"], capture_output=True,
                            text=True, timeout=60)
    assert not [ln for ln in timing.stderr.splitlines() if any(m in ln for m in ("twisted", "psycopg2", "autobahn"))]


async def _service(factory, dns_zone, **over):  # noqa: F811
    service = await factory(
        dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2), **over
    )
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    return service, boot, f"http://127.0.0.1:{service.http_port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_sync_and_async_clients_cover_inbox_and_listen(e2a_service_factory, dns_zone):  # noqa: F811
    """Typed results over the real API; mark_read=false leaves mail unread; listen() drains the
    unread message and its ack marks it read; 404/401/400 stop listen at once with E2AApiError."""
    service, boot, url = await _service(e2a_service_factory, dns_zone, webhooks=WebhooksConfig(allow_private=True))
    key = boot.api_key_plaintext

    def thd_sync() -> dict:
        with E2AClient(api_key=key, base_url=url) as client:
            created = client.api.register_agent(slug="bot", agent_mode="local", name="Bot")
            client.agent_email = created["email"]
            test = SendResult.from_json(client.api.send_test_email(created["email"]))
            listing = client.get_messages()
            assert isinstance(listing, MessageList) and len(listing.messages) == 1
            summary = listing.messages[0]
            assert summary.status == "unread" and summary.recipient == "bot@agents.test"
            peek = client.get_message(summary.message_id, mark_read=False)
            assert peek.signature_verified and peek.auth.entity_type == "agent"
            assert client.get_messages().messages[0].message_id == summary.message_id  # still unread
            with pytest.raises(E2AApiError) as info:
                client.get_messages(agent_email="nobody@agents.test")
            assert (info.value.status_code, info.value.code) == (404, "agent_not_found")
            bad = httpx.get(f"{url}/api/v1/agents/bot%40agents.test/messages/{summary.message_id}?mark_read=maybe",
                            headers={"Authorization": f"Bearer {key}"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_field"
            client.api.register_agent(slug="cloudy", agent_mode="cloud", webhook_url="http://127.0.0.1:9/hook")
            revocable = client.api.create_api_key(name="tmp")
            client.api.revoke_api_key(revocable["id"])
            return {"agent": created["email"], "message_id": summary.message_id, "test": test,
                    "revoked": revocable["key"]}

    state = await in_thread(thd_sync)
    assert state["test"].status == "sent" and state["test"].method == "internal"

    async def listen_once() -> list[str]:
        async with AsyncE2AClient(api_key=key, base_url=url, agent_email=state["agent"]) as client:
            got = []
            async for note in client.listen():
                got.append(note.message_id)
                email = await client.get_message(note.message_id, mark_read=False)
                assert email.subject == "e2a test email" or email.subject
                break  # auto_ack acks when the loop asks for the next item: after a break it does not
            return got

    async def listen_and_ack() -> tuple[list[str], list[str]]:
        async with AsyncE2AClient(api_key=key, base_url=url, agent_email=state["agent"]) as client:
            seen: list[str] = []
            agen = client.listen()
            note = await agen.__anext__()
            seen.append(note.message_id)
            # resuming acknowledges the previous message; wait for it to show as read
            pending = asyncio.ensure_future(agen.__anext__())
            for _ in range(400):
                listing = await client.get_messages(status="read")
                if listing.messages:
                    break
                await asyncio.wait([pending], timeout=0.05)
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            await agen.aclose()
            errors = []
            cases = (("nobody@agents.test", key), (state["agent"], state["revoked"]), ("cloudy@agents.test", key))
            for agent, bad_key in cases:
                other = AsyncE2AClient(api_key=bad_key, base_url=url)
                try:
                    async for _n in other.listen(agent):
                        pass
                except E2AApiError as exc:
                    errors.append(exc.code)
                finally:
                    await other.close()
            return seen, [m.message_id for m in listing.messages] + errors

    first = await in_thread(lambda: asyncio.run(listen_once()))
    assert first == [state["message_id"]]
    seen, rest = await in_thread(lambda: asyncio.run(listen_and_ack()))
    assert seen == [state["message_id"]]  # still unread after the first listener (no ack on break)
    assert rest == [state["message_id"], "agent_not_found", "unauthorized", "agent_not_local"]


def _resign(body: dict, secret: str, when: datetime) -> dict:
    """The same delivery with validly re-signed auth headers at another time (a replay)."""
    headers = dict(body["auth_headers"], **{"X-E2A-Auth-Timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
    headers["X-E2A-Auth-Signature"] = hmac.new(
        secret.encode(), canonical_string(headers).encode(), hashlib.sha256
    ).hexdigest()
    return dict(body, auth_headers=headers)


@pytest_twisted.ensureDeferred
async def test_webhook_parsed_and_verified_tampered_and_stale_refused(e2a_service_factory, dns_zone, http_sink):  # noqa: F811
    """A cloud agent's real webhook passes parse_webhook (both signatures); a changed body byte,
    a changed JSON field and a stale timestamp are refused; rotation accepts old+new."""
    service, boot, url = await _service(e2a_service_factory, dns_zone, webhooks=WebhooksConfig(allow_private=True))
    key, secret = boot.api_key_plaintext, boot.signing_secret

    def thd_register() -> None:
        with E2AClient(api_key=key, base_url=url) as client:
            client.api.register_agent(slug="cloudy", webhook_url=http_sink.url("/hook"), agent_mode="cloud")

    await in_thread(thd_register)
    message = KEY.sign(make_message(from_addr="alice@example.org", to_addr="cloudy@agents.test", subject="Invoice"))
    reply = await send_mail(service.smtp_port.getHost().port, "alice@example.org", ["cloudy@agents.test"], message)
    assert reply.code == 250
    got = await http_sink.arrivals.get().addTimeout(60, reactor)

    def thd_verify() -> dict:
        client = E2AClient(api_key=key, base_url=url)
        email = client.parse_webhook(got.body, secret, headers=got.headers)
        assert email.signature_verified and email.verified and email.sender == "alice@example.org" and email.subject == "Invoice"
        assert email.text_body.strip() == "Hi there." and email.recipient == "cloudy@agents.test"
        assert email.auth.verified is True
        unverified = client.parse(got.body)
        with pytest.raises(UnverifiedEmailError):
            _ = unverified.sender
        body = json.loads(got.body)
        tampered = dict(body, raw_message=base64.b64encode(base64.b64decode(body["raw_message"]) + b"!").decode())
        with pytest.raises(PermissionError, match="body hash"):
            client.parse_webhook(json.dumps(tampered), secret)
        forged = got.body.replace(b'"from":"alice@example.org"', b'"from":"ceo@example.org"')
        assert forged != got.body
        with pytest.raises(PermissionError, match="webhook-signature"):
            client.parse_webhook(forged, secret, headers=got.headers)
        stale = _resign(body, secret, datetime.now(UTC) - timedelta(minutes=10))
        with pytest.raises(PermissionError, match="stale"):
            client.parse_webhook(stale, secret)
        fresh = _resign(body, secret, datetime.now(UTC))
        assert client.parse_webhook(fresh, secret).signature_verified  # the re-signing itself is sound
        with pytest.raises(PermissionError, match="signature"):
            client.parse_webhook(got.body, "0" * 64)
        new = client.api.create_signing_secret(name="next")
        client.api.redeliver("cloudy@agents.test", body["message_id"])
        client.close()
        return new

    new = await in_thread(thd_verify)
    again = await http_sink.arrivals.get().addTimeout(60, reactor)

    def thd_rotation() -> None:
        client = E2AClient(api_key=key, base_url=url)
        assert client.parse_webhook(again.body, [secret, new["secret"]], headers=again.headers).signature_verified
        with pytest.raises(PermissionError):
            client.parse_webhook(again.body, secret)  # the auth headers are signed by the newest only
        client.close()

    await in_thread(thd_rotation)


@pytest_twisted.ensureDeferred
async def test_raw_api_reaches_every_endpoint_group(e2a_service_factory, dns_zone):  # noqa: F811
    """One call per endpoint group through E2AApi; path parameters are percent-encoded."""
    _service_, boot, url = await _service(e2a_service_factory, dns_zone, webhooks=WebhooksConfig(allow_private=True))

    def thd_calls() -> None:
        from e2a.v1 import Attachment, E2AApi, fetch_info

        assert fetch_info(url)["shared_domain"] == "agents.test"
        with E2AApi(api_key=boot.api_key_plaintext, base_url=url) as api:
            assert api.health() == {"status": "ok"} and api.get_info()["slug_registration_enabled"] is True
            assert api.ready()["status"] == "ready"
            a = api.register_agent(slug="a-b", agent_mode="local")["email"]
            b = api.register_agent(slug="hook", agent_mode="cloud", webhook_url="http://127.0.0.1:9/h")["email"]
            assert [x["email"] for x in api.list_agents()["agents"]] == [b, a]
            assert api.get_agent(a.upper())["agent_mode"] == "local"
            assert api.update_agent(a, name="Agent A", hitl_ttl_seconds=60)["name"] == "Agent A"
            sent = api.send_email([b], "files", "see attached", from_email=a, conversation_id="c-1",
                                  attachments=[Attachment("n.txt", "text/plain", b"note")])
            assert sent["status"] == "sent" and sent["method"] == "internal"
            assert api.get_outbound_message(sent["message_id"])["type"] == "send"
            assert api.list_pending_messages() == {"messages": []}
            [inbound] = api.list_messages(b, "all")["messages"]
            assert inbound["conversation_id"] == "c-1"
            assert api.list_deliveries(b)["deliveries"][0]["message_id"] == inbound["message_id"]
            assert api.redeliver(b, inbound["message_id"])["status"] == "queued"
            replied = api.reply_to_message(b, inbound["message_id"], "thanks")
            assert replied["status"] == "sent"
            assert api.register_domain("acme.example")["verified"] is False
            assert [d["domain"] for d in api.list_domains()["domains"]] == ["acme.example"]
            with pytest.raises(E2AApiError) as info:
                api.verify_domain("acme.example")
            assert info.value.code in ("dns_record_not_found", "dns_lookup_failed")
            assert api.delete_domain("acme.example") is None
            secret = api.create_signing_secret("two")
            assert len(api.list_signing_secrets()["secrets"]) == 2
            assert api.delete_signing_secret(secret["id"]) is None
            key = api.create_api_key("agent-key", agent=a)
            assert key["scope"] == "agent" and any(k["id"] == key["id"] for k in api.list_api_keys()["keys"])
            assert api.revoke_api_key(key["id"]) is None
            assert api.export_user_data()["schema_version"] == "1"
            assert api.delete_agent(b) == {"status": "deleted"}
            with pytest.raises(E2AApiError) as info:
                api.delete_user("nope")
            assert info.value.code == "confirmation_required"

    await in_thread(thd_calls)


@pytest_twisted.ensureDeferred
async def test_listen_reconnects_after_close_and_stops_on_revoked_key(e2a_service_factory, dns_zone):  # noqa: F811
    """Revoking the key closes the socket (1008); listen() reconnects, gets 401 and stops with
    E2AApiError(unauthorized) instead of retrying for ever."""
    _service_, boot, url = await _service(e2a_service_factory, dns_zone)

    def thd_setup() -> dict:
        with E2AClient(api_key=boot.api_key_plaintext, base_url=url) as client:
            agent = client.api.register_agent(slug="bot", agent_mode="local")["email"]
            client.api.send_test_email(agent)
            return {"agent": agent, "key": client.api.create_api_key(name="short-lived", agent=agent)}

    state = await in_thread(thd_setup)

    async def scenario() -> tuple[list[str], str, int]:
        events: list[str] = []
        async with AsyncE2AClient(api_key=state["key"]["key"], base_url=url, agent_email=state["agent"]) as client:
            try:
                async for _note in client.listen(on_state=lambda event, _detail: events.append(event)):
                    async with AsyncE2AClient(api_key=boot.api_key_plaintext, base_url=url) as admin:
                        await admin.api.revoke_api_key(state["key"]["id"])
            except E2AApiError as exc:
                return events, exc.code, exc.status_code
        return events, "no error", 0

    events, code, status = await in_thread(lambda: asyncio.run(scenario()))
    assert (code, status) == ("unauthorized", 401)
    assert events[:2] == ["connected", "retrying"] and events.count("connected") == 1
