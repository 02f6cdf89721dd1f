"""Webhook TLS in production mode over real loopback sockets (mail.md §4.6, issue 4).

Production webhooks are https only *with certificate verification*: a receiver whose
certificate does not chain to a trusted root, or does not name the URL's host, must never see
the request. The receiver here is a twisted.web site behind TLS on 127.0.0.1 with a fresh
self-signed certificate; the host name resolves to it through the loopback DNS zone.

``webhooks.allow_private`` is refused by the production config rules, but ``WebhookClient``
takes ``production`` and ``allow_private`` separately: combining them here only lifts the
address rules (so a loopback receiver can be reached); the TLS path is the production one.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from twisted.internet import reactor, ssl
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import resource, server

from e2a.delivery import webhook
from e2a.delivery.webhook import WebhookClient
from e2a.mailauth.dns import DnsClient
from tests.support.dnsserver import start_dns_server
from tests.support.smtpsink import self_signed_tls

HOST = "hooks.example.test"
BODY = b'{"message_id":"msg_tls"}'


class _Hook(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: server.Request) -> bytes:  # noqa: N802 - twisted.web API
        self.bodies.append(request.content.read())
        return b"ok"


class _Recording(ProtocolWrapper):
    """Records every decrypted byte the receiver's HTTP layer is handed."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self.factory.plaintext.append(data)
        super().dataReceived(data)


class _RecordingFactory(WrappingFactory):
    protocol = _Recording

    def __init__(self, wrapped: server.Site) -> None:
        super().__init__(wrapped)
        self.plaintext: list[bytes] = []


@pytest_twisted.async_yield_fixture
async def receiver():
    """Start an https receiver for a certificate name; yields (start, dns client)."""
    zone = await start_dns_server(reactor, {HOST: {"A": ["127.0.0.1"]}})
    dns = DnsClient(zone.nameservers, timeout=2, reactor=reactor)
    ports = []
    clients: list[WebhookClient] = []

    def start(cert_name: str):
        hook = _Hook()
        tls = self_signed_tls(cert_name)
        factory = _RecordingFactory(server.Site(hook))
        port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        ports.append(port)
        client = WebhookClient(reactor, dns, timeout=5, production=True, allow_private=True)
        clients.append(client)
        url = f"https://{HOST}:{port.getHost().port}/hook"
        return client, url, hook, factory, ssl.Certificate(tls.certificate)

    yield start
    for client in clients:
        await client.close()
    for port in ports:
        await port.stopListening()
    await zone.stop()


def _trusting(cert: ssl.Certificate):
    """optionsForClientTLS as e2a calls it, but trusting ``cert`` as a root (the control case)."""

    def options(host: str):
        return ssl.optionsForClientTLS(host, trustRoot=cert)

    return options


@pytest_twisted.ensureDeferred
async def test_production_post_refused_when_certificate_self_signed(receiver):
    """A self-signed certificate for the right host name: TLS failure, no 2xx, no request bytes received."""
    client, url, hook, factory, _cert = receiver(HOST)
    result = await client.post(url, BODY, [("Content-Type", "application/json")])
    assert result.status is None
    assert result.error == "TLS error"
    assert client.connects == ["127.0.0.1"]  # it did reach the receiver: the refusal is TLS's
    assert hook.bodies == []
    assert factory.plaintext == []


@pytest_twisted.ensureDeferred
async def test_production_post_refused_when_certificate_names_another_host(receiver, monkeypatch):
    """A trusted certificate for another name fails service-identity: TLS failure, nothing received."""
    client, url, hook, factory, cert = receiver("other.example.test")
    monkeypatch.setattr(webhook, "optionsForClientTLS", _trusting(cert))
    result = await client.post(url, BODY, [("Content-Type", "application/json")])
    assert (result.status, result.error) == (None, "TLS error")
    assert hook.bodies == []
    assert factory.plaintext == []


@pytest.mark.parametrize("attempts", [1, 2])
@pytest_twisted.ensureDeferred
async def test_production_post_delivered_when_certificate_trusted(receiver, monkeypatch, attempts):
    """Control: the same client and receiver deliver once the certificate is trusted, so the
    refusals above come from verification, not from a broken receiver."""
    client, url, hook, factory, cert = receiver(HOST)
    monkeypatch.setattr(webhook, "optionsForClientTLS", _trusting(cert))
    for _ in range(attempts):  # the second POST may reuse the pooled, already-verified connection
        result = await client.post(url, BODY, [("Content-Type", "application/json")])
        assert (result.status, result.error) == (200, "")
    assert hook.bodies == [BODY] * attempts
