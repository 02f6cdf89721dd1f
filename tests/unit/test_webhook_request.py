"""The signed webhook request of mail.md §4.1–4.2: body bytes, headers, re-signing (pure)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from e2a.delivery.webhook import WebhookMessage, build_body, build_request
from e2a.mailauth import authheaders

VECTOR = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "standard-webhooks.json").read_text())
RAW = b"From: Alice <alice@example.com>\r\nTo: bot@agents.example.com\r\nSubject: Hello bot\r\nMessage-ID: <m1@example.com>\r\n\r\nHi bot!\r\n"
SECRET = VECTOR["secret"]
OLD_SECRET = SECRET
NEW_SECRET = VECTOR["rotation"]["secrets_newest_first"][0]
RECEIVED = datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC)


def _message(**overrides) -> WebhookMessage:
    body = json.loads(VECTOR["body"])
    values = dict(
        message_id=body["message_id"],
        conversation_id="",
        display_from="alice@example.com",
        to=["bot@agents.example.com"],
        cc=None,
        recipient="bot@agents.example.com",
        raw=RAW,
        auth_headers=body["auth_headers"],
        received_at=RECEIVED,
    )
    values.update(overrides)
    return WebhookMessage(**values)


def _headers(req) -> dict[str, str]:
    return dict(req.headers)


def test_build_body_reproduces_spec_vector_bytes():
    """Field order, compact JSON and values equal vectors/standard-webhooks.json byte for byte."""
    signed = json.loads(VECTOR["body"])["auth_headers"]
    body = build_body(_message(), signed, "dlv_0123456789abcdef0123456789abcdef", 1)
    assert body == VECTOR["body"].encode()


def test_build_request_at_vector_time_reproduces_vector_signatures():
    """At the vector's time with the vector's secret, body and webhook-signature are the vector's."""
    now = datetime.fromtimestamp(int(VECTOR["webhook_timestamp"]), UTC)
    req = build_request(_message(), delivery_id="dlv_0123456789abcdef0123456789abcdef", attempt=1,
                        secrets=[SECRET], now=now)
    h = _headers(req)
    assert req.body == VECTOR["body"].encode()
    assert h["webhook-id"] == VECTOR["webhook_id"]
    assert h["webhook-timestamp"] == VECTOR["webhook_timestamp"]
    assert h["webhook-signature"] == VECTOR["webhook_signature"]
    rotated = build_request(_message(), delivery_id="dlv_0123456789abcdef0123456789abcdef", attempt=1,
                            secrets=VECTOR["rotation"]["secrets_newest_first"], now=now)
    # The body is re-signed by the newest secret, so it differs from the vector's; the
    # signature still holds one entry per secret, newest first, over the bytes sent.
    newest, oldest = VECTOR["rotation"]["secrets_newest_first"]
    entries = _headers(rotated)["webhook-signature"].split(" ")
    expected = [
        authheaders.standard_webhook_signature(VECTOR["webhook_id"], int(VECTOR["webhook_timestamp"]), rotated.body, [s])
        for s in (newest, oldest)
    ]
    assert entries == expected


def test_body_field_order_with_optional_fields():
    """conversation_id after message_id, cc after to; omitted when empty; to null when absent."""
    full = json.loads(build_body(_message(conversation_id="c-1", cc=["x@example.com"]), {}, "dlv_x", 3))
    assert list(full) == ["message_id", "conversation_id", "from", "to", "cc", "recipient", "raw_message",
                          "auth_headers", "received_at", "delivery_id", "attempt"]
    bare = json.loads(build_body(_message(to=None, cc=[]), {}, "dlv_x", 1))
    assert list(bare) == ["message_id", "from", "to", "recipient", "raw_message", "auth_headers",
                          "received_at", "delivery_id", "attempt"]
    assert bare["to"] is None
    assert bare["received_at"] == "2026-04-27T12:00:00.123456Z"
    assert base64.b64decode(bare["raw_message"]) == RAW


def test_headers_verify_with_standardwebhooks_for_each_of_two_secrets():
    """Live clock: each active secret alone verifies; a foreign secret and a tampered body do not."""
    now = datetime.now(UTC)
    req = build_request(_message(), delivery_id="dlv_1", attempt=2, secrets=[NEW_SECRET, OLD_SECRET], now=now)
    h = _headers(req)
    entries = h["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    for secret in (NEW_SECRET, OLD_SECRET):
        parsed = Webhook(authheaders.whsec(secret)).verify(req.body, h)
        assert parsed["attempt"] == 2
    with pytest.raises(WebhookVerificationError):
        Webhook(authheaders.whsec("f" * 64)).verify(req.body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(authheaders.whsec(NEW_SECRET)).verify(req.body.replace(b'"attempt":2', b'"attempt":3'), h)


def test_auth_headers_resigned_per_attempt_and_verify():
    """Each attempt signs with a fresh timestamp (same id and body hash) using the newest secret."""
    t1 = datetime(2026, 4, 28, 9, 0, 0, 900000, tzinfo=UTC)
    t2 = t1 + timedelta(minutes=10)
    r1 = build_request(_message(), delivery_id="dlv_1", attempt=1, secrets=[NEW_SECRET, OLD_SECRET], now=t1)
    r2 = build_request(_message(), delivery_id="dlv_1", attempt=2, secrets=[NEW_SECRET, OLD_SECRET], now=t2)
    h1, h2 = _headers(r1), _headers(r2)
    assert h1["X-E2A-Auth-Timestamp"] == "2026-04-28T09:00:00Z"
    assert h2["X-E2A-Auth-Timestamp"] == "2026-04-28T09:10:00Z"
    assert h1["X-E2A-Auth-Signature"] != h2["X-E2A-Auth-Signature"]
    for h, t in ((h1, t1), (h2, t2)):
        assert h["X-E2A-Auth-Message-Id"] == VECTOR["webhook_id"]
        assert h["X-E2A-Auth-Body-Hash"] == authheaders.body_hash(RAW)
        # webhook-timestamp and X-E2A-Auth-Timestamp name the same second
        assert datetime.fromtimestamp(int(h["webhook-timestamp"]), UTC) == authheaders.parse_rfc3339(
            h["X-E2A-Auth-Timestamp"]
        )
        authheaders.verify(h, RAW, [NEW_SECRET], now=t)
        with pytest.raises(authheaders.VerificationError):
            authheaders.verify(h, RAW, [OLD_SECRET], now=t)  # signed by the newest only
    # The body's auth_headers are exactly the X-E2A-Auth-* headers of the request.
    body_auth = json.loads(r2.body)["auth_headers"]
    assert body_auth == {k: v for k, v in h2.items() if k.startswith("X-E2A-Auth-")}
    assert list(body_auth) == sorted(body_auth, key=lambda s: s.encode())


def test_request_headers_content_type_user_agent_and_delegation():
    """Content-Type and User-Agent set; Delegation header only when non-empty."""
    now = datetime.now(UTC)
    req = build_request(_message(), delivery_id="dlv_1", attempt=1, secrets=[SECRET], now=now)
    h = _headers(req)
    assert h["Content-Type"] == "application/json"
    assert h["User-Agent"].startswith("e2a/")
    assert "X-E2A-Auth-Delegation" not in h
    stored = dict(json.loads(VECTOR["body"])["auth_headers"])
    stored["X-E2A-Auth-Delegation"] = "agent=a@b.test;human=u1"
    req = build_request(_message(auth_headers=stored), delivery_id="dlv_1", attempt=1, secrets=[SECRET], now=now)
    h = _headers(req)
    assert h["X-E2A-Auth-Delegation"] == "agent=a@b.test;human=u1"
    authheaders.verify(h, RAW, [SECRET], now=now)


def test_build_request_without_secret_refuses():
    """An unsigned request is never built."""
    with pytest.raises(ValueError):
        build_request(_message(), delivery_id="dlv_1", attempt=1, secrets=[], now=datetime.now(UTC))
