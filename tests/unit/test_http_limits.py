"""The descriptor budget and the http.* limit keys, as tables (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from e2a.api.limits import DB_EXTRA_CONNECTIONS, FD_MARGIN, MIN_HTTP_CONNECTIONS, HttpLimits, plan_fd_budget
from e2a.config import HttpConfig, load_config
from e2a.errors import ConfigError

DB = 10 + DB_EXTRA_CONNECTIONS

# (limit, in use, smtp.max_connections, http.max_connections, pool) -> HTTP share
BUDGETS = [
    (20000, 20, 1000, 1000, 10, 1000),  # room for everything
    (1024, 20, 500, 1000, 10, 1024 - 20 - 500 - DB - FD_MARGIN),  # HTTP lowered, SMTP kept
    (1024, 20, 500, 300, 10, 300),  # fits as configured
    (-1, 20, 1000, 1000, 10, 1000),  # unlimited
    (20 + 100 + DB + FD_MARGIN + MIN_HTTP_CONNECTIONS, 20, 100, 1000, 10, MIN_HTTP_CONNECTIONS),  # just fits
]


@pytest.mark.parametrize(("limit", "in_use", "smtp", "http", "pool", "expected"), BUDGETS)
def test_plan_fd_budget_shares_http_after_smtp(limit, in_use, smtp, http, pool, expected):
    """HTTP gets what is left after what is open, SMTP's reserve, the database and the margin."""
    budget = plan_fd_budget(limit, in_use, smtp, http, pool)
    assert budget.http == expected and budget.smtp == smtp
    assert budget.http_lowered is (expected < http)


@pytest.mark.parametrize(
    ("limit", "smtp"),
    [(1024, 1000), (256, 100), (20 + 100 + DB + FD_MARGIN + MIN_HTTP_CONNECTIONS - 1, 100)],
)
def test_plan_fd_budget_refuses_when_smtp_share_does_not_fit(limit, smtp):
    """Not enough descriptors for SMTP + database + margin + a minimal HTTP: ConfigError naming all."""
    with pytest.raises(ConfigError) as info:
        plan_fd_budget(limit, 20, smtp, 1000, 10)
    text = str(info.value)
    for part in (str(limit), str(smtp), "smtp.max_connections", "database.pool_size", "RLIMIT_NOFILE"):
        assert part in text


def test_http_limit_keys_default_and_env(tmp_path):
    """The four http.* limit keys have defaults and read E2A_HTTP_* overrides."""
    assert (HttpConfig().max_connections, HttpConfig().max_connections_per_ip) == (1000, 64)
    assert (HttpConfig().header_timeout, HttpConfig().request_timeout) == (20, 120)
    config = load_config(
        environ={
            "E2A_HTTP_MAX_CONNECTIONS": "200", "E2A_HTTP_MAX_CONNECTIONS_PER_IP": "8",
            "E2A_HTTP_HEADER_TIMEOUT": "5", "E2A_HTTP_REQUEST_TIMEOUT": "60",
        },
        cwd=tmp_path,
    )
    assert (config.http.max_connections, config.http.max_connections_per_ip) == (200, 8)
    limits = HttpLimits.from_config(config.http)
    assert (limits.header_timeout, limits.request_timeout) == (5.0, 60.0)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"E2A_HTTP_MAX_CONNECTIONS": "0"}, "http.max_connections: must be a positive integer"),
        ({"E2A_HTTP_MAX_CONNECTIONS_PER_IP": "-1"}, "http.max_connections_per_ip: must be a positive integer"),
        ({"E2A_HTTP_HEADER_TIMEOUT": "0"}, "http.header_timeout: must be a positive integer"),
        ({"E2A_HTTP_REQUEST_TIMEOUT": "x"}, "E2A_HTTP_REQUEST_TIMEOUT: must be an integer"),
        ({"E2A_HTTP_MAX_CONNECTIONS": "10", "E2A_HTTP_MAX_CONNECTIONS_PER_IP": "11"},
         "http.max_connections_per_ip: must not exceed http.max_connections"),
        ({"E2A_HTTP_HEADER_TIMEOUT": "30", "E2A_HTTP_REQUEST_TIMEOUT": "10"},
         "http.request_timeout: must be at least http.header_timeout"),
    ],
)
def test_http_limit_keys_validated(tmp_path, env, problem):
    """Out-of-range or inconsistent http.* limits are configuration errors."""
    with pytest.raises(ConfigError) as info:
        load_config(environ=env, cwd=tmp_path)
    assert problem in str(info.value)


def test_trusted_proxies_exempt_from_per_address_cap():
    """Peers in http.trusted_proxies carry many clients: the per-address cap skips them."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from e2a.api.limits import guard_site

    limits = HttpLimits.from_config(HttpConfig(max_connections=10, max_connections_per_ip=1,
                                               trusted_proxies=("198.51.100.0/24",)))
    guard = guard_site(Site(Resource()), limits, Clock())

    class Addr:
        def __init__(self, host: str) -> None:
            self.host = host

    from e2a.api.limits import _CountedConnection

    assert isinstance(guard.buildProtocol(Addr("198.51.100.3")), _CountedConnection)
    assert isinstance(guard.buildProtocol(Addr("198.51.100.3")), _CountedConnection)
    assert isinstance(guard.buildProtocol(Addr("192.0.2.1")), _CountedConnection)
    assert not isinstance(guard.buildProtocol(Addr("192.0.2.1")), _CountedConnection)
    assert guard.open == 3 and guard.refused_per_ip == 1


def test_raise_nofile_limit_goes_to_hard_limit():
    """The soft RLIMIT_NOFILE is raised to the hard limit (lowered a little first, then restored)."""
    import resource

    from e2a.api.limits import open_fd_count, raise_nofile_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        pytest.skip("unlimited open-file limit")
    lowered = max(open_fd_count() + 64, hard - 1)
    if lowered >= hard:
        pytest.skip("hard limit too close to the descriptors in use")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_nofile_limit() == (lowered, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _guard_with(**http: Any) -> Any:
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from e2a.api.limits import guard_site

    return guard_site(Site(Resource()), HttpLimits.from_config(HttpConfig(**http)), Clock())


class _Addr:
    def __init__(self, host: str) -> None:
        self.host = host


def test_ipv6_peers_share_their_slash64_per_address_cap():
    """An IPv6 client owns a whole /64: 2 connections from 2001:db8::1 and ::2 fill a cap of 2
    (as SMTP's per-IP bucket, mail.md §1.2); another /64 still gets in."""
    from e2a.api.limits import _CountedConnection

    guard = _guard_with(max_connections=100, max_connections_per_ip=2)
    hosts = [f"2001:db8:0:1::{i:x}" for i in range(1, 11)]
    kept = [h for h in hosts if isinstance(guard.buildProtocol(_Addr(h)), _CountedConnection)]
    assert len(kept) == 2 and guard.refused_per_ip == 8
    assert isinstance(guard.buildProtocol(_Addr("2001:db8:0:2::1")), _CountedConnection)


def test_mapped_ipv4_peer_is_its_ipv4_address_for_cap_and_exemption():
    """On a dual-stack listener an IPv4 peer appears as ::ffff:a.b.c.d: same bucket as a.b.c.d,
    and a trusted proxy given as IPv4 stays exempt."""
    from e2a.api.limits import _CountedConnection

    guard = _guard_with(max_connections=100, max_connections_per_ip=1, trusted_proxies=("198.51.100.0/24",))
    assert isinstance(guard.buildProtocol(_Addr("::ffff:198.51.100.3")), _CountedConnection)
    assert isinstance(guard.buildProtocol(_Addr("::ffff:198.51.100.3")), _CountedConnection)
    assert isinstance(guard.buildProtocol(_Addr("192.0.2.1")), _CountedConnection)
    assert not isinstance(guard.buildProtocol(_Addr("::ffff:192.0.2.1")), _CountedConnection)


def test_single_ipv6_trusted_proxy_stays_exempt():
    """A trusted proxy listed as one IPv6 address is exempt although its bucket is its /64."""
    from e2a.api.limits import _CountedConnection

    guard = _guard_with(max_connections=100, max_connections_per_ip=1, trusted_proxies=("2001:db8::5",))
    assert all(isinstance(guard.buildProtocol(_Addr("2001:db8::5")), _CountedConnection) for _ in range(3))
    assert not isinstance(guard.buildProtocol(_Addr("2001:db8::6")), _CountedConnection)
