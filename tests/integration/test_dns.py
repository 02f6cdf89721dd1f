"""DnsClient and the webhook address rules against a loopback twisted.names zone.

Every query goes to the test server on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import dkim
import pytest
import pytest_twisted
import spf

from twisted.internet import reactor, threads

from e2a.errors import BadRequest
from e2a.mailauth.dns import (
    DkimDnsRecorder,
    DkimDnsTemporaryError,
    DnsClient,
    DnsTemporaryError,
    install_spf_lookup,
    restore_spf_lookup,
)
from e2a.policy.ssrf import resolve_webhook_host, validate_webhook_url
from tests.support.dnsserver import start_dns_server

LONG_KEY = "v=DKIM1; k=rsa; p=" + "A" * 600  # > 255 bytes: served as several strings

ZONE = {
    "example.com": {
        "TXT": ["v=spf1 ip4:127.0.0.1 -all", ("first-", "second-", "third")],
        "MX": [(20, "mx2.example.com."), (10, "MX1.example.com")],
        "A": ["127.0.0.1"],
        "AAAA": ["::1"],
    },
    "sel._domainkey.example.com": {"TXT": [LONG_KEY]},
    "two._domainkey.example.com": {"TXT": ["unrelated", "v=DKIM1; p=abc"]},
    "alias.example.com": {"CNAME": "example.com"},
    "nodata.example.com": {"MX": [(10, "mx.example.com")]},
    "broken.example.com": "SERVFAIL",
    "refused.example.com": "REFUSED",
    "slow.example.com": "TIMEOUT",
    "half.example.com": {"A": ["203.0.113.0"], "AAAA": "SERVFAIL"},
    # webhook hosts (addresses are string data served by the local zone only)
    "public.hooks.test": {"A": ["8.8.8.8"], "AAAA": ["2001:4860:4860::8888"]},
    "loop.hooks.test": {"A": ["127.0.0.1"]},
    "loop6.hooks.test": {"AAAA": ["::1"]},
    "private.hooks.test": {"A": ["10.1.2.3"]},
    "linklocal.hooks.test": {"A": ["169.254.10.10"]},
    "metadata.hooks.test": {"A": ["169.254.169.254"]},
    "metadata6.hooks.test": {"AAAA": ["fd00:ec2::254"]},
    "cgnat.hooks.test": {"A": ["100.64.1.1"]},
    "mapped.hooks.test": {"AAAA": ["::ffff:127.0.0.1"]},
    "mixed.hooks.test": {"A": ["8.8.8.8", "192.168.0.1"]},  # private address: must be blocked
    "mixed6.hooks.test": {"A": ["8.8.8.8"], "AAAA": ["fe80::1"]},
    "empty.hooks.test": {"TXT": ["no addresses here"]},
}


async def _server(records=None):
    return await start_dns_server(reactor, ZONE if records is None else records)


def _client(handle, timeout=2.0, **kwargs):
    return DnsClient(handle.nameservers, timeout=timeout, reactor=reactor, **kwargs)


@pytest_twisted.ensureDeferred
async def test_lookup_txt_concatenates_strings_of_each_record():
    """TXT records come back one string per record, multi-string records joined."""
    handle = await _server()
    try:
        client = _client(handle)
        assert sorted(await client.lookup_txt("example.com")) == sorted(
            ["v=spf1 ip4:127.0.0.1 -all", "first-second-third"]
        )
        assert await client.lookup_txt("sel._domainkey.example.com") == [LONG_KEY]
        assert await client.lookup_txt("EXAMPLE.com.") != []
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_lookup_mx_and_addresses_return_sorted_normalised_values():
    """MX sorted by preference without trailing dot; A then AAAA addresses."""
    handle = await _server()
    try:
        client = _client(handle)
        assert await client.lookup_mx("example.com") == [
            (10, "mx1.example.com"), (20, "mx2.example.com"),
        ]
        assert await client.lookup_addresses("example.com") == ["127.0.0.1", "::1"]
        assert await client.lookup_addresses("alias.example.com") == ["127.0.0.1", "::1"]
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_lookups_return_empty_when_nxdomain_or_no_data():
    """NXDOMAIN and NOERROR-without-data are not errors: they give []."""
    handle = await _server()
    try:
        client = _client(handle)
        assert await client.lookup_txt("missing.example.com") == []
        assert await client.lookup_addresses("missing.example.com") == []
        assert await client.lookup_mx("missing.example.com") == []
        assert await client.lookup_txt("nodata.example.com") == []
        assert await client.lookup_addresses("nodata.example.com") == []
    finally:
        await handle.stop()


@pytest.mark.parametrize("name", ["broken.example.com", "refused.example.com"])
@pytest_twisted.ensureDeferred
async def test_lookups_raise_temporary_error_when_server_fails(name):
    """SERVFAIL and REFUSED raise DnsTemporaryError (retry later), not an empty answer."""
    handle = await _server()
    try:
        client = _client(handle)
        for lookup in (client.lookup_txt, client.lookup_mx, client.lookup_addresses):
            with pytest.raises(DnsTemporaryError):
                await lookup(name)
        with pytest.raises(DnsTemporaryError):
            await client.lookup_addresses("half.example.com")
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_lookups_raise_temporary_error_when_server_never_answers():
    """A server that never answers gives DnsTemporaryError after dns.timeout."""
    handle = await _server()
    try:
        client = _client(handle, timeout=0.3)
        with pytest.raises(DnsTemporaryError):
            await client.lookup_txt("slow.example.com")
        with pytest.raises(DnsTemporaryError):
            await threads.deferToThread(client.thd_txt, "slow.example.com")
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_changed_records_are_seen_by_async_lookups():
    """set()/add()/remove() change the zone during a test."""
    handle = await _server({"x.example.com": {"TXT": ["one"]}})
    try:
        client = _client(handle)
        assert await client.lookup_txt("x.example.com") == ["one"]
        handle.add("x.example.com", "TXT", "two")
        assert sorted(await client.lookup_txt("x.example.com")) == ["one", "two"]
        handle.remove("x.example.com")
        assert await client.lookup_txt("x.example.com") == []
        handle.set({"x.example.com": "SERVFAIL"})
        with pytest.raises(DnsTemporaryError):
            await client.lookup_txt("x.example.com")
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_lookups_answer_in_threads():
    """The blocking thd_* API gives the same data as the async one, from a thread."""
    handle = await _server()
    try:
        client = _client(handle)
        txt = await threads.deferToThread(client.thd_txt, "example.com")
        assert sorted(txt) == sorted([b"v=spf1 ip4:127.0.0.1 -all", b"first-second-third"])
        assert await threads.deferToThread(client.thd_txt, "missing.example.com") == []
        assert await threads.deferToThread(client.thd_addresses, "alias.example.com") == [
            "127.0.0.1", "::1",
        ]
        assert await threads.deferToThread(client.thd_mx, "example.com") == [
            (10, "mx1.example.com"), (20, "mx2.example.com"),
        ]
        with pytest.raises(DnsTemporaryError):
            await threads.deferToThread(client.thd_txt, "broken.example.com")
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_lookups_cache_answers_within_ttl():
    """Repeated blocking lookups are answered from the TTL cache, not the server."""
    handle = await _server()
    try:
        client = _client(handle)
        for _ in range(3):
            await threads.deferToThread(client.thd_txt, "example.com")
        assert handle.queries.count(("example.com", "TXT")) == 1
        client.flush_cache()
        await threads.deferToThread(client.thd_txt, "example.com")
        assert handle.queries.count(("example.com", "TXT")) == 2
        uncached = _client(handle, cache_size=0)
        for _ in range(2):
            await threads.deferToThread(uncached.thd_txt, "example.com")
        assert handle.queries.count(("example.com", "TXT")) == 4
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_front_cache_honours_expiry_and_bound():
    """The dict in front of dnspython answers until the answer's own expiry, then asks
    dnspython again; it never holds more than cache_size entries; flush_cache empties it."""
    handle = await _server()
    try:
        now = [1_000.0]
        client = _client(handle, cache_size=2, wall_clock=lambda: now[0])
        resolved: list[str] = []
        real_resolve = client._blocking.resolve

        def counting_resolve(qname, rdtype, **kwargs):
            resolved.append(f"{qname} {rdtype}")
            answer = real_resolve(qname, rdtype, **kwargs)
            answer.expiration = now[0] + 60  # the fake clock's view of the 60 s TTL
            return answer

        client._blocking.resolve = counting_resolve
        first = await threads.deferToThread(client.thd_txt, "example.com")
        again = await threads.deferToThread(client.thd_txt, "example.com")
        assert first == again and resolved == ["example.com TXT"]
        now[0] += 59.9
        await threads.deferToThread(client.thd_txt, "example.com")
        assert len(resolved) == 1
        now[0] += 0.2  # past the answer's expiry: dnspython is asked again
        assert await threads.deferToThread(client.thd_txt, "example.com") == first
        assert len(resolved) == 2
        for name in ("public.hooks.test", "loop.hooks.test", "private.hooks.test"):
            await threads.deferToThread(client.thd_addresses, name)
        assert len(client._front) == 2  # the oldest entries went first
        client.flush_cache()
        assert client._front == {}
        await threads.deferToThread(client.thd_txt, "example.com")
        assert resolved[-1] == "example.com TXT"
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_front_cache_keeps_no_negative_or_failed_answers():
    """NXDOMAIN, empty answers and SERVFAIL are never served from the front dict."""
    handle = await _server()
    try:
        client = _client(handle)
        assert await threads.deferToThread(client.thd_txt, "missing.example.com") == []
        with pytest.raises(DnsTemporaryError):
            await threads.deferToThread(client.thd_txt, "broken.example.com")
        assert await threads.deferToThread(client.thd_mx, "empty.hooks.test") == []
        assert client._front == {}
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_dkim_dnsfunc_follows_dkimpy_contract():
    """Key record as bytes (long keys joined), None when absent, DnsTimeoutError on SERVFAIL."""
    handle = await _server()
    try:
        client = _client(handle)
        key = await threads.deferToThread(
            client.thd_dkim_dnsfunc, b"sel._domainkey.example.com.", timeout=5
        )
        assert key == LONG_KEY.encode()
        two = await threads.deferToThread(client.thd_dkim_dnsfunc, b"two._domainkey.example.com.")
        assert two == b"v=DKIM1; p=abc"
        assert await threads.deferToThread(
            client.thd_dkim_dnsfunc, b"none._domainkey.example.com."
        ) is None
        with pytest.raises(dkim.DnsTimeoutError):
            await threads.deferToThread(client.thd_dkim_dnsfunc, b"broken.example.com.")
        recorder = DkimDnsRecorder(client)
        with pytest.raises(DkimDnsTemporaryError):
            await threads.deferToThread(recorder, b"broken.example.com.")
        assert recorder.temporary_failures == [b"broken.example.com."]
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_thd_spf_lookup_returns_pyspf_format():
    """thd_spf_lookup returns ((name, qtype), value) tuples and raises spf.TempError."""
    handle = await _server()
    try:
        client = _client(handle)
        txt = await threads.deferToThread(client.thd_spf_lookup, "example.com", "TXT", True, 20)
        assert sorted(v for _k, v in txt) == sorted(
            [(b"v=spf1 ip4:127.0.0.1 -all",), (b"first-", b"second-", b"third")]
        )
        assert all(k == ("example.com", "TXT") for k, _v in txt)
        mx = await threads.deferToThread(client.thd_spf_lookup, "example.com", "MX")
        assert sorted(v for _k, v in mx) == [(10, "MX1.example.com"), (20, "mx2.example.com")]
        a = await threads.deferToThread(client.thd_spf_lookup, "example.com", "A")
        assert a == [(("example.com", "A"), "127.0.0.1")]
        assert await threads.deferToThread(client.thd_spf_lookup, "missing.example.com", "A") == []
        with pytest.raises(spf.TempError):
            await threads.deferToThread(client.thd_spf_lookup, "broken.example.com", "TXT")
    finally:
        await handle.stop()


def _spf_check(ip, sender, helo):
    return spf.check2(i=ip, s=sender, h=helo)


@pytest_twisted.ensureDeferred
async def test_install_spf_lookup_routes_pyspf_through_client():
    """After install_spf_lookup pyspf asks only the configured server; restore undoes it."""
    handle = await _server({
        "example.com": {"TXT": ["v=spf1 a mx -all"], "A": ["127.0.0.2"],
                        "MX": [(10, "mx.example.com")]},
        "mx.example.com": {"A": ["127.0.0.3"]},
        "tempfail.example.com": "SERVFAIL",
    })
    client = _client(handle)
    previous = install_spf_lookup(client)
    try:
        assert (await threads.deferToThread(
            _spf_check, "127.0.0.3", "a@example.com", "h.example.com"))[0] == "pass"
        assert (await threads.deferToThread(
            _spf_check, "127.0.0.9", "a@example.com", "h.example.com"))[0] == "fail"
        assert (await threads.deferToThread(
            _spf_check, "127.0.0.9", "a@tempfail.example.com", "h.example.com"))[0] == "temperror"
    finally:
        restore_spf_lookup(previous)
        await handle.stop()
    assert spf.DNSLookup is previous


@pytest.mark.parametrize(
    "host",
    [
        "loop.hooks.test",
        "loop6.hooks.test",
        "private.hooks.test",
        "linklocal.hooks.test",
        "metadata.hooks.test",
        "metadata6.hooks.test",
        "cgnat.hooks.test",
        "mapped.hooks.test",
        "mixed.hooks.test",
        "mixed6.hooks.test",
    ],
)
@pytest_twisted.ensureDeferred
async def test_resolve_webhook_host_refuses_when_any_address_blocked(host):
    """Names resolving to loopback/private/link-local/CGNAT/metadata (even one of several) are refused."""
    handle = await _server()
    try:
        client = _client(handle)
        with pytest.raises(BadRequest) as info:
            await resolve_webhook_host(client, host, allow_private=False)
        assert info.value.code == "invalid_webhook_url"
        assert info.value.message.startswith("blocked address")
        # development switch: address rules skipped, addresses still returned for pinning
        assert await resolve_webhook_host(client, host, allow_private=True)
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_resolve_webhook_host_returns_checked_addresses_when_public():
    """A public name gives every checked address (for connection pinning)."""
    handle = await _server()
    try:
        client = _client(handle)
        assert await resolve_webhook_host(client, "public.hooks.test", allow_private=False) == [
            "8.8.8.8", "2001:4860:4860::8888",
        ]
        parsed = await validate_webhook_url(
            client, "https://Public.Hooks.Test./in", production=True, allow_private=False
        )
        assert parsed.host == "public.hooks.test"
        assert parsed.addresses == ("8.8.8.8", "2001:4860:4860::8888")
    finally:
        await handle.stop()


@pytest.mark.parametrize(
    "host", ["missing.hooks.test", "empty.hooks.test", "broken.example.com", "half.example.com"]
)
@pytest_twisted.ensureDeferred
async def test_resolve_webhook_host_refuses_when_resolution_fails(host):
    """Resolution must succeed: NXDOMAIN, no addresses or a DNS failure refuse the URL."""
    handle = await _server()
    try:
        client = _client(handle)
        with pytest.raises(BadRequest) as info:
            await resolve_webhook_host(client, host, allow_private=False)
        assert info.value.code == "invalid_webhook_url"
    finally:
        await handle.stop()


@pytest_twisted.ensureDeferred
async def test_validate_webhook_url_allows_loopback_sink_when_allow_private():
    """allow_private lets local sinks through: IP literals and localhost, no DNS asked."""
    handle = await _server()
    try:
        client = _client(handle)
        parsed = await validate_webhook_url(
            client, "http://127.0.0.1:8080/hook", production=False, allow_private=True
        )
        assert parsed.addresses == ("127.0.0.1",)
        parsed = await validate_webhook_url(
            client, "http://localhost:8080/hook", production=False, allow_private=True
        )
        assert parsed.addresses == ("127.0.0.1", "::1")
        assert handle.queries == []
        with pytest.raises(BadRequest):
            await validate_webhook_url(
                client, "https://loop.hooks.test/", production=True, allow_private=False
            )
    finally:
        await handle.stop()
