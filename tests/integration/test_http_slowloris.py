"""HTTP slowloris, reproduced on loopback and held: request deadlines that bytes do not move,
total and per-address connection caps (WebSocket included), and SMTP untouched meanwhile.

The "attacker" connects from 127.0.0.2 (still the loopback interface) so that the per-address
cap can be told apart from the health check and the SMTP client on 127.0.0.1. Deadlines are
driven with ``task.Clock``; real time is only ever waited on through the reactor, bounded.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from e2a.api.limits import HttpLimits, guard_site
from e2a.config import HttpConfig, SmtpConfig
from tests.support import smtpclient
from tests.support.waiting import wait_for

WAIT = 10.0
ATTACKER = "127.0.0.2"


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((ATTACKER, 0))
        return True
    except OSError:
        return False


needs_alias = pytest.mark.skipif(not _loopback_alias_works(), reason="127.0.0.2 is not usable on this host")


class RawClient(protocol.Protocol):
    """Writes what it is told, records what it gets, fires ``lost`` when the socket closes."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.open = False
        self.lost.callback(None)


async def raw_connect(port: int, source: str = "127.0.0.1") -> RawClient:
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT, bindAddress=(source, 0))
    await connectProtocol(endpoint, client)
    return client


async def closed(clients: list[RawClient]) -> None:
    await defer.DeferredList([c.lost for c in clients]).addTimeout(WAIT, reactor)


class Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.content.read()
        return b"ok"


def _guarded(clock: Clock, **limits: Any) -> Any:
    values = {"max_connections": 100, "max_connections_per_ip": 100, "header_timeout": 20.0,
              "request_timeout": 120.0, **limits}
    site = Site(Ok())
    site.noisy = False
    return guard_site(site, HttpLimits(**values), clock)


@pytest.fixture
def guarded_port():
    """``await guarded_port(clock, **limits)`` → (guard, port) on 127.0.0.1; closed at teardown."""
    ports = []

    def make(clock: Clock, **limits: Any) -> Any:
        guard = _guarded(clock, **limits)
        port = reactor.listenTCP(0, guard, interface="127.0.0.1")
        ports.append(port)
        return guard, port.getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _received(guard: Any) -> int:
    return sum(p.received for p in guard.protocols)


@pytest_twisted.ensureDeferred
async def test_dribbling_header_is_cut_at_deadline_not_extended_by_bytes(guarded_port):
    """10 connections send a header byte every 4 s: still open at 19.5 s, all cut at 20 s."""
    clock = Clock()
    guard, port = guarded_port(clock)
    clients = [await raw_connect(port) for _ in range(10)]
    await wait_for(_async(lambda: guard.open == 10), timeout=WAIT)
    for c in clients:
        c.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(5):
        before = _received(guard)
        for c in clients:
            c.transport.write(b"X")
        await wait_for(_async(lambda b=before: _received(guard) >= b + 10), timeout=WAIT)
        clock.advance(3.9)
    assert all(c.open for c in clients) and guard.open == 10  # 19.5 s: not yet
    clock.advance(0.6)  # 20.1 s after the connections were accepted
    await closed(clients)
    assert guard.open == 0
    assert all(c.received == b"" for c in clients)  # cut, no response owed


@pytest_twisted.ensureDeferred
async def test_slow_body_is_cut_at_request_deadline(guarded_port):
    """A complete head with a body that trickles: open past the head deadline, cut at 120 s."""
    clock = Clock()
    guard, port = guarded_port(clock)
    client = await raw_connect(port)
    client.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
    await wait_for(_async(lambda: _received(guard) > 10), timeout=WAIT)
    clock.advance(60)
    before = _received(guard)
    client.transport.write(b"b" * 10)
    await wait_for(_async(lambda: _received(guard) == before + 10), timeout=WAIT)
    clock.advance(59)
    assert client.open
    clock.advance(1.5)
    await closed([client])


@pytest_twisted.ensureDeferred
async def test_prompt_requests_are_served_and_idle_keepalive_closed(guarded_port):
    """A whole request in time is answered; the idle keep-alive connection then gets a fresh
    head deadline and is closed gently when it sends nothing."""
    clock = Clock()
    guard, port = guarded_port(clock)
    client = await raw_connect(port)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(_async(lambda: client.received.endswith(b"ok")), timeout=WAIT)
    assert client.received.startswith(b"HTTP/1.1 200")
    clock.advance(19)
    client.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    await wait_for(_async(lambda: client.received.count(b"HTTP/1.1 200") == 2), timeout=WAIT)
    clock.advance(19.9)
    assert client.open
    clock.advance(0.2)
    await closed([client])


@needs_alias
@pytest_twisted.ensureDeferred
async def test_connections_beyond_caps_are_refused(guarded_port):
    """Per-address cap: 5 of 12 connections from one address kept, 7 answered 429 and closed;
    the total cap answers 503 to every further address."""
    clock = Clock()
    guard, port = guarded_port(clock, max_connections=8, max_connections_per_ip=5)
    attackers = [await raw_connect(port, ATTACKER) for _ in range(12)]
    await wait_for(_async(lambda: sum(not c.open for c in attackers) == 7), timeout=WAIT)
    kept = [c for c in attackers if c.open]
    assert len(kept) == 5 and guard.per_ip[ATTACKER] == 5
    assert all(c.received.startswith(b"HTTP/1.1 429") for c in attackers if not c.open)
    others = [await raw_connect(port) for _ in range(4)]  # 127.0.0.1: 3 fit under the total cap
    await wait_for(_async(lambda: sum(not c.open for c in others) == 1), timeout=WAIT)
    assert guard.open == 8
    [late] = [c for c in others if not c.open]
    assert late.received.startswith(b"HTTP/1.1 503") and b'"unavailable"' in late.received
    for c in kept + others:
        c.transport.abortConnection()
    await wait_for(_async(lambda: guard.open == 0), timeout=WAIT)
    assert dict(guard.per_ip) == {}


def _async(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


# ---- the whole service: SMTP and /api/health hold during the attack ----------------------------


async def _service(factory: Any, **http: Any) -> Any:
    return await factory(
        http=HttpConfig(listen_addr="127.0.0.1:0", **http),
    )


async def _health(port: int) -> bytes:
    client = await raw_connect(port)
    client.transport.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await closed([client])
    return client.received


async def _banner(port: int) -> str:
    client = await smtpclient.connect(port)
    try:
        return str(await client.reply())
    finally:
        client.abort()


@needs_alias
@pytest_twisted.ensureDeferred
async def test_slowloris_leaves_smtp_and_health_answering(e2a_service_factory):
    """200 slow connections from one address: 10 held (per-address cap), 190 refused; the
    SMTP greeting and /api/health still answer from another address while they are held."""
    service = await _service(e2a_service_factory, max_connections=40, max_connections_per_ip=10)
    http_port = service.http_port.getHost().port
    smtp_port = service.smtp_port.getHost().port
    attackers = []
    for _ in range(200):
        c = await raw_connect(http_port, ATTACKER)
        c.transport.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        attackers.append(c)
    await wait_for(_async(lambda: sum(not c.open for c in attackers) == 190), timeout=WAIT)
    assert service.http_guard.per_ip[ATTACKER] == 10
    assert (await _banner(smtp_port)).startswith("220 ")
    assert (await _health(http_port)).startswith(b"HTTP/1.1 200")
    for c in attackers:
        if c.open:
            c.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_websocket_holds_its_http_slot_until_closed(e2a_service_factory):
    """An upgraded WebSocket counts against the per-address cap while open, and frees it on close."""
    from e2a.store import accounts
    from tests.support import wsclient

    service = await _service(e2a_service_factory, max_connections=40, max_connections_per_ip=2)
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    http_port = service.http_port.getHost().port
    import json

    import treq

    r = await treq.post(
        f"http://127.0.0.1:{http_port}/api/v1/agents",
        data=json.dumps({"slug": "local", "agent_mode": "local"}).encode(),
        headers={"Authorization": f"Bearer {boot.api_key_plaintext}"}, persistent=False,
    )
    assert r.code == 201, await treq.content(r)
    await wait_for(_async(lambda: service.http_guard.open == 0), timeout=WAIT)
    ws = await wsclient.connect(http_port, "local@agents.test", bearer=boot.api_key_plaintext)
    assert service.http_guard.per_ip["127.0.0.1"] == 1
    holder = await raw_connect(http_port)  # the second slot of 127.0.0.1
    refused = await raw_connect(http_port)
    await closed([refused])
    assert refused.received.startswith(b"HTTP/1.1 429")
    holder.transport.abortConnection()
    ws.transport.loseConnection()
    await wait_for(_async(lambda: service.http_guard.open == 0), timeout=WAIT)
    assert (await _health(http_port)).startswith(b"HTTP/1.1 200")


# ---- the descriptor budget at start ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_start_refused_when_smtp_share_does_not_fit(e2a_service_factory, monkeypatch):
    """An open-file limit below smtp.max_connections + pool + margin: start fails naming them."""
    from e2a.api import limits
    from e2a.errors import ConfigError

    monkeypatch.setattr(limits, "raise_nofile_limit", lambda: (1024, 1024))
    with pytest.raises(ConfigError) as info:
        await e2a_service_factory(smtp=SmtpConfig(listen_addr="127.0.0.1:0", domain="mx.e2a.test", max_connections=1000))
    text = str(info.value)
    assert "1024" in text and "smtp.max_connections" in text and "database.pool_size" in text


@pytest_twisted.ensureDeferred
async def test_http_cap_lowered_to_keep_smtp_reserve(e2a_service_factory, monkeypatch):
    """Room for SMTP but not for all of http.max_connections: HTTP's cap is lowered, SMTP's kept."""
    from e2a.api import limits

    in_use = limits.open_fd_count()
    limit = in_use + 50 + (4 + limits.DB_EXTRA_CONNECTIONS) + limits.FD_MARGIN + 30
    monkeypatch.setattr(limits, "raise_nofile_limit", lambda: (limit, limit))
    monkeypatch.setattr(limits, "open_fd_count", lambda: in_use)
    service = await e2a_service_factory(
        smtp=SmtpConfig(listen_addr="127.0.0.1:0", domain="mx.e2a.test", max_connections=50),
    )  # the fixture's database.pool_size is 4
    assert service.fd_budget.http == 30 and service.http_guard.limits.max_connections == 30
    assert service.smtp_factory.config.max_connections == 50

