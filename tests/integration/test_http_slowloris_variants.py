"""Slowloris variants the first attack did not try: a dribbled second request behind a prompt
one (keep-alive pipelining), a chunked body dribble, a WebSocket upgrade head that never ends,
and many connections from IPv6 loopback. Deadlines on ``task.Clock``; 127.0.0.1 / ::1 only."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from e2a.api.limits import HttpLimits, guard_site
from tests.support.waiting import wait_for

WAIT = 10.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.open = False

    def connectionMade(self) -> None:  # noqa: N802
        self.open = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.open = False
        self.lost.callback(None)


class Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.content.read()
        return b"ok"


def _async(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


@pytest.fixture
def guarded():
    ports = []

    def make(clock: Clock, interface: str = "127.0.0.1", **limits: Any) -> Any:
        values = {"max_connections": 100, "max_connections_per_ip": 100, "header_timeout": 20.0,
                  "request_timeout": 120.0, **limits}
        site = Site(Ok())
        site.noisy = False
        guard = guard_site(site, HttpLimits(**values), clock)
        port = reactor.listenTCP(0, guard, interface=interface)
        ports.append(port)
        return guard, port.getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def _connect(port: int, host: str = "127.0.0.1") -> RawClient:
    client = RawClient()
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port, timeout=WAIT)
    await connectProtocol(endpoint, client)
    return client


def _received(guard: Any) -> int:
    return sum(p.received for p in guard.protocols)


async def _dribble(guard: Any, clock: Clock, client: RawClient, seconds: float, step: float = 3.9) -> None:
    """One byte every ``step`` seconds for ``seconds`` (clock time)."""
    elapsed = 0.0
    while elapsed + step <= seconds:
        before = _received(guard)
        client.transport.write(b"X")
        await wait_for(_async(lambda b=before: _received(guard) > b), timeout=WAIT)
        clock.advance(step)
        elapsed += step


@pytest_twisted.ensureDeferred
async def test_pipelined_second_request_dribbled_is_cut_at_its_head_deadline(guarded):
    """A prompt request, then in the same write the start of a second that dribbles: the first
    is answered, the second is cut 20 s after the first response, whatever arrives."""
    clock = Clock()
    guard, port = guarded(clock)
    client = await _connect(port)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await wait_for(_async(lambda: client.received.endswith(b"ok")), timeout=WAIT)
    await _dribble(guard, clock, client, 19.5)
    assert client.open
    clock.advance(0.6)
    await client.lost.addTimeout(WAIT, reactor)
    assert client.received.count(b"HTTP/1.1 200") == 1


@pytest_twisted.ensureDeferred
async def test_chunked_body_dribble_is_cut_at_request_deadline(guarded):
    """A chunked body sent one octet-chunk at a time never extends the 120 s deadline."""
    clock = Clock()
    guard, port = guarded(clock)
    client = await _connect(port)
    client.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    elapsed = 0.0
    while elapsed < 119:
        before = _received(guard)
        client.transport.write(b"1\r\na\r\n")
        await wait_for(_async(lambda b=before: _received(guard) > b), timeout=WAIT)
        clock.advance(7)
        elapsed += 7
    assert client.open
    clock.advance(2)
    await client.lost.addTimeout(WAIT, reactor)
    assert client.received == b""


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_head_dribbled_is_cut_at_head_deadline(guarded):
    """An upgrade request whose head never completes is an ordinary slow head: cut at 20 s."""
    clock = Clock()
    guard, port = guarded(clock)
    client = await _connect(port)
    client.transport.write(
        b"GET /api/v1/agents/a@agents.test/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ")
    await _dribble(guard, clock, client, 19.5)
    assert client.open
    clock.advance(0.6)
    await client.lost.addTimeout(WAIT, reactor)
    assert guard.open == 0


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_many_ipv6_loopback_connections_hit_the_per_address_cap(guarded):
    """30 connections from ::1: 5 kept, 25 answered 429; all cut by the deadline later."""
    clock = Clock()
    guard, port = guarded(clock, interface="::1", max_connections=50, max_connections_per_ip=5)
    clients = [await _connect(port, "::1") for _ in range(30)]
    await wait_for(_async(lambda: sum(not c.open for c in clients) == 25), timeout=WAIT)
    assert all(c.received.startswith(b"HTTP/1.1 429") for c in clients if not c.open)
    assert guard.open == 5
    clock.advance(20.1)
    await defer.DeferredList([c.lost for c in clients if c.open]).addTimeout(WAIT, reactor)
    clock.advance(5.1)  # idle ones: closed gently, reset after the grace period
    await wait_for(_async(lambda: guard.open == 0), timeout=WAIT)
