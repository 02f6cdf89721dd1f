"""Webhook URL and address policy (mail.md §4.6) as tables: pure, no reactor, no sockets.

Public addresses below are plain string data; nothing here contacts them.
"""

from __future__ import annotations

import pytest

from e2a.errors import BadRequest
from e2a.policy.ssrf import (
    MAX_URL_LENGTH,
    ParsedUrl,
    check_webhook_url,
    is_public_address,
)

# (url, production, allow_private) -> accepted
ACCEPTED = [
    ("https://hooks.example.com/e2a", True, False, "https://hooks.example.com/e2a"),
    ("http://hooks.example.com/e2a", False, False, "http://hooks.example.com/e2a"),
    ("HTTPS://Hooks.Example.COM/Path?Q=1", True, False, "https://hooks.example.com/Path?Q=1"),
    ("https://hooks.example.com./x", True, False, "https://hooks.example.com/x"),
    ("https://hooks.example.com", True, False, "https://hooks.example.com/"),
    ("https://hooks.example.com:8443/x", True, False, "https://hooks.example.com:8443/x"),
    ("https://hooks.example.com:443/x", True, False, "https://hooks.example.com/x"),
    ("https://bücher.example/x", True, False, "https://xn--bcher-kva.example/x"),
    ("https://BÜCHER.example/x", True, False, "https://xn--bcher-kva.example/x"),
    ("https://xn--bcher-kva.example/x", True, False, "https://xn--bcher-kva.example/x"),
    ("https://例え.テスト/", True, False, "https://xn--r8jz45g.xn--zckzah/"),
    ("https://example。com/", True, False, "https://example.com/"),
    ("https://127.0.0.1.nip.example/x", True, False, "https://127.0.0.1.nip.example/x"),
    ("https://a-b.c-d.example/?x=%20y", True, False, "https://a-b.c-d.example/?x=%20y"),
    ("https://example.com/ü", True, False, "https://example.com/%C3%BC"),
    # allow_private: IP literals in every notation and localhost names are allowed
    ("http://127.0.0.1:8080/hook", False, True, "http://127.0.0.1:8080/hook"),
    ("http://127.1/", False, True, "http://127.0.0.1/"),
    ("http://2130706433/", False, True, "http://127.0.0.1/"),
    ("http://0x7f000001/", False, True, "http://127.0.0.1/"),
    ("http://0177.0.0.1/", False, True, "http://127.0.0.1/"),
    ("http://[::1]:9000/", False, True, "http://[::1]:9000/"),
    ("http://localhost:9000/", False, True, "http://localhost:9000/"),
    ("http://sink.localhost/", False, True, "http://sink.localhost/"),
]


@pytest.mark.parametrize(("url", "production", "allow_private", "normalised"), ACCEPTED)
def test_check_webhook_url_accepts_valid(url, production, allow_private, normalised):
    """Valid URLs pass and come back normalised (host lowercase/IDNA, no trailing dot)."""
    parsed = check_webhook_url(url, production=production, allow_private=allow_private)
    assert isinstance(parsed, ParsedUrl)
    assert parsed.url == normalised


LITERALS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7F.1/",
    "http://0177.0.0.1/",
    "http://0177.0.0.01/",
    "http://127.0.0.0x1/",
    "http://0/",
    "http://10.0.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://8.8.8.8/",
    "http://1.2.3.4./",
    "http://１２７.０.０.１/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[2001:4860:4860::8888]/",
    "http://[fe80::1%25eth0]/",
    "http://[fe80::1%eth0]/",
    "http://%31%32%37.0.0.1/",
    "http://foo.123/",
]


@pytest.mark.parametrize("url", LITERALS)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_check_webhook_url_refuses_ip_literals_without_allow_private(url, scheme):
    """IP literals in every notation (and percent-encoded or zone-id hosts) are refused."""
    url = url.replace("http://", f"{scheme}://", 1)
    with pytest.raises(BadRequest) as info:
        check_webhook_url(url, production=False, allow_private=False)
    assert info.value.code == "invalid_webhook_url"
    assert info.value.status == 400


REFUSED = [
    # (url, production, allow_private, fragment of the message)
    ("http://hooks.example.com/", True, False, "https"),
    ("ftp://hooks.example.com/", False, False, "scheme"),
    ("javascript:alert(1)", False, False, "absolute"),
    ("//hooks.example.com/x", False, False, "absolute"),
    ("/relative/path", False, False, "absolute"),
    ("https:hooks.example.com", False, False, "absolute"),
    ("", False, False, "required"),
    ("https:///x", False, False, "host"),
    ("https://user@hooks.example.com/", False, False, "user"),
    ("https://user:pass@hooks.example.com/", False, False, "user"),
    ("https://hooks.example.com@evil.example/", False, False, "user"),
    ("https://@hooks.example.com/", False, False, "user"),
    ("https://user@localhost/", False, True, "user"),
    ("https://hooks.example.com/x#frag", False, False, "fragment"),
    ("https://hooks.example.com/x#", False, False, "fragment"),
    ("https://hooks.example.com/a b", False, False, "whitespace"),
    ("https://hooks.example.com/a\tb", False, False, "whitespace"),
    ("https://hooks.example.com/\n", False, False, "whitespace"),
    (" https://hooks.example.com/", False, False, "whitespace"),
    ("https://hooks.example.com/\x00", False, False, "control"),
    ("https://hooks.example.com/\x7f", False, False, "control"),
    ("https://hooks.exa\u200bmple.com/", False, False, "control"),
    ("https://hooks.example.com/\u00a0", False, False, "whitespace"),
    ("https://hooks.example.com\\@evil.example/", False, False, "backslash"),
    ("https:\\\\hooks.example.com/", False, False, "backslash"),
    ("https://localhost/", False, False, "localhost"),
    ("https://LOCALHOST./", False, False, "localhost"),
    ("https://app.localhost/", False, False, "localhost"),
    ("https://printer.local/", False, False, "internal"),
    ("https://metadata.google.internal/", False, False, "internal"),
    ("https://metadata.google.internal/", False, True, "internal"),
    ("https://1.0.0.127.in-addr.arpa/", False, False, "internal"),
    ("https://home.arpa/", False, False, "internal"),
    ("https://intranet/", False, False, "two labels"),
    ("https://intranet./", False, False, "two labels"),
    ("https://sink/", False, True, "two labels"),
    ("https://example.com../", False, False, "empty label"),
    ("https://.example.com/", False, False, "empty label"),
    ("https://a..example.com/", False, False, "empty label"),
    ("https://under_score.example.com/", False, False, "host name"),
    ("https://-lead.example.com/", False, False, "host name"),
    ("https://xn--zz.example/", False, False, "host name"),
    ("https://" + "a" * 64 + ".example/", False, False, "host name"),
    ("https://" + ".".join(["a" * 60] * 5) + ".example/", False, False, "too long"),
    ("https://hooks.example.com:0/", False, False, "port"),
    ("https://hooks.example.com:65536/", False, False, "port"),
    ("https://hooks.example.com:/", False, False, "port"),
    ("https://hooks.example.com:8x/", False, False, "port"),
    ("https://hooks.example.com:+80/", False, False, "port"),
    ("https://[::1/", False, True, "IPv6"),
    ("https://[not-an-ip]/", False, True, "IPv6"),
    ("https://::1/", False, True, "brackets"),
    ("https://999.1.1.1/", False, True, "IPv4"),
    ("https://1.2.3.4.5/", False, True, "IPv4"),
    ("https://08.0.0.1/", False, True, "IPv4"),
    ("https://hooks.example.com/" + "a" * MAX_URL_LENGTH, False, False, "2048"),
]


@pytest.mark.parametrize(("url", "production", "allow_private", "hint"), REFUSED)
def test_check_webhook_url_refuses_invalid(url, production, allow_private, hint):
    """Each broken URL rule gives 400 invalid_webhook_url with a message naming the rule."""
    with pytest.raises(BadRequest) as info:
        check_webhook_url(url, production=production, allow_private=allow_private)
    assert info.value.code == "invalid_webhook_url"
    assert hint.lower() in info.value.message.lower()


def test_check_webhook_url_accepts_exactly_max_length():
    """A URL of exactly 2048 characters is accepted; one more is refused."""
    base = "https://hooks.example.com/"
    url = base + "a" * (MAX_URL_LENGTH - len(base))
    assert len(url) == MAX_URL_LENGTH
    check_webhook_url(url, production=True, allow_private=False)
    with pytest.raises(BadRequest):
        check_webhook_url(url + "a", production=True, allow_private=False)


def test_check_webhook_url_reports_parts_when_valid():
    """The parsed URL exposes scheme, host, port and request target for the client."""
    parsed = check_webhook_url(
        "https://Hooks.Example.com:8443/in?x=1", production=True, allow_private=False
    )
    assert (parsed.scheme, parsed.host, parsed.port, parsed.target, parsed.ip_literal) == (
        "https", "hooks.example.com", 8443, "/in?x=1", False,
    )


REFUSED_ADDRESSES = [
    # IPv4 table
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254",
    "127.0.0.1", "127.255.255.255", "169.254.0.1", "169.254.169.254", "172.16.0.1",
    "172.31.255.255", "192.0.0.1", "192.0.0.170", "192.0.2.1", "192.88.99.1", "192.168.1.1",
    "198.18.0.1", "198.19.255.255", "198.51.100.7", "203.0.113.9", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6 table
    "::", "::1", "::7f00:1", "::0.0.0.1", "::808:808", "100::1", "100::ffff:ffff:ffff:ffff",
    "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:1ff:ffff::1", "2001:db8::1",
    "2001:db8:ffff::1", "fc00::1", "fd00::1", "fd00:ec2::254", "fe80::1", "febf::1",
    "fec0::1", "feff::1", "ff02::1", "ff05::1:3", "64:ff9b:1::1", "64:ff9b:1:ffff::1",
    # embedded IPv4 that is itself refused
    "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "64:ff9b::7f00:1", "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:101",
    "2002:7f00:1::", "2002:7f00:1::1", "2002:a00:1::", "2002:a9fe:a9fe::1",
    "2002:c0a8:0101::", "2002::1",
    # IPv4-translated ::ffff:0:0:0/96 (SIIT), refused whatever IPv4 address it carries
    "::ffff:0:7f00:1", "::ffff:0:127.0.0.1", "::ffff:0:a00:1", "::ffff:0:a9fe:a9fe",
    "::ffff:0:808:808", "::ffff:0:8.8.8.8", "::ffff:0:0:0", "::ffff:0:ffff:ffff",
    "0:0:0:0:ffff:0:101:101",
    # not an address at all
    "", "localhost", "example.com", "1.2.3", "fe80::1%eth0",
]


@pytest.mark.parametrize("ip", REFUSED_ADDRESSES)
def test_is_public_address_refuses_reserved_ranges(ip):
    """Every refused range of the IPv4/IPv6 tables, incl. embedded IPv4, is not public."""
    assert is_public_address(ip) is False


PUBLIC_ADDRESSES = [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "100.63.255.255", "100.128.0.0", "172.15.255.255",
    "172.32.0.0", "192.0.1.255", "192.88.98.255", "198.17.255.255", "198.20.0.0",
    "223.255.255.255", "169.253.255.255", "11.0.0.0",
    "2001:4860:4860::8888", "2606:4700:4700::1111", "2001:200::1", "2a00:1450:4001::1",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "64:ff9b::8.8.8.8", "2002:808:808::1",
    "2003::1", "fbff::1",
    # just outside the IPv4-translated range
    "0:0:0:1:ffff::808:808",
]


@pytest.mark.parametrize("ip", PUBLIC_ADDRESSES)
def test_is_public_address_accepts_public(ip):
    """Public unicast (and embedded public IPv4) is allowed; boundaries of ranges included."""
    assert is_public_address(ip) is True


# ---- the webhooks.allow_private hint (issue: local webhooks refused without a hint) -------------

PRIVATE_URLS = [
    "http://127.0.0.1:8080/hook",
    "http://[::1]:9000/",
    "http://localhost:9000/",
    "http://sink.localhost/",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_check_webhook_url_hints_allow_private_in_development(url):
    """A loopback webhook refused in development names webhooks.allow_private in the message."""
    with pytest.raises(BadRequest) as info:
        check_webhook_url(url, production=False, allow_private=False)
    assert info.value.code == "invalid_webhook_url"
    assert "webhooks.allow_private" in info.value.message


@pytest.mark.parametrize("url", [u.replace("http://", "https://") for u in PRIVATE_URLS])
def test_check_webhook_url_no_hint_in_production(url):
    """Production refuses the same URLs without mentioning a key it does not allow."""
    with pytest.raises(BadRequest) as info:
        check_webhook_url(url, production=True, allow_private=False)
    assert info.value.code == "invalid_webhook_url"
    assert "allow_private" not in info.value.message


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/", "https://hooks.example.com/#f", "https://h/"])
def test_check_webhook_url_no_hint_for_other_rules(url):
    """Rules that allow_private would not lift carry no hint, even in development."""
    with pytest.raises(BadRequest) as info:
        check_webhook_url(url, production=False, allow_private=False)
    assert "allow_private" not in info.value.message


class _LoopbackDns:
    async def lookup_addresses(self, name: str) -> list[str]:
        return ["127.0.0.1"]


@pytest.mark.parametrize(("production", "hinted"), [(False, True), (True, False)])
def test_validate_webhook_url_hint_for_name_resolving_private(production, hinted):
    """A DNS name resolving to loopback: the hint in development only."""
    from twisted.internet import defer

    from e2a.policy.ssrf import validate_webhook_url

    d = defer.ensureDeferred(
        validate_webhook_url(_LoopbackDns(), "https://sink.example.com/", production=production, allow_private=False)
    )
    failures = []
    d.addErrback(failures.append)
    (failure,) = failures
    err = failure.value
    assert isinstance(err, BadRequest) and err.code == "invalid_webhook_url"
    assert err.message.startswith("blocked address")
    assert ("webhooks.allow_private" in err.message) is hinted
