"""One agent's WebSocket connection (:class:`AgentSocketProtocol`): drain, live queue, acks,
keepalive on the injected clock, slow-consumer guard, close codes.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

from e2a.delivery.websocket.rules import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    REASON_BINARY,
    REASON_INTERNAL,
    REASON_PING_TIMEOUT,
    REASON_SHUTDOWN,
    REASON_SLOW_CONSUMER,
    REASON_TOO_BIG,
    SENT_IDS_KEPT,
    SLOW_CONSUMER_OCTETS,
    SUBPROTOCOL_V2,
    Notification,
    encode_frame,
    notification_frame,
    parse_client_frame,
)
from e2a.delivery.websocket.storage import (
    _grant_state_txn,
)
from e2a.policy.principal import Principal
from e2a.store import messages as message_store

if TYPE_CHECKING:
    from e2a.delivery.websocket.service import WebSocketService

log = Logger()


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
