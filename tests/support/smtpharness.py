"""An e2a SMTP listener on 127.0.0.1:0 with recording fakes for the lookup and accept seams."""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet import defer, reactor

from e2a.config import SmtpConfig
from e2a.errors import TransientError
from e2a.smtp.server import Envelope, SmtpFactory
from tests.support.smtpclient import SmtpTestClient, connect

DOMAIN = "mx.e2a.test"


class SmtpHarness:
    """Owns listeners, fakes and client connections; :meth:`close` leaves the reactor clean.

    ``agents`` maps lower-cased address → canonical address. Set ``hold_lookups`` or
    ``hold_accepts`` to get Deferreds the test fires itself (``pending_lookups`` /
    ``pending_accepts``); set ``accept_error`` to make accept raise.
    """

    def __init__(self) -> None:
        self.agents = {
            "bot@agents.test": "bot@agents.test",
            "other@agents.test": "other@agents.test",
            "alias@agents.test": "bot@agents.test",
        }
        self.lookup_calls: list[str] = []
        self.hold_lookups = False
        self.pending_lookups: list[tuple[str, defer.Deferred[Any]]] = []
        self.accepted: list[tuple[Envelope, bytes]] = []
        self.accept_error: Exception | None = None
        self.hold_accepts = False
        self.pending_accepts: list[tuple[Envelope, bytes, defer.Deferred[Any]]] = []
        self.factories: list[SmtpFactory] = []
        self._ports: list[Any] = []
        self._clients: list[SmtpTestClient] = []

    async def lookup(self, address: str) -> str | None:
        self.lookup_calls.append(address)
        if address.startswith("boom@"):
            raise TransientError("database down")
        if self.hold_lookups:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending_lookups.append((address, d))
            return await d
        return self.agents.get(address.lower())

    async def accept(self, envelope: Envelope, raw: bytes) -> str:
        if self.accept_error is not None:
            raise self.accept_error
        if self.hold_accepts:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending_accepts.append((envelope, raw, d))
            await d
        self.accepted.append((envelope, raw))
        return f"msg_{len(self.accepted)}"

    def start(self, *, clock: Any = None, tls: Any = None, **overrides: Any) -> int:
        config = dataclasses.replace(SmtpConfig(domain=DOMAIN), **overrides)
        factory = SmtpFactory(config, self.lookup, self.accept, clock or reactor, tls)
        self.factories.append(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return port.getHost().port

    async def connect(self, port: int, *, greet: bool = True) -> SmtpTestClient:
        client = await connect(port)
        self._clients.append(client)
        if greet:
            reply = await client.reply()
            assert reply.code == 220, reply
        return client

    async def close(self) -> None:
        for _, d in self.pending_lookups:
            if not d.called:
                d.cancel()
        for _, _, d in self.pending_accepts:
            if not d.called:
                d.cancel()
        for client in self._clients:
            client.abort()
        for client in self._clients:
            await client.closed
        for factory in self.factories:
            for session in list(factory.sessions):
                session.transport.abortConnection()
            await factory.shutdown()
        for port in self._ports:
            await port.stopListening()
