"""HTTP limits against slow and greedy clients, and the process's file-descriptor budget.

Why this exists: twisted.web's idle timer restarts on every byte, and a listening port accepts
as long as the process has descriptors. A client sending one header byte every few seconds
therefore holds a connection forever, and a thousand of them hold every descriptor of the
process — SMTP, which shares the process, then cannot accept a single client. Three rules
close that:

* :class:`DeadlineChannel` — a *deadline*, not an idle timer: a request's head must be complete
  ``http.header_timeout`` seconds after the connection became ready for it (accepted, or the
  previous response finished), and its body ``http.request_timeout`` seconds after that same
  moment. Bytes arriving do not move the deadline.
* :class:`ConnectionGuard` — at most ``http.max_connections`` open HTTP connections, at most
  ``http.max_connections_per_ip`` from one peer address (an IPv6 peer by its /64; peers in ``http.trusted_proxies`` are
  exempt from the per-address cap: they carry many clients). An upgraded WebSocket keeps its
  slot until it closes, since it keeps its descriptor. Refusals get a short JSON answer and
  the socket is closed at once.
* :func:`plan_fd_budget` — at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit and
  the descriptors are shared out: what is already open, ``smtp.max_connections`` (SMTP's
  reserve, never available to HTTP), the database pool, a margin for outgoing connections and
  files, and what is left bounds ``http.max_connections``. When SMTP's share itself does not
  fit, e2a refuses to start.

All limits are per process: with ``processes: N`` each process applies them to the
connections it accepts from the shared sockets.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel

from e2a.errors import ConfigError
from e2a.smtp.server import connection_key

log = Logger()

#: Descriptors kept for everything that is not an accepted connection or a pool connection:
#: webhook attempts (up to 64 in flight per process) and their idle keep-alive connections (at
#: most e2a.delivery.webhook.MAX_IDLE_CONNECTIONS),
#: outbound SMTP sessions (up to 16), DNS sockets, log files, thread-pool and embedded
#: PostgreSQL pipes.
FD_MARGIN = 128
#: Database connections beyond ``database.pool_size``: the LISTEN connection and a spare for
#: start-up work (migrations, status checks).
DB_EXTRA_CONNECTIONS = 2
#: Fewer HTTP connections than this and the API is not usable: refuse to start instead.
MIN_HTTP_CONNECTIONS = 16
#: Seconds an idle connection closed at its deadline may take to flush before it is reset.
CLOSE_GRACE = 5.0
#: A refusal is logged at most this often (seconds), with the count since the last line.
REFUSAL_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP side's limits, from ``http.*`` (``max_connections`` after the fd budget)."""

    max_connections: int
    max_connections_per_ip: int
    header_timeout: float
    request_timeout: float
    exempt: tuple[Any, ...] = ()  # ip networks exempt from the per-address cap

    @classmethod
    def from_config(cls, http: Any, max_connections: int | None = None) -> HttpLimits:
        return cls(
            max_connections=http.max_connections if max_connections is None else max_connections,
            max_connections_per_ip=http.max_connections_per_ip,
            header_timeout=float(http.header_timeout),
            request_timeout=float(http.request_timeout),
            exempt=tuple(ipaddress.ip_network(p, strict=False) for p in http.trusted_proxies),
        )


# ------------------------------------------------------------------------------ deadline


class DeadlineChannel(HTTPChannel):
    """An HTTPChannel whose requests must arrive whole before a deadline (see module doc).

    ``limits`` and ``clock`` are class attributes set by :func:`guard_site` on a subclass, so
    twisted.web's factory can build the channel with no arguments.
    """

    limits: HttpLimits
    clock: Any

    _deadline: Any = None
    _abort_call: Any = None
    _ready_at: float = 0.0
    _request_bytes = False
    timed_out = False

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        super().connectionMade()
        self._arm_head()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        if data and self._deadline is not None:
            self._request_bytes = True
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:  # noqa: N802 - Twisted API
        super().allHeadersReceived()
        if self._deadline is not None and self.length != 0:
            # The body's deadline counts from the same start as the head's.
            self._cancel()
            remaining = self._ready_at + self.limits.request_timeout - self.clock.seconds()
            self._deadline = self.clock.callLater(max(0.0, remaining), self._expired, "body")

    def allContentReceived(self) -> None:  # noqa: N802 - Twisted API
        self._cancel()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:  # noqa: N802 - Twisted API
        # Armed before the parent hands over pipelined bytes, which may complete (and disarm)
        # the next request at once.
        if self.persistent and self.transport is not None:
            self._arm_head()
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        self._cancel()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        super().connectionLost(reason)

    def _arm_head(self) -> None:
        self._cancel()
        self._ready_at = self.clock.seconds()
        self._request_bytes = False
        self._deadline = self.clock.callLater(self.limits.header_timeout, self._expired, "head")

    def _cancel(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self, part: str) -> None:
        self._deadline = None
        self.timed_out = True
        transport = self.transport
        if transport is None:
            return
        if self._request_bytes or part == "body":
            # A client that dribbles is cut at once; nothing is owed to it.
            log.debug("HTTP request from {peer} not complete in time ({part}); closed",
                     peer=_peer_host(transport), part=part)
            transport.abortConnection()
        else:
            # An idle keep-alive connection: a plain close, made certain after a grace period
            # (a peer that does not read could otherwise keep unsent bytes, and the socket).
            transport.loseConnection()
            self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()


# ---------------------------------------------------------------------- connection caps


class _CountedConnection(ProtocolWrapper):
    """Holds the connection's slot until the socket closes, whatever protocol then owns it
    (autobahn swaps the wrapped protocol on a WebSocket upgrade and the slot stays)."""

    peer = ""
    received = 0  # octets from the client, whoever owns the connection now

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self.received += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        self.factory.release(self)
        super().connectionLost(reason)


class _Refusal(Protocol):
    """Answers a refused connection with one short response and closes it at once."""

    def __init__(self, status: bytes, body: dict[str, Any], retry_after: int) -> None:
        self.status = status
        self.body = json.dumps(body, separators=(",", ":")).encode()
        self.retry_after = retry_after

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.transport.write(
            b"HTTP/1.1 " + self.status + b"\r\nContent-Type: application/json\r\n"
            b"X-Content-Type-Options: nosniff\r\nRetry-After: " + str(self.retry_after).encode() +
            b"\r\nConnection: close\r\nContent-Length: " + str(len(self.body)).encode() + b"\r\n\r\n" + self.body
        )
        self.transport.loseConnection()


class ConnectionGuard(WrappingFactory):
    """The factory actually listening for HTTP: caps connections, then hands on to the Site."""

    protocol = _CountedConnection
    noisy = False

    def __init__(self, site: Any, limits: HttpLimits, clock: Any) -> None:
        super().__init__(site)
        self.limits = limits
        self.clock = clock
        self.open = 0
        self.per_ip: Counter[str] = Counter()
        self.refused_total = 0
        self.refused_per_ip = 0
        self._unlogged = 0
        self._last_log: float | None = None

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted API
        # The bucket of SMTP's per-IP cap (mail.md §1.2): an IPv6 peer is its /64 (one client
        # holds a whole /64, and would otherwise get a fresh cap per address), a mapped IPv4
        # peer of a dual-stack listener is its IPv4 address.
        raw_host = getattr(addr, "host", "") or ""
        host = connection_key(raw_host)
        if self.open >= self.limits.max_connections:
            self.refused_total += 1
            self._note_refusal(f"{self.open} connections open (http.max_connections)")
            return _Refusal(
                b"503 Service Unavailable",
                {"error": {"code": "unavailable", "message": "too many connections; retry later"}},
                5,
            )
        if self.per_ip[host] >= self.limits.max_connections_per_ip and not self._exempt(raw_host):
            self.refused_per_ip += 1
            self._note_refusal(f"{self.per_ip[host]} connections from {host} (http.max_connections_per_ip)")
            return _Refusal(
                b"429 Too Many Requests",
                {"error": {"code": "too_many_connections", "message": "too many connections from this address"}},
                5,
            )
        wrapper = super().buildProtocol(addr)
        wrapper.peer = host
        self.open += 1
        self.per_ip[host] += 1
        return wrapper

    def release(self, wrapper: _CountedConnection) -> None:
        self.open -= 1
        self.per_ip[wrapper.peer] -= 1
        if self.per_ip[wrapper.peer] <= 0:
            del self.per_ip[wrapper.peer]

    def _exempt(self, host: str) -> bool:
        if not self.limits.exempt:
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener's IPv4 peer: as listed, in IPv4
        return any(ip in net for net in self.limits.exempt)

    def _note_refusal(self, why: str) -> None:
        self._unlogged += 1
        now = self.clock.seconds()
        if self._last_log is None or now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warn("HTTP connection refused: {why} ({n} refused since the last such line)",
                     why=why, n=self._unlogged)
            self._unlogged = 0
            self._last_log = now


def guard_site(site: Any, limits: HttpLimits, clock: Any) -> ConnectionGuard:
    """Give ``site`` deadline channels and wrap it in the connection caps; listen on the result.

    ``clock`` (an IReactorTime; tests pass a ``task.Clock``) drives the deadlines and the
    refusal log. Plain HTTP/1.1 channels: e2a's listener has no TLS, so no HTTP/2 either.
    """
    site.protocol = type("E2ADeadlineChannel", (DeadlineChannel,), {"limits": limits, "clock": clock})
    return ConnectionGuard(site, limits, clock)


def _peer_host(transport: Any) -> str:
    try:
        return str(transport.getPeer().host)
    except Exception:
        return "?"


# ----------------------------------------------------------------------- descriptor budget


@dataclass(frozen=True)
class FdBudget:
    """How the process's descriptors are shared out (all counts are descriptors)."""

    limit: int
    in_use: int
    smtp: int
    database: int
    margin: int
    http: int
    http_configured: int

    @property
    def http_lowered(self) -> bool:
        return self.http < self.http_configured

    def describe(self) -> str:
        return (
            f"{self.in_use} descriptors in use at start, "
            f"{self.smtp} smtp.max_connections, {self.database} database (database.pool_size + "
            f"{DB_EXTRA_CONNECTIONS}), {self.margin} margin, {self.http} HTTP connections"
        )


def plan_fd_budget(
    limit: int, in_use: int, smtp_max: int, http_max: int, pool_size: int, margin: int = FD_MARGIN
) -> FdBudget:
    """Share ``limit`` descriptors out; SMTP's share comes before HTTP's (pure).

    Raises:
        ConfigError: SMTP, the database and the margin leave fewer than
            :data:`MIN_HTTP_CONNECTIONS` for HTTP — naming the numbers and the keys to change.
    """
    database = pool_size + DB_EXTRA_CONNECTIONS
    if limit < 0:  # RLIM_INFINITY: nothing to share out
        return FdBudget(limit, in_use, smtp_max, database, margin, http_max, http_max)
    left = limit - in_use - smtp_max - database - margin
    if left < MIN_HTTP_CONNECTIONS:
        raise ConfigError([
            f"open-file limit too low: {limit} (RLIMIT_NOFILE) < {in_use} in use + {smtp_max} "
            f"smtp.max_connections + {database} database (database.pool_size {pool_size} + "
            f"{DB_EXTRA_CONNECTIONS}) + {margin} margin + {MIN_HTTP_CONNECTIONS} HTTP connections; "
            f"raise the limit (e.g. LimitNOFILE= in the systemd unit, ulimit -n) or lower "
            f"smtp.max_connections / database.pool_size"
        ])
    return FdBudget(limit, in_use, smtp_max, database, margin, min(http_max, left), http_max)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (before, after) soft limits
    (-1 = unlimited). A few system calls: cheap enough to run on the reactor at start.

    An unlimited hard limit is not a value the kernel accepts for the soft one, so the soft
    limit then goes to ``/proc/sys/fs/nr_open`` (Linux) or stays. Never fails: a refused raise
    keeps the old figure, which the budget check then judges.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                target = int(f.read().strip())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
    else:
        target = soft
    unlimited = resource.RLIM_INFINITY
    return (-1 if soft == unlimited else soft), (-1 if target == unlimited else target)


def open_fd_count() -> int:
    """Descriptors open in this process now (``/proc/self/fd`` or ``/dev/fd``; 0 if neither)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(path)) - 1)  # minus the one listdir itself opened
        except OSError:
            continue
    return 0


__all__ = [
    "ConnectionGuard",
    "DeadlineChannel",
    "FdBudget",
    "HttpLimits",
    "guard_site",
    "plan_fd_budget",
    "open_fd_count",
    "raise_nofile_limit",
]
