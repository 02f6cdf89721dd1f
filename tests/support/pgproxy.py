"""A proxy in front of the test PostgreSQL that can stop answering: a server that is still
reachable but no longer replies (a frozen host, a network dropping packets), without touching
the server the other tests share.

It listens on a Unix socket of its own (libpq's ``host=<directory>``) and forwards each
connection to the server's socket. :meth:`PgProxy.freeze` stops moving bytes both ways and
holds new connections unanswered; :meth:`PgProxy.thaw` lets everything through again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import protocol

__all__ = ["PgProxy"]


class _Upstream(protocol.Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self.downstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted API
        self.downstream.transport.loseConnection()


class _Downstream(protocol.Protocol):
    def __init__(self, proxy: PgProxy) -> None:
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.pending = bytearray()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.proxy.sessions.append(self)
        if self.proxy.frozen:
            self.transport.pauseProducing()
            return
        self.connect()

    def connect(self) -> None:
        creator = protocol.ClientCreator(self.proxy.reactor, _Upstream, self)
        creator.connectUNIX(self.proxy.target)

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        if self.pending:
            upstream.transport.write(bytes(self.pending))
            self.pending.clear()
        if self.proxy.frozen:
            self.pause()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted API
        if self in self.proxy.sessions:
            self.proxy.sessions.remove(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()

    def pause(self) -> None:
        self.transport.pauseProducing()
        if self.upstream is not None:
            self.upstream.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()
        if self.upstream is not None:
            self.upstream.transport.resumeProducing()
        elif self.transport.connected:
            self.connect()


class PgProxy:
    """``start(server_dsn)`` returns the DSN to connect through the proxy."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.frozen = False
        self.sessions: list[_Downstream] = []
        self.target = ""
        self._dir = ""
        self._port: Any = None

    def start(self, host_dir: str, port: int, rest: str) -> str:
        """Listen in a directory of its own for the server whose socket is in ``host_dir``;
        ``rest``: the DSN's other keywords (user, dbname)."""
        self.target = str(Path(host_dir) / f".s.PGSQL.{port}")
        self._dir = tempfile.mkdtemp(prefix="pgx-")
        if len(self._dir.encode()) > 80:  # a socket path has ~100 bytes; TMPDIR may be long
            shutil.rmtree(self._dir)
            self._dir = tempfile.mkdtemp(prefix="e2a-pgx-", dir="/tmp")
        factory = protocol.Factory.forProtocol(lambda: _Downstream(self))
        factory.noisy = False
        self._port = self.reactor.listenUNIX(str(Path(self._dir) / f".s.PGSQL.{port}"), factory)
        return f"host={self._dir} port={port} {rest}"

    def freeze(self) -> None:
        self.frozen = True
        for session in self.sessions:
            session.pause()

    def thaw(self) -> None:
        self.frozen = False
        for session in list(self.sessions):
            session.resume()

    async def stop(self) -> None:
        self.thaw()
        for session in list(self.sessions):
            session.transport.loseConnection()
        if self._port is not None:
            await self._port.stopListening()
        shutil.rmtree(self._dir, ignore_errors=True)
