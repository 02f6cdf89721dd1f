"""WebSocket delivery for local-mode agents (mail.md §5): drain unread mail, then push live.

Shape of the module:

* pure rules (origin policy, upgrade-request check, ``token=`` redaction, frame shapes, client
  frame parsing) — table-tested in tests/unit/test_websocket_rules.py;
* :class:`AgentSocketProtocol` — one Autobahn connection: drain, live queue, acks, keepalive on
  the injected clock, slow-consumer guard, close codes;
* :class:`ConnectionRegistry` — per-agent open connections plus reserved handshake slots (for
  ``websocket.max_connections_per_agent``);
* :class:`WebSocketService` — owns the factory (Autobahn inside a ``Site`` never starts its
  factory, so :meth:`WebSocketService.start`/``stop`` do), subscribes to ``CHANNEL_INBOUND`` and
  ``CHANNEL_REVOKE`` so pushes and revocations reach sockets held by *any* e2a process.

The handshake checks (api.md §13) need database lookups and must answer plain JSON errors before
any upgrade, so they run in a Klein route (:mod:`e2a.api.ws`); only when all pass does the route
return :meth:`WebSocketService.upgrade_resource`, a ``WebSocketResource`` carrying the
authenticated :class:`SocketGrant` to the protocol it builds.

The package follows those sections, and every name stays importable from
``e2a.delivery.websocket``: :mod:`~e2a.delivery.websocket.rules`,
:mod:`~e2a.delivery.websocket.storage`, :mod:`~e2a.delivery.websocket.protocol`,
:mod:`~e2a.delivery.websocket.registry` and :mod:`~e2a.delivery.websocket.service`.
"""

from __future__ import annotations

from e2a.delivery.websocket.protocol import (
    AgentSocketProtocol,
    RecentIds,
    SocketGrant,
)
from e2a.delivery.websocket.registry import (
    AgentSocketFactory,
    ConnectionRegistry,
    UpgradeResource,
)
from e2a.delivery.websocket.rules import (
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    MAX_INCOMING_OCTETS,
    OPEN_HANDSHAKE_TIMEOUT,
    REASON_AGENT_DELETED,
    REASON_BINARY,
    REASON_INTERNAL,
    REASON_KEY_REVOKED,
    REASON_MODE_CHANGED,
    REASON_PING_TIMEOUT,
    REASON_SHUTDOWN,
    REASON_SLOW_CONSUMER,
    REASON_TOO_BIG,
    SENT_IDS_KEPT,
    SLOW_CONSUMER_OCTETS,
    SUBPROTOCOL_V2,
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
from e2a.delivery.websocket.service import (
    WebSocketService,
)
from e2a.delivery.websocket.storage import (
    fetch_notification,
    unread_page,
)

__all__ = [
    "AgentSocketFactory",
    "AgentSocketProtocol",
    "CLOSE_GOING_AWAY",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_INTERNAL",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED",
    "ConnectionRegistry",
    "MAX_INCOMING_OCTETS",
    "Notification",
    "OPEN_HANDSHAKE_TIMEOUT",
    "REASON_AGENT_DELETED",
    "REASON_BINARY",
    "REASON_INTERNAL",
    "REASON_KEY_REVOKED",
    "REASON_MODE_CHANGED",
    "REASON_PING_TIMEOUT",
    "REASON_SHUTDOWN",
    "REASON_SLOW_CONSUMER",
    "REASON_TOO_BIG",
    "RecentIds",
    "SENT_IDS_KEPT",
    "SLOW_CONSUMER_OCTETS",
    "SUBPROTOCOL_V2",
    "SocketGrant",
    "UpgradeResource",
    "WebSocketService",
    "allowed_origins",
    "encode_frame",
    "fetch_notification",
    "is_upgrade_request",
    "normalise_origin",
    "notification_frame",
    "origin_allowed",
    "parse_client_frame",
    "redact_token",
    "unread_page",
]
