"""The Autobahn factory and upgrade resource that carry an authenticated :class:`SocketGrant` to
the protocol, and the per-process :class:`ConnectionRegistry` of open connections and reserved
handshake slots (``websocket.max_connections_per_agent``).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory

from e2a.delivery.websocket.protocol import (
    AgentSocketProtocol,
    SocketGrant,
)
from e2a.delivery.websocket.rules import (
    CLOSE_HANDSHAKE_TIMEOUT,
    MAX_INCOMING_OCTETS,
    OPEN_HANDSHAKE_TIMEOUT,
)


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
