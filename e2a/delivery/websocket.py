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
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

from e2a.api.auth import Principal
from e2a.config import WebSocketConfig
from e2a.store import messages as message_store
from e2a.store.database import Database, Txn
from e2a.store.events import CHANNEL_INBOUND, CHANNEL_REVOKE
from e2a.timefmt import ts_frac

log = Logger()

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


# ------------------------------------------------------------------------------ pure rules


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


@dataclass(frozen=True)
class Notification:
    """What a notification frame says about one stored inbound message (never its body)."""

    message_id: str
    conversation_id: str
    sender: str  # display sender
    recipient: str
    subject: str
    received_at: datetime


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


# ------------------------------------------------------------------------------ storage reads

_NOTE_COLUMNS = "id, conversation_id, display_from, recipient, subject, created_at"


def _note(row: dict[str, Any]) -> Notification:
    return Notification(
        message_id=row["id"],
        conversation_id=row["conversation_id"] or "",
        sender=row["display_from"],
        recipient=row["recipient"],
        subject=row["subject"],
        received_at=row["created_at"],
    )


async def unread_page(
    db: Database, agent_id: str, after: tuple[datetime, str] | None, page_size: int
) -> list[Notification]:
    """One drain page: the agent's unread inbound mail, oldest first (``created_at``, ``id``)."""
    clauses = "agent_id = %s AND direction = 'inbound' AND status = 'unread'"
    params: list[Any] = [agent_id]
    if after is not None:
        clauses += " AND (created_at, id) > (%s, %s)"
        params.extend(after)
    params.append(page_size)
    rows = await db.fetchall(
        f"SELECT {_NOTE_COLUMNS} FROM messages WHERE {clauses} ORDER BY created_at, id LIMIT %s", params
    )
    return [_note(r) for r in rows]


async def fetch_notification(db: Database, agent_id: str, message_id: str) -> Notification | None:
    row = await db.fetchone(
        # agent ids keep the local part's case; live events are keyed by the lowercased address
        f"SELECT {_NOTE_COLUMNS} FROM messages WHERE id = %s AND lower(agent_id) = lower(%s) AND direction = 'inbound'",
        (message_id, agent_id),
    )
    return None if row is None else _note(row)


async def _grant_state_txn(txn: Txn, key_id: str, agent_id: str) -> str | None:
    """Why a connection may no longer stay open (a close reason), or ``None`` if it may."""
    row = await txn.fetchone(
        "SELECT (SELECT revoked_at IS NULL AND (scope = 'user' OR agent_id IS NOT NULL)"
        "        FROM api_keys WHERE id = %s) AS key_ok,"
        " (SELECT agent_mode FROM agents WHERE id = %s) AS mode",
        (key_id, agent_id),
    )
    assert row is not None
    if row["key_ok"] is None:
        return REASON_KEY_REVOKED  # key row gone: its user was deleted
    if row["mode"] is None:
        return REASON_AGENT_DELETED
    if not row["key_ok"]:
        return REASON_KEY_REVOKED
    if row["mode"] != "local":
        return REASON_MODE_CHANGED
    return None


# ------------------------------------------------------------------------------ connections


@dataclass(frozen=True)
class SocketGrant:
    """What the handshake route proved: who connects, to which agent (the row's exact id)."""

    principal: Principal
    agent_id: str
    service: WebSocketService


@implementer(IPushProducer)
class RecentIds:
    """An insertion-ordered set of the newest ``limit`` ids; adding one more forgets the oldest.

    A deque gives the order and a set the O(1) membership test; popping from the deque's left
    is O(1), where evicting the oldest key of a dict scans the deleted slots left at its front.
    """

    __slots__ = ("_ids", "_limit", "_order")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item: str) -> None:
        if item in self._ids:
            return
        self._ids.add(item)
        self._order.append(item)
        if len(self._order) > self._limit:
            self._ids.discard(self._order.popleft())


class AgentSocketProtocol(WebSocketServerProtocol):
    """One client connection of one agent.

    Registered as the transport's streaming producer so the transport tells us when its write
    buffer is full (``pauseProducing``); frames produced meanwhile wait in our own queue, and
    more than 1 MiB waiting means a slow consumer (close 1008; the mail stays unread).
    """

    grant: SocketGrant | None = None

    def __init__(self) -> None:
        super().__init__()
        self.v2 = False
        self.draining = True
        self.opened = False
        self._redrain = False
        self._pending: list[Notification] = []
        self._pending_octets = 0
        self._ping_payloads: list[bytes] = []
        # Message ids this connection already sent, so none is sent twice (mail.md §5 step 3).
        # A duplicate can only come from the drain meeting the live stream: a message committed
        # around the subscription is both read by the drain and offered by its NOTIFY (possibly
        # after the drain ended: NOTIFY delivery and the live lookup lag the commit), and a
        # re-drain after a LISTEN reconnect re-reads mail sent earlier and still unread. Those
        # windows concern recent sends, so only the newest SENT_IDS_KEPT ids are kept: memory
        # stays bounded however long the connection lives (a set of every id grew without end).
        # The cost is confined to a re-drain meeting unread mail sent more than SENT_IDS_KEPT
        # notifications earlier: it is sent again, as a reconnect would send it.
        self._sent = RecentIds(SENT_IDS_KEPT)
        self._paused = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._writable_waiters: list[Deferred[None]] = []
        self._ping_call: Any = None
        self._pong_deadline: Any = None
        self._client_frames: Deferred[None] = defer.succeed(None)
        self.closed: Deferred[None] = Deferred()

    # ---- properties -------------------------------------------------------------------

    @property
    def is_live(self) -> bool:
        return self.state == WebSocketProtocol.STATE_OPEN

    @property
    def agent_key(self) -> str:
        assert self.grant is not None
        return self.grant.agent_id.lower()

    # ---- Autobahn callbacks -----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:  # noqa: N802 - Autobahn API
        if self.grant is None:
            # Built outside UpgradeResource (someone mounted the factory directly): refuse.
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN)
        return SUBPROTOCOL_V2 if SUBPROTOCOL_V2 in request.protocols else None

    def onOpen(self) -> None:  # noqa: N802 - Autobahn API
        assert self.grant is not None
        service = self.grant.service
        self.opened = True
        self.v2 = self.websocket_protocol_in_use == SUBPROTOCOL_V2
        # Subscribe first (mail.md §5 step 1): from here on live events for the agent reach us.
        service.registry.attach(self)
        if not service.running:
            self.close_with(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
            return
        transport = self.transport
        try:
            # twisted.web's HTTPChannel registered itself as the producer of this transport.
            transport.unregisterProducer()
        except Exception:
            pass
        try:
            transport.registerProducer(self, True)
        except Exception:
            log.warn("cannot register as producer; slow-consumer detection disabled")
        self._schedule_ping()
        log.info(
            "websocket opened for {agent} (key {key_id}, v2={v2})",
            agent=self.grant.agent_id,
            key_id=self.grant.principal.key_id,
            v2=self.v2,
        )
        self.run_guarded(self._open_txn_checks_then_drain())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803 - Autobahn API
        if isBinary:
            self.close_with(CLOSE_UNSUPPORTED, REASON_BINARY)
            return
        kind, value = parse_client_frame(payload)

        async def handle() -> None:
            if kind == "ack":
                await self._ack(value)
            else:
                self._send_error("bad_frame", value)

        def next_frame(_: Any) -> Deferred[None]:
            assert self.grant is not None
            return self.grant.service.track(Deferred.fromCoroutine(handle()))

        # Client frames are handled strictly in order, one at a time.
        self._client_frames.addCallback(next_frame)
        self._client_frames.addErrback(lambda f: log.failure("client frame failed", f))

    def onPong(self, payload: bytes) -> None:  # noqa: N802 - Autobahn API
        if payload not in self._ping_payloads:
            return
        self._ping_payloads.clear()
        if self._pong_deadline is not None and self._pong_deadline.active():
            self._pong_deadline.cancel()
        self._pong_deadline = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802,N803
        self._stop_timers()
        self._queue.clear()
        self._queued = 0
        self._release_writers()
        if self.grant is not None:
            self.grant.service.registry.detach(self)
            if self.opened:
                log.info("websocket closed for {agent} ({code})", agent=self.grant.agent_id, code=code)
        if not self.closed.called:
            self.closed.callback(None)

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # Autobahn's hook; its own reason text names sizes, the spec's is fixed.
        self._fail_connection(CLOSE_TOO_BIG, REASON_TOO_BIG)

    # ---- IPushProducer ----------------------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted API
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted API
        self._paused = False
        while self._queue and not self._paused and self.is_live:
            data = self._queue.popleft()
            self._queued -= len(data)
            self.sendMessage(data, isBinary=False)
        if not self._queue:
            self._release_writers()

    def stopProducing(self) -> None:  # noqa: N802 - Twisted API
        self._paused = True

    # ---- closing ----------------------------------------------------------------------

    def close_with(self, code: int, reason: str) -> None:
        """Close with one of mail.md §5's codes (Autobahn's ``sendClose`` refuses 1001–1011)."""
        self._stop_timers()
        self._queue.clear()
        self._queued = 0
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)
        elif self.state in (WebSocketProtocol.STATE_CONNECTING, WebSocketProtocol.STATE_PROXY_CONNECTING):
            self.dropConnection(abort=True)

    def _stop_timers(self) -> None:
        for call in (self._ping_call, self._pong_deadline):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._pong_deadline = None

    # ---- sending ----------------------------------------------------------------------

    def _send_json(self, frame: dict[str, Any]) -> None:
        if not self.is_live:
            return
        data = encode_frame(frame)
        if self._paused or self._queue:
            self._queue.append(data)
            self._queued += len(data)
            if self._queued > SLOW_CONSUMER_OCTETS:
                assert self.grant is not None
                log.warn("slow consumer on {agent}: closing", agent=self.grant.agent_id)
                self.close_with(CLOSE_POLICY, REASON_SLOW_CONSUMER)
            return
        self.sendMessage(data, isBinary=False)

    def _send_error(self, code: str, detail: str) -> None:
        if self.v2:
            self._send_json({"type": "error", "code": code, "detail": detail})

    def _send_note(self, note: Notification) -> bool:
        """Send one notification unless this connection already sent that message id."""
        if note.message_id in self._sent or not self.is_live:
            return False
        self._sent.add(note.message_id)
        self._send_json(notification_frame(note))
        return True

    def offer(self, note: Notification) -> None:
        """A live event for this agent: queued while draining (step 3), else sent now."""
        if self.draining:
            # Live events queued during the drain count against the slow-consumer limit too:
            # a client that never reads must not grow this list without bound.
            self._pending.append(note)
            self._pending_octets += len(encode_frame(notification_frame(note)))
            if self._pending_octets > SLOW_CONSUMER_OCTETS:
                assert self.grant is not None
                log.warn("slow consumer on {agent} while draining: closing", agent=self.grant.agent_id)
                self._pending.clear()
                self._pending_octets = 0
                self.close_with(CLOSE_POLICY, REASON_SLOW_CONSUMER)
        else:
            self._send_note(note)

    async def _writable(self) -> None:
        """Wait until the transport has room; the drain reads the next page only then, so a
        large backlog never counts against the slow-consumer limit by itself."""
        if not (self._paused or self._queue) or not self.is_live:
            return
        d: Deferred[None] = Deferred()
        self._writable_waiters.append(d)
        await d

    def _release_writers(self) -> None:
        waiters, self._writable_waiters = self._writable_waiters, []
        for d in waiters:
            d.callback(None)

    # ---- drain ------------------------------------------------------------------------

    def run_guarded(self, coro: Any) -> Deferred[None]:
        """Run connection work; an unexpected failure closes 1011 (the mail stays unread)."""

        def failed(failure: Any) -> None:
            log.failure("websocket connection failed", failure)
            self.close_with(CLOSE_INTERNAL, REASON_INTERNAL)

        d = Deferred.fromCoroutine(coro).addErrback(failed)
        assert self.grant is not None
        return self.grant.service.track(d)

    async def _open_txn_checks_then_drain(self) -> None:
        # Subscribed already; now make sure nothing was revoked between the handshake's
        # lookups and the subscription (a NOTIFY in that gap would have found no socket).
        if not await self.revalidate():
            return
        await self._drain(announce=True)

    async def revalidate(self) -> bool:
        """Close (1008) if the key, user or agent no longer allows this connection."""
        assert self.grant is not None
        reason = await self.grant.service.db.run(
            "websocket_grant_state", _grant_state_txn, self.grant.principal.key_id, self.grant.agent_id
        )
        if reason is not None:
            self.close_with(CLOSE_POLICY, reason)
            return False
        return True

    def request_redrain(self) -> None:
        """Re-read unread mail (after the LISTEN connection was lost, pushes may be missing)."""
        if not self.is_live:
            return
        if self.draining:
            self._redrain = True
            return
        self.draining = True
        self.run_guarded(self._drain(announce=False))

    async def _drain(self, announce: bool) -> None:
        assert self.grant is not None
        service = self.grant.service
        page_size = service.config.drain_page_size
        while True:
            after: tuple[datetime, str] | None = None
            count = 0
            while True:
                page = await service.unread_page(self.grant.agent_id, after, page_size)
                if not self.is_live:
                    return
                for note in page:
                    if self._send_note(note):
                        count += 1
                if len(page) < page_size:
                    break
                after = (page[-1].received_at, page[-1].message_id)
                await self._writable()
                if not self.is_live:
                    return
            if not self._redrain:
                break
            self._redrain = False
        self.draining = False
        if announce:
            log.debug("drained {count} for {agent}", count=count, agent=self.grant.agent_id)
            if self.v2:
                self._send_json({"type": "drained", "count": count})
        pending, self._pending = self._pending, []
        self._pending_octets = 0
        for note in pending:
            self._send_note(note)

    # ---- acks -------------------------------------------------------------------------

    async def _ack(self, message_id: str) -> None:
        assert self.grant is not None
        marked = await message_store.mark_read(self.grant.service.db, self.grant.agent_id, message_id)
        if not marked:
            self._send_error("unknown_message", "no unread message with that id")

    # ---- keepalive --------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        assert self.grant is not None
        service = self.grant.service
        if service.config.ping_interval > 0:
            self._ping_call = service.clock.callLater(service.config.ping_interval, self._ping)

    def _ping(self) -> None:
        assert self.grant is not None
        self._ping_call = None
        if not self.is_live:
            return
        # Only a pong echoing one of our outstanding pings counts (unsolicited pongs from a
        # client that never reads must not keep it alive).
        payload = os.urandom(8)
        self._ping_payloads.append(payload)
        del self._ping_payloads[:-4]
        self.sendPing(payload)
        if self._pong_deadline is None:
            self._pong_deadline = self.grant.service.clock.callLater(
                self.grant.service.config.ping_timeout, self._ping_timed_out
            )
        self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._pong_deadline = None
        self.close_with(CLOSE_GOING_AWAY, REASON_PING_TIMEOUT)


class AgentSocketFactory(WebSocketServerFactory):
    protocol = AgentSocketProtocol

    def __init__(self, reactor: Any) -> None:
        super().__init__(server="e2a", reactor=reactor)
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_INCOMING_OCTETS,
            maxFramePayloadSize=MAX_INCOMING_OCTETS,
            failByDrop=False,  # send the close frame (1009 etc.) rather than just dropping TCP
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            perMessageCompressionAccept=lambda offers: None,  # compression: none
            autoPingInterval=0,  # our own keepalive, on the injected clock, with the spec's close
            webStatus=False,
        )
        self.noisy = False


class _GrantingFactory:
    """Hands the one protocol built for an upgraded request its :class:`SocketGrant`."""

    def __init__(self, factory: AgentSocketFactory, grant: SocketGrant) -> None:
        self._factory = factory
        self._grant = grant
        self.built: AgentSocketProtocol | None = None

    def buildProtocol(self, addr: Any) -> AgentSocketProtocol | None:  # noqa: N802 - Twisted API
        proto = self._factory.buildProtocol(addr)
        if proto is not None:
            proto.grant = self._grant
            self._grant.service.registry.claim(proto)
            self.built = proto
        return proto


class UpgradeResource(WebSocketResource):
    """``WebSocketResource`` for one already-authorised request; releases the reserved slot
    if the upgrade never gets as far as building a protocol."""

    def __init__(self, factory: _GrantingFactory, grant: SocketGrant) -> None:
        super().__init__(factory)
        self._granting = factory
        self._grant = grant

    def render(self, request: Any) -> Any:
        try:
            return super().render(request)
        finally:
            if self._granting.built is None:
                self._grant.service.registry.unreserve(self._grant.agent_id)


class ConnectionRegistry:
    """Open connections per agent (lowercased id) plus slots reserved by handshakes in flight."""

    def __init__(self) -> None:
        self._open: dict[str, list[AgentSocketProtocol]] = {}
        self._reserved: dict[str, int] = {}
        self._claimed: set[AgentSocketProtocol] = set()

    def count(self, agent_id: str) -> int:
        key = agent_id.lower()
        return len(self._open.get(key, ())) + self._reserved.get(key, 0)

    def reserve(self, agent_id: str) -> None:
        key = agent_id.lower()
        self._reserved[key] = self._reserved.get(key, 0) + 1

    def unreserve(self, agent_id: str) -> None:
        key = agent_id.lower()
        left = self._reserved.get(key, 0) - 1
        if left > 0:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)

    def claim(self, proto: AgentSocketProtocol) -> None:
        """The reservation now belongs to ``proto`` (released by attach or detach)."""
        self._claimed.add(proto)

    def attach(self, proto: AgentSocketProtocol) -> None:
        if proto in self._claimed:
            self._claimed.discard(proto)
            self.unreserve(proto.agent_key)
        self._open.setdefault(proto.agent_key, []).append(proto)

    def detach(self, proto: AgentSocketProtocol) -> None:
        if proto in self._claimed:
            self._claimed.discard(proto)
            self.unreserve(proto.agent_key)
        conns = self._open.get(proto.agent_key)
        if conns and proto in conns:
            conns.remove(proto)
            if not conns:
                del self._open[proto.agent_key]

    def connections(self, agent_id: str) -> list[AgentSocketProtocol]:
        return list(self._open.get(agent_id.lower(), ()))

    def all(self) -> list[AgentSocketProtocol]:
        return [p for conns in self._open.values() for p in conns]


# ------------------------------------------------------------------------------ service


class WebSocketService:
    """Per-process WebSocket delivery: the factory, the registry and the event subscriptions.

    Args:
        db: the process's :class:`Database`.
        events: the process's started :class:`EventListener` (LISTEN connection).
        config: ``websocket.*``.
        public_url: ``http.public_url`` (the default allowed origin).
        reactor: handed to Autobahn (its handshake timers).
        clock: keepalive timers (pings, pong deadline); defaults to ``reactor``.
    """

    def __init__(
        self,
        db: Database,
        events: Any,
        config: WebSocketConfig,
        public_url: str,
        reactor: Any,
        clock: Any | None = None,
    ) -> None:
        self.db = db
        self.events = events
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.allowed_origins = allowed_origins(config.allowed_origins, public_url)
        self.registry = ConnectionRegistry()
        self.factory = AgentSocketFactory(reactor)
        self.running = False
        self._unsubscribe: list[Callable[[], None]] = []
        self._live: dict[str, deque[str]] = {}
        self._reconnect_hooked = False
        self._tasks: set[Deferred[Any]] = set()

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the factory and subscribe to inbound and revoke events (call after
        ``events.start()``, before the HTTP listener opens)."""
        if self.running:
            return
        self.factory.startFactory()
        self._unsubscribe = [
            self.events.subscribe(CHANNEL_INBOUND, self._on_inbound),
            self.events.subscribe(CHANNEL_REVOKE, self._on_revoke),
        ]
        if not self._reconnect_hooked:
            self.events.on_reconnect(self._on_listener_reconnect)
            self._reconnect_hooked = True
        self.running = True

    async def stop(self) -> None:
        """Close every socket with 1001 ``server shutting down`` and wait until they are gone
        (bounded by Autobahn's close-handshake timeout), then stop the factory."""
        if not self.running:
            return
        self.running = False
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        conns = self.registry.all()
        for conn in conns:
            conn.close_with(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
        if conns:
            await defer.DeferredList([c.closed for c in conns], consumeErrors=True)
        # Drains, acks and lookups still in flight end quickly once their socket is gone;
        # wait for them so nothing touches the database after the service stopped.
        while self._tasks:
            await defer.DeferredList(list(self._tasks), consumeErrors=True)
        self.factory.stopFactory()

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Remember in-flight work until it finishes (see :meth:`stop`)."""
        self._tasks.add(d)

        def done(result: Any) -> Any:
            self._tasks.discard(d)
            return result

        d.addBoth(done)
        return d

    # ---- handshake support (used by e2a.api.ws) ---------------------------------------

    def origin_allowed(self, origin: str | None) -> bool:
        return origin_allowed(origin, self.allowed_origins)

    def has_capacity(self, agent_id: str) -> bool:
        return self.registry.count(agent_id) < self.config.max_connections_per_agent

    def upgrade_resource(self, principal: Principal, agent_id: str) -> UpgradeResource:
        """Reserve a connection slot and return the resource that performs the upgrade.

        Call synchronously right after :meth:`has_capacity` (no ``await`` in between) and
        return it from the route: Klein renders it at once.
        """
        grant = SocketGrant(principal=principal, agent_id=agent_id, service=self)
        self.registry.reserve(agent_id)
        return UpgradeResource(_GrantingFactory(self.factory, grant), grant)

    # ---- storage seams (tests wrap these) ---------------------------------------------

    async def unread_page(
        self, agent_id: str, after: tuple[datetime, str] | None, page_size: int
    ) -> list[Notification]:
        return await unread_page(self.db, agent_id, after, page_size)

    async def fetch_notification(self, agent_id: str, message_id: str) -> Notification | None:
        return await fetch_notification(self.db, agent_id, message_id)

    # ---- events -----------------------------------------------------------------------

    def _on_inbound(self, payload: str) -> None:
        agent_id, sep, message_id = payload.partition("\t")
        if not sep or not message_id:
            return
        key = agent_id.lower()
        if not self.registry.connections(key):
            return  # nobody here listens for this agent: no query at all
        queue = self._live.get(key)
        if queue is None:
            queue = self._live[key] = deque()
        queue.append(message_id)
        if len(queue) == 1:
            self.track(Deferred.fromCoroutine(self._pump(key, queue)))

    async def _pump(self, key: str, queue: deque[str]) -> None:
        """Fetch and fan out one agent's live events strictly in NOTIFY (= commit) order."""
        try:
            while queue:
                message_id = queue[0]
                try:
                    note = await self.fetch_notification(key, message_id)
                except Exception:
                    log.failure("live push lookup failed for {message_id}", message_id=message_id)
                    # The mail stays unread; a reconnect drains it. Better than silently skipping.
                    for conn in self.registry.connections(key):
                        conn.close_with(CLOSE_INTERNAL, REASON_INTERNAL)
                    note = None
                queue.popleft()
                if note is not None:
                    for conn in self.registry.connections(key):
                        conn.offer(note)
        finally:
            if not queue and self._live.get(key) is queue:
                del self._live[key]

    def _on_revoke(self, payload: str) -> None:
        kind, _, ident = payload.partition("\t")
        if kind == "key":
            self._close_where(lambda c: c.grant.principal.key_id == ident, REASON_KEY_REVOKED)
        elif kind == "user":
            self._close_where(lambda c: c.grant.principal.user_id == ident, REASON_KEY_REVOKED)
        elif kind == "agent":
            for conn in self.registry.connections(ident):
                conn.close_with(CLOSE_POLICY, REASON_AGENT_DELETED)
        elif kind == "agentmode":
            # Fires on any mode change; re-read the row (it may have gone back to local).
            for conn in self.registry.connections(ident):
                conn.run_guarded(conn.revalidate())

    def _close_where(self, predicate: Callable[[AgentSocketProtocol], bool], reason: str) -> None:
        for conn in self.registry.all():
            if conn.grant is not None and predicate(conn):
                conn.close_with(CLOSE_POLICY, reason)

    def _on_listener_reconnect(self) -> None:
        """NOTIFY is not queued for absent listeners: re-check grants and re-drain."""
        if not self.running:
            return

        async def catch_up(conn: AgentSocketProtocol) -> None:
            if await conn.revalidate():
                conn.request_redrain()

        for conn in self.registry.all():
            conn.run_guarded(catch_up(conn))
