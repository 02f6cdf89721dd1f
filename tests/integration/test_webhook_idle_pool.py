"""A tenant's many receiver hosts cannot park idle webhook connections without bound.

Twisted's connection pool caps idle keep-alive connections per host only: one tenant with an
agent per host (a wildcard domain) whose receivers answer at once and keep the connection open
would leave up to ``max_concurrency_per_agent`` idle sockets per host for 4 minutes, past the
descriptor margin of the start-up plan and into SMTP's reserve. Reproduced on loopback with one
receiver per 127.0.0.x address.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from e2a.delivery.webhook import MAX_IDLE_CONNECTIONS, WebhookClient
from tests.support.waiting import wait_for

HOSTS = [f"127.0.0.{i}" for i in range(2, 2 + MAX_IDLE_CONNECTIONS + 16)]


def _aliases_work() -> bool:
    try:
        with socket.socket() as s:
            s.bind((HOSTS[-1], 0))
        return True
    except OSError:
        return False


class Ok(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - Twisted API
        return b"ok"


class NoDns:
    async def lookup_addresses(self, name: str) -> list[str]:
        raise AssertionError("IP literals only")


@pytest.mark.skipif(not _aliases_work(), reason="127.0.0.x aliases are not usable on this host")
@pytest_twisted.ensureDeferred
async def test_idle_webhook_connections_bounded_across_many_receiver_hosts():
    """48 keep-alive receivers, one delivery each: at most MAX_IDLE_CONNECTIONS stay cached
    (and open on the receivers' side); every delivery still succeeds."""
    site = Site(Ok())
    site.noisy = False
    open_server_side: list[Any] = []

    class Counting(HTTPChannel):
        def connectionMade(self) -> None:  # noqa: N802
            open_server_side.append(self)
            super().connectionMade()

        def connectionLost(self, reason: Any) -> None:  # noqa: N802
            open_server_side.remove(self)
            super().connectionLost(reason)

    site.protocol = Counting
    ports = []
    first = reactor.listenTCP(0, site, interface=HOSTS[0])
    ports.append(first)
    port = first.getHost().port
    for host in HOSTS[1:]:
        ports.append(reactor.listenTCP(port, site, interface=host))
    client = WebhookClient(reactor, NoDns(), timeout=5, production=False, allow_private=True)
    try:
        results = []
        for host in HOSTS:
            results.append(await client.post(f"http://{host}:{port}/hook", b"{}", [("Content-Type", "application/json")]))
        assert [r.status for r in results] == [200] * len(HOSTS)
        assert len(client._pool._timeouts) <= MAX_IDLE_CONNECTIONS
        async def closed_down() -> bool:  # the closes reach the receivers within a few reactor turns
            return len(open_server_side) <= MAX_IDLE_CONNECTIONS

        await wait_for(closed_down, timeout=5.0, step=0.01)
    finally:
        await client.close()
        for p in ports:
            await p.stopListening()
