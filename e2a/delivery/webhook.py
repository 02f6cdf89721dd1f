"""One webhook attempt: the signed request (pure) and the pinned HTTP POST (mail.md §4.1–4.3, §4.6).

Building the request is pure (``now`` and the secrets are arguments), so the exact body bytes
and headers are tested against the spec vectors and a Standard Webhooks library.

Sending uses our own :class:`WebhookClient`, not module-level treq: treq's functions share a
global pool on the global reactor, and (measured) treq spends about a quarter of its ~1 ms of
reactor CPU per POST on URL handling (hyperlink/idna) that we already did once in the SSRF
check. A plain ``twisted.web.client.Agent`` given pre-encoded URL bytes is ~35 % cheaper.

SSRF at attempt time: the host is resolved through e2a's :class:`DnsClient`, every address is
checked, and the TCP connection goes to one of the addresses *just* checked — the Agent is built
with an endpoint factory pinned to that IP, so nothing resolves the name a second time (no DNS
rebinding window). For https the pinned TCP endpoint is wrapped in TLS with
``optionsForClientTLS(host)``: SNI and certificate verification (service-identity) still use
the host name.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from OpenSSL import SSL
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer

from e2a import __version__
from e2a.errors import BadRequest
from e2a.logsetup import quiet_pool
from e2a.mailauth.authheaders import AuthFields, auth_headers, format_ts_frac, standard_webhook_signature
from e2a.mailauth.dns import DnsClient, DnsTemporaryError
from e2a.policy.ssrf import BLOCKED_ADDRESS, ParsedUrl, check_webhook_url, resolve_webhook_host

__all__ = [
    "MAX_RESPONSE_BODY",
    "AttemptResult",
    "WebhookClient",
    "WebhookMessage",
    "WebhookRequest",
    "build_body",
    "build_request",
]

log = Logger()

#: The response body is read up to this many bytes and discarded (mail.md §4.3).
MAX_RESPONSE_BODY = 64 * 1024
USER_AGENT = f"e2a/{__version__}"
_MAX_CHECKED_URLS = 4096
_MAX_CONNECTS_KEPT = 1000
#: Idle keep-alive connections kept in all (Twisted's pool bounds them only per host). A tenant
#: with many agents, each on its own receiver host that keeps connections open, would
#: otherwise park up to 4 idle sockets per host for 4 minutes, beyond the descriptor margin
#: the start-up plan keeps (e2a.api.limits.FD_MARGIN) and into SMTP's reserve.
MAX_IDLE_CONNECTIONS = 32


class _BoundedPool(HTTPConnectionPool):
    """An HTTPConnectionPool that caches at most :data:`MAX_IDLE_CONNECTIONS` idle connections
    in all: a connection returned beyond that is closed instead of cached."""

    max_idle = MAX_IDLE_CONNECTIONS

    def _putConnection(self, key: Any, connection: Any) -> None:  # noqa: N802 - Twisted API
        full = len(self._connections.get(key, ())) >= self.maxPersistentPerHost  # the pool swaps one
        if not full and len(self._timeouts) >= self.max_idle:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


# ------------------------------------------------------------------------------ request (pure)


@dataclass(frozen=True)
class WebhookMessage:
    """What a webhook needs of a stored inbound message (identical on every attempt)."""

    message_id: str
    conversation_id: str
    display_from: str
    to: list[str] | None
    cc: list[str] | None
    recipient: str
    raw: bytes
    auth_headers: Mapping[str, str]  # as signed at receipt
    received_at: datetime


@dataclass(frozen=True)
class WebhookRequest:
    body: bytes
    headers: list[tuple[str, str]]
    signed_at: datetime

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def build_body(message: WebhookMessage, signed: Mapping[str, str], delivery_id: str, attempt: int) -> bytes:
    """The §4.1 body: compact JSON, fields in the spec's order, UTF-8."""
    body: dict[str, Any] = {"message_id": message.message_id}
    if message.conversation_id:
        body["conversation_id"] = message.conversation_id
    body["from"] = message.display_from
    body["to"] = list(message.to) if message.to is not None else None
    if message.cc:
        body["cc"] = list(message.cc)
    body["recipient"] = message.recipient
    body["raw_message"] = base64.b64encode(message.raw).decode("ascii")
    body["auth_headers"] = dict(signed)  # auth_headers() already sorts keys by byte order
    body["received_at"] = format_ts_frac(message.received_at)
    body["delivery_id"] = delivery_id
    body["attempt"] = attempt
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def build_request(
    message: WebhookMessage,
    *,
    delivery_id: str,
    attempt: int,
    secrets: Sequence[str],
    now: datetime,
) -> WebhookRequest:
    """Sign one attempt (mail.md §3.3, §4.1, §4.2).

    The ``X-E2A-Auth-*`` set is re-signed with a fresh timestamp (same message id and body
    hash) by the newest secret; ``webhook-signature`` carries one ``v1,`` entry per secret in
    the order given (newest first). ``X-E2A-Auth-Timestamp`` and ``webhook-timestamp`` name the
    same second.

    Raises:
        ValueError: no secret, or the stored header set is incomplete.
    """
    if not secrets:
        raise ValueError("at least one signing secret is required")
    fields = AuthFields.from_headers(message.auth_headers).at(now)
    signed = auth_headers(fields, secrets[0])
    body = build_body(message, signed, delivery_id, attempt)
    timestamp = int(now.timestamp())  # truncation: the same second as format_ts_sec(now)
    headers = [
        ("Content-Type", "application/json"),
        ("User-Agent", USER_AGENT),
        ("webhook-id", message.message_id),
        ("webhook-timestamp", str(timestamp)),
        ("webhook-signature", standard_webhook_signature(message.message_id, timestamp, body, secrets)),
        *signed.items(),
    ]
    return WebhookRequest(body=body, headers=headers, signed_at=now)


# ------------------------------------------------------------------------------ HTTP sender


@dataclass(frozen=True)
class AttemptResult:
    """What one POST produced. ``status`` is None when no response arrived; ``error`` is the
    ``last_error`` text (never response content) or ``""``."""

    status: int | None
    error: str = ""
    retry_after: str | None = None


@implementer(IBodyProducer)
class _BytesProducer:
    """The whole body in one write, with ``Content-Length`` (FileBodyProducer would schedule
    its reads on the global cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:  # noqa: N802 - Twisted API
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted API
        pass

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted API
        pass

    def stopProducing(self) -> None:  # noqa: N802 - Twisted API
        pass


@implementer(IAgentEndpointFactory)
class _PinnedEndpointFactory:
    """Connects to one already-checked IP whatever the URI's host; TLS uses the host name."""

    def __init__(self, reactor: Any, address: str, host: str, timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._host = host
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted API
        ip = ipaddress.ip_address(self._address)
        endpoint_class = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        endpoint = endpoint_class(self._reactor, self._address, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(optionsForClientTLS(self._host), endpoint)
        return endpoint


class _DiscardBody(Protocol):
    """Reads up to ``limit`` bytes of a response body, then drops the connection."""

    def __init__(self, limit: int, done: defer.Deferred[None]) -> None:
        self._remaining = limit
        self._done = done

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self._remaining -= len(data)
        if self._remaining <= 0 and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if not self._done.called:
            self._done.callback(None)


class _Timeout(Exception):
    pass


def _is_tls_error(value: object) -> bool:
    """True for a handshake/verification failure.

    pyOpenSSL's error class is plainly named ``Error`` (a failed chain check arrives as
    ``OpenSSL.SSL.Error: certificate verify failed``), so it is matched by type; the name test
    covers service-identity's ``VerificationError`` and Twisted's TLS wrappers.
    """
    if isinstance(value, SSL.Error):
        return True
    name = type(value).__name__
    return "SSL" in name or "TLS" in name or "Verification" in name


def _describe_failure(failure: Failure) -> str:
    """A short ``last_error`` for a transport failure (never includes peer-supplied text)."""
    if failure.check(_Timeout, defer.CancelledError, defer.TimeoutError, ConnectingCancelledError):
        return "timeout"
    if failure.check(ResponseNeverReceived):
        reasons = getattr(failure.value, "reasons", None) or []
        for reason in reasons:
            if isinstance(reason, Failure) and reason.check(defer.CancelledError):
                return "timeout"
            if _is_tls_error(reason.value if isinstance(reason, Failure) else reason):
                return "TLS error"
        return "connection closed before a response"
    if failure.check(DNSLookupError):
        return "DNS failure"
    if failure.check(ConnectError):
        return f"connection failed: {type(failure.value).__name__}"
    if _is_tls_error(failure.value):
        return "TLS error"
    return f"request failed: {type(failure.value).__name__}"


class WebhookClient:
    """e2a's webhook HTTP client: its own pool on the injected reactor, closed by :meth:`close`.

    Args:
        reactor: connects and runs the pool.
        dns: resolves webhook hosts (the only resolver e2a uses).
        timeout: seconds for connect + TLS + request + response headers (``webhooks.timeout``);
            the body read gets the same again.
        production: https only.
        allow_private: development only — skip the address rules (loopback sinks).
        clock: times the timeouts (defaults to ``reactor``; tests pass a ``task.Clock``).
    """

    def __init__(
        self,
        reactor: Any,
        dns: DnsClient,
        *,
        timeout: float,
        production: bool,
        allow_private: bool,
        clock: Any = None,
        max_per_host: int = 4,
    ) -> None:
        self._reactor = reactor
        self._clock = clock or reactor
        self._dns = dns
        self._timeout = float(timeout)
        self._production = production
        self._allow_private = allow_private
        self._pool = quiet_pool(_BoundedPool(reactor, persistent=True))
        self._pool.maxPersistentPerHost = max(1, max_per_host)
        self._pool.retryAutomatically = False  # a POST is not idempotent: the queue retries
        self.connects: list[str] = []  # addresses dialled, the most recent ones (observability, tests)
        # check_webhook_url is pure and the same agent URL comes back on every attempt: keep
        # the accepted results (bounded; a refused URL is re-checked, and raises, every time).
        self._checked: dict[str, ParsedUrl] = {}

    async def close(self) -> None:
        """Close idle pooled connections (the service calls this on stop)."""
        await self._pool.closeCachedConnections()

    async def post(self, url: str, body: bytes, headers: Sequence[tuple[str, str]]) -> AttemptResult:
        """POST ``body`` to ``url`` after the SSRF checks; never raises for network outcomes."""
        parsed = self._checked.get(url)
        if parsed is None:
            try:
                parsed = check_webhook_url(url, production=self._production, allow_private=self._allow_private)
            except BadRequest:
                return AttemptResult(None, "invalid webhook URL")
            if len(self._checked) >= _MAX_CHECKED_URLS:
                self._checked.clear()
            self._checked[url] = parsed
        try:
            addresses = await resolve_webhook_host(self._dns, parsed.host, allow_private=self._allow_private)
        except BadRequest as exc:
            if isinstance(exc.__cause__, DnsTemporaryError):
                return AttemptResult(None, "DNS failure")
            if BLOCKED_ADDRESS in exc.message:
                return AttemptResult(None, BLOCKED_ADDRESS)
            return AttemptResult(None, "DNS failure: host does not resolve")
        except DnsTemporaryError:
            return AttemptResult(None, "DNS failure")
        address = addresses[0]
        if len(self.connects) >= _MAX_CONNECTS_KEPT:
            del self.connects[: _MAX_CONNECTS_KEPT // 2]  # bounded: a long-running process must not grow
        self.connects.append(address)
        agent = Agent.usingEndpointFactory(
            self._reactor,
            _PinnedEndpointFactory(self._reactor, address, parsed.host, self._timeout),
            pool=self._pool,
        )
        h = Headers()
        for name, value in headers:
            h.addRawHeader(name.encode("ascii"), value.encode("utf-8"))
        return await self._request(agent, parsed.url.encode("ascii"), h, body)

    async def _request(self, agent: Agent, url: bytes, headers: Headers, body: bytes) -> AttemptResult:
        request = agent.request(b"POST", url, headers, _BytesProducer(body))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            request.cancel()

        timer = self._clock.callLater(self._timeout, expire)
        try:
            response = await request
        except Exception:
            failure = Failure()
            if timed_out:
                return AttemptResult(None, "timeout")
            return AttemptResult(None, _describe_failure(failure))
        finally:
            if timer.active():
                timer.cancel()
        status = int(response.code)
        retry_after_values = response.headers.getRawHeaders(b"retry-after")
        retry_after = (
            retry_after_values[0].decode("latin-1") if retry_after_values else None
        )
        await self._discard_body(response)
        error = "" if 200 <= status <= 299 else f"HTTP {status}"
        if 300 <= status <= 399:
            error += " (redirect not followed)"
        return AttemptResult(status, error, retry_after)

    async def _discard_body(self, response: Any) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        reader = _DiscardBody(MAX_RESPONSE_BODY, done)
        response.deliverBody(reader)

        def expire() -> None:
            if reader.transport is not None:
                reader.transport.stopProducing()
            if not done.called:
                done.callback(None)

        timer = self._clock.callLater(self._timeout, expire)
        try:
            await done
        finally:
            if timer.active():
                timer.cancel()
