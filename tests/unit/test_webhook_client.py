"""WebhookClient glue on a MemoryReactor: pinned connections, https only in production, SSRF outcomes."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from e2a.delivery.webhook import WebhookClient
from e2a.mailauth.dns import DnsTemporaryError


class FakeDns:
    def __init__(self, answers: dict[str, list[str]] | None = None, fail: bool = False) -> None:
        self.answers = answers or {}
        self.fail = fail
        self.asked: list[str] = []

    async def lookup_addresses(self, name: str) -> list[str]:
        self.asked.append(name)
        if self.fail:
            raise DnsTemporaryError("boom")
        return self.answers.get(name, [])


def _client(dns, *, production=True, allow_private=False):
    reactor = MemoryReactorClock()
    client = WebhookClient(reactor, dns, timeout=10, production=production, allow_private=allow_private)
    return reactor, client


def _post(client, url):
    return defer.Deferred.fromCoroutine(client.post(url, b"{}", [("Content-Type", "application/json")]))


def test_post_connects_to_the_checked_address_only():
    """The TCP connection goes to the resolved, checked IP on the URL's port; the name is resolved once."""
    dns = FakeDns({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    reactor, client = _client(dns)
    d = _post(client, "https://hooks.example.com/in")
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("93.184.216.34", 443)]
    assert dns.asked == ["hooks.example.com"]
    reactor.advance(10)  # nobody answers: the attempt times out on the injected clock
    result = d.result
    assert (result.status, result.error) == (None, "timeout")


def test_post_refuses_private_resolution_without_connecting():
    """Any non-public address in the answer: 'blocked address' and no connection."""
    dns = FakeDns({"hooks.example.com": ["93.184.216.34", "10.0.0.5"]})  # private: blocked, never dialled
    reactor, client = _client(dns)
    d = _post(client, "https://hooks.example.com/in")
    assert d.result.error == "blocked address" and d.result.status is None
    assert reactor.tcpClients == []


def test_post_http_in_production_is_refused():
    """Production is https only: an http URL never resolves nor connects."""
    dns = FakeDns({"hooks.example.com": ["93.184.216.34"]})
    reactor, client = _client(dns)
    d = _post(client, "http://hooks.example.com/in")
    assert d.result.error == "invalid webhook URL"
    assert dns.asked == [] and reactor.tcpClients == []


def test_post_dns_failure_is_a_retryable_error():
    """A temporary DNS failure fails the attempt with 'DNS failure'."""
    reactor, client = _client(FakeDns(fail=True))
    d = _post(client, "https://hooks.example.com/in")
    assert d.result.error == "DNS failure"
    assert reactor.tcpClients == []


def test_post_ip_literal_blocked_unless_allow_private():
    """IP literals are refused by the URL rules; allow_private lets a loopback sink through."""
    reactor, client = _client(FakeDns(), production=False)
    assert _post(client, "http://127.0.0.1:8080/in").result.error == "invalid webhook URL"
    reactor, client = _client(FakeDns(), production=False, allow_private=True)
    _post(client, "http://127.0.0.1:8080/in")
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("127.0.0.1", 8080)]
