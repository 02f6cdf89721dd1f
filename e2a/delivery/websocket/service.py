"""The WebSocket service of one process (:class:`WebSocketService`): owns the factory, subscribes
to ``CHANNEL_INBOUND`` and ``CHANNEL_REVOKE`` so pushes and revocations reach sockets held by any
e2a process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from e2a.config import WebSocketConfig
from e2a.delivery.websocket.protocol import (
    AgentSocketProtocol,
    SocketGrant,
)
from e2a.delivery.websocket.registry import (
    AgentSocketFactory,
    ConnectionRegistry,
    UpgradeResource,
    _GrantingFactory,
)
from e2a.delivery.websocket.rules import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    REASON_AGENT_DELETED,
    REASON_INTERNAL,
    REASON_KEY_REVOKED,
    REASON_SHUTDOWN,
    Notification,
    allowed_origins,
    origin_allowed,
)
from e2a.delivery.websocket.storage import (
    fetch_notification,
    unread_page,
)
from e2a.policy.principal import Principal
from e2a.store.database import Database
from e2a.store.events import CHANNEL_INBOUND, CHANNEL_REVOKE

log = Logger()


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
