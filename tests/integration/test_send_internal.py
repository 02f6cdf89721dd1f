"""Outbound API on the whole service: agent → agent internal route, threading, test email,
and the refusals that happen before anything is stored."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest_twisted
import treq

from twisted.logger import formatEvent, globalLogPublisher

from e2a import maillog
from e2a.mailauth import authheaders
from e2a.store import accounts
from tests.support.apiserver import Response


class Client:
    def __init__(self, service, key: str) -> None:
        self.base = f"http://127.0.0.1:{service.http_port.getHost().port}"
        self.key = key

    async def call(self, method: str, path: str, body=None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        resp = await treq.request(
            method, self.base + path, data=data, headers={"Authorization": f"Bearer {self.key}"}, persistent=False
        )
        return Response(resp.code, resp.headers, await treq.content(resp))


async def _two_agents(e2a_service_factory):
    service = await e2a_service_factory()
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    api = Client(service, boot.api_key_plaintext)
    for slug in ("alpha", "beta"):
        r = await api.call("POST", "/api/v1/agents", {"slug": slug, "agent_mode": "local", "name": slug.title()})
        assert r.code == 201, r.body
    return service, boot, api


def _verify_detail(detail: dict, secret: str) -> bytes:
    raw = base64.b64decode(detail["raw_message"])
    headers = detail["auth_headers"]
    signed_at = datetime.strptime(headers["X-E2A-Auth-Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    authheaders.verify(headers, raw, [secret], signed_at)
    return raw


@pytest_twisted.ensureDeferred
async def test_agent_to_agent_is_internal_signed_and_threads_back(e2a_service_factory):
    """A → B with a conversation id arrives internally as entity agent with the delegation
    header and verified=true; B's reply threads back to A with the same conversation id."""
    service, boot, api = await _two_agents(e2a_service_factory)
    sent = await api.call(
        "POST",
        "/api/v1/send",
        {"from": "alpha@agents.test", "to": ["Beta <BETA@agents.test>"], "subject": "Plan",
         "body": "Shall we?", "conversation_id": "conv-42"},
    )
    assert sent.code == 200, sent.body
    out = sent.json()
    assert out["status"] == "sent" and out["method"] == "internal" and out["delivery_status"] == "sent"
    assert out["message_id"].startswith("msg_") and out["smtp_message_id"] == f"<{out['message_id']}@mx.e2a.test>"

    inbox = (await api.call("GET", "/api/v1/agents/beta@agents.test/messages")).json()["messages"]
    assert len(inbox) == 1 and inbox[0]["conversation_id"] == "conv-42" and inbox[0]["from"] == "alpha@agents.test"
    detail = (await api.call("GET", f"/api/v1/agents/beta@agents.test/messages/{inbox[0]['message_id']}")).json()
    h = detail["auth_headers"]
    assert h["X-E2A-Auth-Entity-Type"] == "agent" and h["X-E2A-Auth-Verified"] == "true"
    assert h["X-E2A-Auth-Delegation"] == f"agent=alpha@agents.test;human={boot.user.id}"
    assert h["X-E2A-Auth-Domain-Check"] == "spf=none; dkim=none; dmarc=none"
    raw = _verify_detail(detail, boot.signing_secret)
    assert raw.startswith(b"Authentication-Results: mx.e2a.test; auth=pass smtp.auth=alpha@agents.test\r\n")
    assert b"X-E2A-Conversation-Id" not in raw  # stripped like any incoming X-E2A-* field

    reply = await api.call(
        "POST", f"/api/v1/agents/beta@agents.test/messages/{inbox[0]['message_id']}/reply", {"body": "Yes."}
    )
    assert reply.code == 200, reply.body
    back = (await api.call("GET", "/api/v1/agents/alpha@agents.test/messages")).json()["messages"]
    assert len(back) == 1 and back[0]["subject"] == "Re: Plan" and back[0]["conversation_id"] == "conv-42"

    record = (await api.call("GET", f"/api/v1/messages/{reply.json()['message_id']}")).json()
    assert record["type"] == "reply" and record["method"] == "internal" and record["delivery_status"] == "sent"
    assert record["recipients"][0]["address"] == "alpha@agents.test"
    assert record["recipients"][0]["route"] == "internal" and record["recipients"][0]["status"] == "sent"


@pytest_twisted.ensureDeferred
async def test_internal_recipient_outcome_is_logged_after_the_release(e2a_service_factory):
    """An agent → agent send, and the approval of a held one, log one outbound.recipient line (sent)."""
    service, boot, api = await _two_agents(e2a_service_factory)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        sent = await api.call(
            "POST", "/api/v1/send",
            {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "Plan", "body": "Secret body."},
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert sent.code == 200, sent.body
    lines = [e for e in events if e.get("event") == maillog.EVENT_OUTBOUND]
    assert [(e["message_id"], e["recipient"], e["status"]) for e in lines] == [
        (sent.json()["message_id"], "beta@agents.test", "sent")
    ]
    assert "Secret body." not in formatEvent(lines[0])

    # A held send logs nothing until it is approved; the approval logs the line.
    r = await api.call("PUT", "/api/v1/agents/alpha@agents.test", {"hitl_enabled": True, "hitl_notify": False})
    assert r.code == 200, r.body
    events.clear()
    globalLogPublisher.addObserver(events.append)
    try:
        held = await api.call(
            "POST", "/api/v1/send", {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "P", "body": "b"}
        )
        assert held.code == 202, held.body
        assert not [e for e in events if e.get("event") == maillog.EVENT_OUTBOUND]
        approved = await api.call("POST", f"/api/v1/messages/{held.json()['message_id']}/approve")
        assert approved.code == 200, approved.body
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("event") == maillog.EVENT_OUTBOUND]
    assert [(e["message_id"], e["recipient"], e["status"]) for e in lines] == [
        (held.json()["message_id"], "beta@agents.test", "sent")
    ]


@pytest_twisted.ensureDeferred
async def test_test_email_reaches_the_agent_itself(e2a_service_factory):
    """POST …/test records an outbound `test` message delivered internally to the agent."""
    service, boot, api = await _two_agents(e2a_service_factory)
    r = await api.call("POST", "/api/v1/agents/alpha@agents.test/test")
    assert r.code == 200, r.body
    body = r.json()
    assert body["method"] == "internal" and body["delivery_status"] == "sent"
    [msg] = (await api.call("GET", "/api/v1/agents/alpha@agents.test/messages")).json()["messages"]
    assert msg["subject"] == "Test email from e2a" and msg["from"] == "noreply@mx.e2a.test"
    detail = (await api.call("GET", f"/api/v1/agents/alpha@agents.test/messages/{msg['message_id']}")).json()
    assert "X-E2A-Auth-Delegation" not in detail["auth_headers"]
    assert detail["auth_headers"]["X-E2A-Auth-Sender"] == "noreply@mx.e2a.test"
    _verify_detail(detail, boot.signing_secret)


@pytest_twisted.ensureDeferred
async def test_send_refusals_store_nothing(e2a_service_factory):
    """Missing fields, injection, ambiguity and no outbound route are refused before storage."""
    service, boot, api = await _two_agents(e2a_service_factory)
    cases = [
        ({"from": "alpha@agents.test", "to": ["x@example.com"], "body": "b"}, 400, "missing_field"),
        ({"from": "alpha@agents.test", "subject": "s", "body": "b"}, 400, "no_recipients"),
        ({"to": ["beta@agents.test"], "subject": "s", "body": "b"}, 400, "ambiguous_sender"),
        ({"from": "nobody@agents.test", "to": ["beta@agents.test"], "subject": "s", "body": "b"}, 400, "invalid_from"),
        ({"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "s\r\nBcc: x@evil.example", "body": "b"},
         400, "invalid_header_value"),
        ({"from": "alpha@agents.test", "to": ["human@example.com"], "subject": "s", "body": "b"},
         503, "outbound_not_configured"),
    ]
    for body, status, code in cases:
        r = await api.call("POST", "/api/v1/send", body)
        assert (r.code, r.json()["error"]["code"]) == (status, code), body
    rows = await service.db.fetchall("SELECT id FROM messages")
    assert rows == []


@pytest_twisted.ensureDeferred
async def test_agent_key_sends_only_as_its_agent(e2a_service_factory):
    """An agent-scoped key may omit from (its agent) but never send as another agent."""
    service, boot, api = await _two_agents(e2a_service_factory)
    created = await api.call("POST", "/api/v1/keys", {"name": "alpha", "agent": "alpha@agents.test"})
    agent_api = Client(service, created.json()["key"])
    ok = await agent_api.call("POST", "/api/v1/send", {"to": ["beta@agents.test"], "subject": "s", "body": "b"})
    assert ok.code == 200, ok.body
    record = (await api.call("GET", f"/api/v1/messages/{ok.json()['message_id']}")).json()
    assert record["agent_id"] == "alpha@agents.test"
    other = await agent_api.call(
        "POST", "/api/v1/send", {"from": "beta@agents.test", "to": ["alpha@agents.test"], "subject": "s", "body": "b"}
    )
    assert (other.code, other.json()["error"]["code"]) == (400, "invalid_from")
    # and it cannot see beta's outbound record either
    beta_sent = await api.call(
        "POST", "/api/v1/send", {"from": "beta@agents.test", "to": ["alpha@agents.test"], "subject": "s", "body": "b"}
    )
    hidden = await agent_api.call("GET", f"/api/v1/messages/{beta_sent.json()['message_id']}")
    assert (hidden.code, hidden.json()["error"]["code"]) == (404, "message_not_found")


@pytest_twisted.ensureDeferred
async def test_send_limit_answers_429_with_retry_after(e2a_service_factory):
    """rate_limits.send_per_minute counts per agent in PostgreSQL; the next send is 429."""
    from e2a.config import RateLimitConfig

    service = await e2a_service_factory(rate_limits=RateLimitConfig(send_per_minute=2))
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    api = Client(service, boot.api_key_plaintext)
    for slug in ("alpha", "beta"):
        assert (await api.call("POST", "/api/v1/agents", {"slug": slug, "agent_mode": "local"})).code == 201
    body = {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "s", "body": "b"}
    assert [(await api.call("POST", "/api/v1/send", body)).code for _ in range(2)] == [200, 200]
    limited = await api.call("POST", "/api/v1/send", body)
    assert (limited.code, limited.json()["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(limited.header("Retry-After")) <= 60


@pytest_twisted.ensureDeferred
async def test_attachments_are_validated_and_delivered(e2a_service_factory):
    """Valid base64 attachments arrive as MIME parts; invalid base64 is 400 invalid_attachment."""
    import email
    from email import policy

    service, boot, api = await _two_agents(e2a_service_factory)
    good = {"filename": "notes.txt", "content_type": "text/plain", "data": base64.b64encode(b"hello").decode()}
    r = await api.call(
        "POST", "/api/v1/send",
        {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "files", "body": "see attached",
         "html_body": "<p>see attached</p>", "attachments": [good]},
    )
    assert r.code == 200, r.body
    [msg] = (await api.call("GET", "/api/v1/agents/beta@agents.test/messages")).json()["messages"]
    detail = (await api.call("GET", f"/api/v1/agents/beta@agents.test/messages/{msg['message_id']}")).json()
    parsed = email.message_from_bytes(base64.b64decode(detail["raw_message"]), policy=policy.default)
    assert parsed.get_content_type() == "multipart/mixed"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "notes.txt" and attachment.get_content() == "hello"
    bad = await api.call(
        "POST", "/api/v1/send",
        {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "s", "body": "b",
         "attachments": [{**good, "data": "not base64!"}]},
    )
    assert (bad.code, bad.json()["error"]["code"]) == (400, "invalid_attachment")


@pytest_twisted.ensureDeferred
async def test_hitl_agent_holds_mail_with_202(e2a_service_factory):
    """With hitl_enabled the validated send is held (202 pending_approval) and listed."""
    service, boot, api = await _two_agents(e2a_service_factory)
    assert (await api.call("PUT", "/api/v1/agents/alpha@agents.test", {"hitl_enabled": True})).code == 200
    r = await api.call(
        "POST", "/api/v1/send", {"from": "alpha@agents.test", "to": ["beta@agents.test"], "subject": "s", "body": "b"}
    )
    assert r.code == 202, r.body
    held = r.json()
    assert held["status"] == "pending_approval" and held["approval_expires_at"].endswith("Z")
    listing = (await api.call("GET", "/api/v1/messages?status=pending_approval")).json()["messages"]
    assert [m["id"] for m in listing] == [held["message_id"]]
    detail = (await api.call("GET", f"/api/v1/messages/{held['message_id']}")).json()
    assert detail["body_text"] == "b" and "delivery_status" not in detail
    # nothing reached beta
    assert (await api.call("GET", "/api/v1/agents/beta@agents.test/messages")).json()["messages"] == []
    bad_filter = await api.call("GET", "/api/v1/messages?status=sent")
    assert (bad_filter.code, bad_filter.json()["error"]["code"]) == (400, "invalid_field")


@pytest_twisted.ensureDeferred
async def test_send_body_over_25_mib_is_refused(e2a_service_factory):
    """The send cap is 25 MiB; beyond it the body is not buffered and the answer is 400."""
    service, boot, api = await _two_agents(e2a_service_factory)
    resp = await treq.request(
        "POST", api.base + "/api/v1/send", data=b"x" * (25 * 1024 * 1024 + 10),
        headers={"Authorization": f"Bearer {api.key}"}, persistent=False,
    )
    body = json.loads(await treq.content(resp))
    assert (resp.code, body["error"]["code"]) == (400, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_test_email_for_agent_with_capital_local_part(e2a_service_factory):
    """The local part keeps its registered case; routing still finds the agent itself."""
    service, boot, api = await _two_agents(e2a_service_factory)
    await service.db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES ('Bot@agents.test', %s,"
        " 'agents.test', 'local', 'none')",
        (boot.user.id,),
    )
    r = await api.call("POST", "/api/v1/agents/bot@agents.test/test")
    assert r.code == 200, r.body
    assert len((await api.call("GET", "/api/v1/agents/Bot@agents.test/messages")).json()["messages"]) == 1
