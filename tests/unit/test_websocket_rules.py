"""Pure rules of the WebSocket endpoint: origin policy, upgrade check, redaction, frame shapes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from e2a.delivery.websocket import (
    Notification,
    allowed_origins,
    encode_frame,
    is_upgrade_request,
    normalise_origin,
    notification_frame,
    origin_allowed,
    parse_client_frame,
    redact_token,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://e2a.example.com", "https://e2a.example.com"),
        ("https://E2A.Example.com/", "https://e2a.example.com"),
        ("https://e2a.example.com:443/api", "https://e2a.example.com"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("", None),
        ("not a url", None),
        ("https://host:99999", None),
    ],
)
def test_normalise_origin_canonical_form(value, expected):
    """Origins compare as lowercase scheme://host[:non-default port]."""
    assert normalise_origin(value) == expected


def test_allowed_origins_default_is_public_url_origin():
    """An empty websocket.allowed_origins means the origin of http.public_url."""
    assert allowed_origins((), "https://e2a.example.com/base") == frozenset({"https://e2a.example.com"})
    assert allowed_origins(("https://app.example",), "https://e2a.example.com") == frozenset({"https://app.example"})
    assert allowed_origins((), "") == frozenset()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://e2a.example.com", True),
        ("https://E2A.example.com:443", True),
        ("http://e2a.example.com", False),
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_origin_allowed_absent_or_listed(origin, allowed):
    """Absent Origin passes (non-browser clients); a present one must be listed."""
    assert origin_allowed(origin, frozenset({"https://e2a.example.com"})) is allowed


GOOD = {
    "upgrade": "websocket",
    "connection": "keep-alive, Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.mark.parametrize(
    ("method", "change", "ok"),
    [
        (b"GET", {}, True),
        (b"GET", {"upgrade": "WebSocket"}, True),
        (b"POST", {}, False),
        (b"GET", {"upgrade": None}, False),
        (b"GET", {"upgrade": "h2c"}, False),
        (b"GET", {"connection": "keep-alive"}, False),
        (b"GET", {"sec-websocket-version": "8"}, False),
        (b"GET", {"sec-websocket-key": None}, False),
        (b"GET", {"sec-websocket-key": "short"}, False),
    ],
)
def test_is_upgrade_request_rfc6455_handshake(method, change, ok):
    """Only a complete RFC 6455 version-13 opening handshake counts as an upgrade."""
    headers = {**GOOD, **change}
    assert is_upgrade_request(method, lambda name: headers.get(name)) is ok


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/ws?token=e2a_abc", b"/ws?token=***"),
        (b"/ws?a=1&token=e2a_abc&b=2", b"/ws?a=1&token=***&b=2"),
        (b"/ws?TOKEN=x&token=y", b"/ws?TOKEN=***&token=***"),
        (b"/ws?mytoken=x", b"/ws?mytoken=x"),
        (b"/ws", b"/ws"),
    ],
)
def test_redact_token_hides_every_token_value(uri, expected):
    """token= query values never reach a log line."""
    assert redact_token(uri) == expected


def _note(conversation_id: str) -> Notification:
    return Notification(
        message_id="msg_1",
        conversation_id=conversation_id,
        sender="Alice <alice@example.com>",
        recipient="bot@agents.example.com",
        subject="Hello bot",
        received_at=datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC),
    )


def test_notification_frame_exact_shape():
    """Spec key order and values; conversation_id omitted when empty; never body or to/cc."""
    assert encode_frame(notification_frame(_note("c_1"))) == (
        b'{"type":"message","message_id":"msg_1","conversation_id":"c_1","from":"Alice <alice@example.com>",'
        b'"recipient":"bot@agents.example.com","subject":"Hello bot","received_at":"2026-04-27T12:00:00.123456Z"}'
    )
    assert "conversation_id" not in notification_frame(_note(""))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"type":"ack","message_id":"msg_1"}', ("ack", "msg_1")),
        (b'{"type":"ack"}', ("bad_frame", "ack needs a message_id string")),
        (b'{"type":"ack","message_id":7}', ("bad_frame", "ack needs a message_id string")),
        (b'{"type":"hello"}', ("bad_frame", "unknown frame type")),
        (b"[1]", ("bad_frame", "frame must be a JSON object")),
        (b"nope", ("bad_frame", "frame is not valid JSON")),
        (b"\xff", ("bad_frame", "frame is not valid JSON")),
    ],
)
def test_parse_client_frame_ack_or_bad_frame(payload, expected):
    """Only {"type":"ack","message_id":<string>} is meaningful; everything else is bad_frame."""
    assert parse_client_frame(payload) == expected
