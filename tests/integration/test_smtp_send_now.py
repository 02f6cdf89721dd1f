"""An SMTP reply is sent from ``write`` when nothing is queued (e2a.smtp.sendnow), on a real
TCP connection on 127.0.0.1: no writability registration, no reordering, the rest of a large
write left to the reactor, and an error left to Twisted's own write path."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest_twisted

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport

from e2a.smtp.sendnow import can_send_now, write_now
from tests.support.waiting import wait_for


class _Server(protocol.Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.factory.connected.callback(self)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted API
        self.lost.callback(None)


class _Pair:
    """A server-side Twisted transport on 127.0.0.1 and the client's plain, non-blocking socket."""

    def __init__(self, port: Any, server: _Server, client: socket.socket) -> None:
        self.port = port
        self.server = server
        self.client = client
        self.received = b""

    @property
    def transport(self) -> Any:
        return self.server.transport

    async def receive(self, n: int) -> bytes:
        """Read until ``n`` octets have arrived, through the reactor (never a blocking read)."""

        def enough() -> bool:
            try:
                while chunk := self.client.recv(1 << 16):
                    self.received += chunk
            except BlockingIOError:
                pass
            return len(self.received) >= n

        await wait_for(enough, step=0.001)
        return self.received

    async def close(self) -> None:
        self.client.close()
        if self.transport.connected:
            self.transport.abortConnection()
        await self.port.stopListening()


@asynccontextmanager
async def _pair() -> AsyncIterator[_Pair]:
    factory = protocol.Factory.forProtocol(_Server)
    factory.connected = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port.getHost().port))
    pair = _Pair(port, await factory.connected, client)
    try:
        yield pair
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_reply_is_sent_at_once_without_waiting_for_writability():
    async with _pair() as pair:
        assert can_send_now(pair.transport)
        write_now(pair.transport, b"250 2.1.0 Ok\r\n")
        assert pair.transport not in reactor.getWriters()  # nothing queued, no epoll_ctl
        assert pair.transport._tempDataBuffer == [] and pair.transport.dataBuffer == b""
        assert await pair.receive(14) == b"250 2.1.0 Ok\r\n"


@pytest_twisted.ensureDeferred
async def test_bytes_already_queued_go_first():
    """A write queued by the transport is not overtaken: the reply joins the queue."""
    async with _pair() as pair:
        pair.transport.write(b"first ")
        assert not can_send_now(pair.transport)
        write_now(pair.transport, b"second\r\n")
        assert pair.transport in reactor.getWriters()
        assert await pair.receive(14) == b"first second\r\n"


@pytest_twisted.ensureDeferred
async def test_what_a_full_socket_does_not_take_is_left_to_the_reactor():
    async with _pair() as pair:
        pair.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data = bytes(range(256)) * 256  # 64 KiB: more than both buffers hold
        write_now(pair.transport, data)
        assert pair.transport in reactor.getWriters()  # the rest is queued
        assert 0 < len(data) - pair.transport._tempDataLen < len(data)
        assert await pair.receive(len(data)) == data


@pytest_twisted.ensureDeferred
async def test_a_reset_connection_raises_nothing_and_is_lost_the_usual_way():
    async with _pair() as pair:
        pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.client.close()  # RST
        for _ in range(3):  # the first send may still succeed; later ones meet the reset
            write_now(pair.transport, b"250 2.0.0 Ok\r\n")
        await pair.server.lost
        assert not pair.transport.connected
        write_now(pair.transport, b"421 late\r\n")  # after the loss: dropped, as transport.write does


@pytest_twisted.ensureDeferred
async def test_a_closing_connection_takes_the_transport_write():
    async with _pair() as pair:
        pair.transport.loseConnection()
        assert not can_send_now(pair.transport)
        write_now(pair.transport, b"250 late\r\n")  # dropped by Twisted, as before
        await pair.server.lost


@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_sends_nothing_more():
    """abortConnection leaves ``connected`` set until connectionLost runs; nothing may be
    sent in between."""
    async with _pair() as pair:
        pair.transport.abortConnection()
        assert not can_send_now(pair.transport)
        write_now(pair.transport, b"250 late\r\n")
        await pair.server.lost
        try:
            got = pair.client.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""  # the reset, and nothing before it


def test_other_transports_take_their_own_write():
    """A transport that is not Twisted's TCP connection (here the tests' StringTransport)
    gets the bytes through its own write."""
    transport = StringTransport()
    assert not can_send_now(transport)
    write_now(transport, b"220 mx ESMTP\r\n")
    assert transport.value() == b"220 mx ESMTP\r\n"


@pytest_twisted.ensureDeferred
async def test_a_tls_connection_is_never_written_around():
    async with _pair() as pair:
        try:
            pair.transport.TLS = True  # what Connection.startTLS sets before wrapping the protocol
            assert not can_send_now(pair.transport)
        finally:
            pair.transport.TLS = False
