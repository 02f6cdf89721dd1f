"""WebSocket delivery, pure rules (mail.md §5, api.md §13): origin policy, upgrade-request check,
``token=`` redaction, frame shapes, client frame parsing; the close codes and reasons. Table-tested
in tests/unit/test_websocket_rules.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from e2a.store.models import InboundSummary
from e2a.timefmt import ts_frac

SUBPROTOCOL_V2 = "e2a.v2"
MAX_INCOMING_OCTETS = 4096
SLOW_CONSUMER_OCTETS = 1024 * 1024
OPEN_HANDSHAKE_TIMEOUT = 5
# How long a peer gets to answer our close frame before Autobahn drops the TCP connection.
CLOSE_HANDSHAKE_TIMEOUT = 2

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

REASON_SHUTDOWN = "server shutting down"
REASON_PING_TIMEOUT = "ping timeout"
REASON_BINARY = "binary frames not supported"
REASON_KEY_REVOKED = "key revoked"
REASON_AGENT_DELETED = "agent deleted"
REASON_MODE_CHANGED = "agent mode changed"
REASON_SLOW_CONSUMER = "slow consumer"
REASON_TOO_BIG = "message too big"
REASON_INTERNAL = "internal error"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

#: How many sent message ids one connection remembers to skip duplicates (mail.md §5 step 3).
#: Above the largest live queue a drain can build before the slow-consumer close (1 MiB of
#: frames, ~6,700 at the 157-octet minimum), so the drain/live overlap stays covered.
SENT_IDS_KEPT = 8192


def normalise_origin(value: str) -> str | None:
    """``scheme://host[:port]`` lowercased, default port dropped; ``None`` if not an origin.

    Browsers send exactly this form, but configuration may carry a trailing slash or a path
    (``http.public_url``), and hosts compare case-insensitively.
    """
    value = value.strip()
    if not value or value == "null":
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed_origins(configured: tuple[str, ...] | list[str], public_url: str) -> frozenset[str]:
    """config.md ``websocket.allowed_origins``; empty means the origin of ``http.public_url``.

    With neither set (development without a public URL) no browser origin is allowed;
    non-browser clients send no ``Origin`` and are unaffected.
    """
    sources = list(configured) if configured else ([public_url] if public_url else [])
    return frozenset(o for o in (normalise_origin(s) for s in sources) if o is not None)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """api.md §13: an absent ``Origin`` is allowed; a present one must be in the allowed set."""
    if origin is None:
        return True
    normalised = normalise_origin(origin)
    return normalised is not None and normalised in allowed


def _header_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def is_upgrade_request(method: bytes, header: Callable[[str], str | None]) -> bool:
    """A valid RFC 6455 opening handshake request (what Autobahn would accept), so that
    everything else gets 426 ``upgrade_required`` in the JSON shape instead of Autobahn's HTML."""
    if method != b"GET":
        return False
    if "websocket" not in _header_tokens(header("upgrade")):
        return False
    if "upgrade" not in _header_tokens(header("connection")):
        return False
    if (header("sec-websocket-version") or "").strip() != "13":
        return False
    key = (header("sec-websocket-key") or "").strip()
    return len(key) == 24 and key.endswith("==")


_TOKEN_RE = re.compile(rb"([?&]token=)[^&#]*", re.IGNORECASE)


def redact_token(uri: bytes) -> bytes:
    """The request URI with every ``token=`` value replaced by ``***`` (api.md §0.1)."""
    return _TOKEN_RE.sub(rb"\1***", uri)


# What a notification frame says about one stored inbound message (never its body).
Notification = InboundSummary


def notification_frame(note: Notification) -> dict[str, Any]:
    """mail.md §5 notification frame; key order as in the spec, ``conversation_id`` omitted when empty."""
    frame: dict[str, Any] = {"type": "message", "message_id": note.message_id}
    if note.conversation_id:
        frame["conversation_id"] = note.conversation_id
    frame["from"] = note.sender
    frame["recipient"] = note.recipient
    frame["subject"] = note.subject
    frame["received_at"] = ts_frac(note.received_at)
    return frame


def encode_frame(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_client_frame(payload: bytes) -> tuple[str, str]:
    """A client text frame → ``("ack", message_id)`` or ``("bad_frame", detail)``."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "bad_frame", "frame is not valid JSON"
    if not isinstance(value, dict):
        return "bad_frame", "frame must be a JSON object"
    if value.get("type") != "ack":
        return "bad_frame", "unknown frame type"
    message_id = value.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        return "bad_frame", "ack needs a message_id string"
    return "ack", message_id
