"""SMTP out: the upstream relay or direct MX delivery, one transaction per message (mail.md §7.6, §7.7).

Why our own client protocol: twisted.mail's ``SMTPClient`` sends the body through
``transformChunk``, which rewrites ``\\n`` to ``\\r\\n`` (so CRLF input turns into ``\\r\\r\\n``,
a bare CR on the wire) and dot-stuffs each 16 KiB chunk on its own, so a ``.`` line that
straddles a chunk boundary goes out unstuffed and ends DATA early — an agent-written body could
then smuggle SMTP commands from e2a's IP address. We keep twisted.mail's reply parser
(:class:`twisted.mail.smtp.SMTPClient` ``lineReceived``: multi-line replies, code checks) and its
address quoting, but drive the session ourselves as one linear coroutine and send DATA as the
exact bytes of :func:`e2a.outbound.compose.smtp_data_bytes` (normalised and stuffed once, over the
whole message).

Everything that is a rule is a small pure function at the top of this module (provider id
parsing, reply → recipient status, retry/deadline math, MX ordering) and table-tested without a
reactor. Timeouts run on the injected clock: connect 30 s, greeting and each command 300 s,
final dot 600 s.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any, Literal

from OpenSSL import SSL
from zope.interface import implementer

from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure

from e2a.config import Config, OutboundConfig, OutboundSmtpConfig
from e2a.delivery import backoff
from e2a.delivery.ssrf import is_public_address
from e2a.logsetup import quiet_connect
from e2a.mailauth.dns import DnsTemporaryError
from e2a.outbound.compose import smtp_data_bytes

__all__ = [
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DATA_TIMEOUT",
    "RecipientOutcome",
    "Relay",
    "RouteConfig",
    "SmtpReply",
    "deliver",
    "next_attempt_at",
    "order_mx",
    "parse_provider_message_id",
    "status_for_code",
]

log = Logger()

CONNECT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 300.0
DATA_TIMEOUT = 600.0
QUIT_TIMEOUT = 10.0  # QUIT's answer changes nothing; do not hold the outcome for it
MAX_REPLY_CHARS = 512
#: Caps on what a hostile or broken server can make us hold in memory (twisted.mail collects a
#: multi-line reply's lines without limit): lines and bytes of one reply, and complete replies
#: nobody asked for yet (we never pipeline, so more than the greeting plus a stray one is a
#: misbehaving server). Exceeding any of them drops the connection.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
MAX_UNSOLICITED_REPLIES = 4

RecipientStatus = Literal["sent", "deferred", "failed"]


# ---------------------------------------------------------------------------------- pure rules


@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str  # the reply's lines after "NNN-"/"NNN ", joined by "\n"

    def line(self) -> str:
        """One line for ``last_reply``: ``"<code> <text>"``, multi-line text joined by spaces."""
        text = " ".join(part.strip() for part in self.text.splitlines() if part.strip())
        return _clip(f"{self.code} {text}".strip())


@dataclass(frozen=True)
class RecipientOutcome:
    """What one attempt did for one recipient. ``reply`` is the ``last_reply`` line."""

    status: RecipientStatus
    reply: str
    provider_message_id: str = ""
    #: The message data was (at least partly) written but no final reply was read: the far
    #: end may have the message, so a retry can be a duplicate.
    in_doubt: bool = False


def _clip(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= MAX_REPLY_CHARS else text[: MAX_REPLY_CHARS - 3] + "..."


def status_for_code(code: int) -> RecipientStatus | None:
    """mail.md §7.7: 2xx → sent (after the final dot; an accepted step otherwise), 4xx →
    deferred, 5xx → failed. Anything else (1xx, 3xx where not expected, garbage) is a protocol
    error and treated like a temporary failure; ``None`` means "2xx: go on"."""
    if 200 <= code <= 299:
        return None
    if 500 <= code <= 599:
        return "failed"
    return "deferred"


_ANGLE_TOKEN = re.compile(r"<([^<>\s]+)>")
_QUEUED_AS = re.compile(r"queued as\s+(\S+)", re.IGNORECASE)
_OK_TOKEN = re.compile(r"^ok\s+(\S+)\s*$", re.IGNORECASE)


def parse_provider_message_id(text: str) -> str:
    """The provider's id from the final 250 text (mail.md §7.7), ``""`` when there is none.

    Rules in order: the first ``<…>`` token (kept with its brackets, as providers such as SES and
    Postmark use it as a Message-ID); else the token after ``queued as `` (Postfix and friends);
    else, when the whole text is ``Ok <token>``, the token wrapped in ``<…>``.
    """
    text = " ".join(text.split())
    if text[:6].count(".") == 2 and text[:1].isdigit():  # drop an RFC 3463 enhanced code
        text = text.split(" ", 1)[1] if " " in text else ""
    match = _ANGLE_TOKEN.search(text)
    if match:
        return f"<{match.group(1)}>"
    match = _QUEUED_AS.search(text)
    if match:
        return match.group(1).rstrip(".,;)")
    match = _OK_TOKEN.match(text)
    if match:
        return f"<{match.group(1)}>"
    return ""


def next_attempt_at(
    attempt: int,
    queued_at: datetime,
    now: datetime,
    schedule: Sequence[float],
    jitter: float,
    rand: float,
    max_queue_age: float,
) -> datetime | None:
    """When a deferred recipient is tried again after its attempt ``attempt`` (1-based) failed,
    or ``None`` when it is ``failed`` (mail.md §7.8).

    The delay is the webhook schedule step with jitter (:func:`e2a.delivery.backoff.step_delay`);
    past the end of the schedule the last step repeats, so a large ``max_queue_age`` is honoured
    rather than cut short. An attempt that would fall later than ``queued_at + max_queue_age`` is
    moved to that deadline and is the last one: an attempt made at or after the deadline that
    fails again gives ``None``.
    """
    deadline = queued_at + timedelta(seconds=max_queue_age)
    if now >= deadline:
        return None
    if not schedule:
        return deadline
    step = backoff.step_delay(min(attempt, len(schedule)), schedule, jitter, rand)
    assert step is not None
    when = now + timedelta(seconds=step)
    return deadline if when >= deadline else when


def order_mx(records: Sequence[tuple[int, str]], rand: Callable[[], float]) -> list[str]:
    """MX hosts by ascending preference, random order among equal preferences (RFC 5321 §5.1).

    ``rand`` is a uniform [0, 1) source (tests pass a fixed one). Duplicate host names are kept
    once, at their best preference.
    """
    keyed = sorted((pref, rand(), host.rstrip(".").lower()) for pref, host in records)
    hosts: list[str] = []
    for _pref, _r, host in keyed:
        if host not in hosts:
            hosts.append(host)
    return hosts


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: a ``0 .`` record (host ``""`` once the root dot is removed) means no mail."""
    return any(host.rstrip(".") == "" for _pref, host in records)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RouteConfig:
    """What the relay needs to know: the ``outbound_smtp`` and ``outbound`` sections, the EHLO
    name and whether non-public MX addresses are skipped (production)."""

    outbound_smtp: OutboundSmtpConfig = field(default_factory=OutboundSmtpConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    helo_name: str = "localhost"
    production: bool = False

    @classmethod
    def from_config(cls, config: Config) -> RouteConfig:
        return cls(config.outbound_smtp, config.outbound, config.helo_name, config.production)

    @property
    def uses_upstream(self) -> bool:
        return bool(self.outbound_smtp.host)


# ---------------------------------------------------------------------------------- TLS


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """Encrypt without checking the certificate (direct MX, ``tls_verify: false``), with SNI.

    Opportunistic STARTTLS to MX hosts (RFC 7435): most MX certificates do not match the MX
    name, and refusing them would only push the mail to plain text.
    """

    def __init__(self, hostname: str) -> None:
        self._context = CertificateOptions(verify=False).getContext()
        self._sni = None if _is_ip(hostname) or not hostname else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802 - interface
        connection = SSL.Connection(self._context, None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _tls_creator(hostname: str, verify: bool) -> Any:
    if verify:
        return optionsForClientTLS(hostname)
    return _UnverifiedTLS(hostname)


# ---------------------------------------------------------------------------------- protocol


class _SessionLost(Exception):
    """The connection closed (or was reset) while a reply was awaited."""


class _SessionTimeout(Exception):
    """No reply within the step's timeout."""


class _TlsFailed(Exception):
    """The TLS handshake after STARTTLS (or before the greeting) did not complete."""


class _ClientProtocol(smtp.SMTPClient):
    """twisted.mail's reply parser, driven by coroutines instead of the ``smtpState_*`` chain.

    ``command``/``read_reply`` return the next complete reply; ``send_data`` writes exact
    pre-stuffed bytes through a ``FileSender`` (flow-controlled, so a 25 MiB message never sits
    twice in memory) and never transforms them.
    """

    debug = False  # the LineLog would keep AUTH lines (credentials) in memory

    def __init__(self, clock: Any) -> None:
        super().__init__(identity=b"")
        self._clock = clock
        self._replies: list[SmtpReply] = []
        self._waiting: defer.Deferred[SmtpReply] | None = None
        self._lost: Failure | None = None
        self._aborted = False
        self._abort_reason = ""
        self._reply_lines = 0
        self._reply_bytes = 0
        #: True while message data is being written: the stream is mid-DATA, so no command
        #: (not even QUIT) may be written — it would become part of the message.
        self._in_data = False
        self.closed: defer.Deferred[None] = defer.Deferred()

    # twisted.mail plumbing ------------------------------------------------------------
    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self._expected = range(0, 1000)
        self._okresponse = self._on_reply
        self._failresponse = self._on_reply

    def lineReceived(self, line: bytes) -> Any:  # noqa: N802 - Twisted API
        if self._aborted or self._lost is not None:
            return None  # lines still buffered behind an abort are not ours to act on
        self._reply_lines += 1
        self._reply_bytes += len(line) + 2
        if self._reply_lines > MAX_REPLY_LINES or self._reply_bytes > MAX_REPLY_BYTES:
            log.warn("SMTP server reply exceeds {lines} lines or {size} bytes; dropping the connection",
                     lines=MAX_REPLY_LINES, size=MAX_REPLY_BYTES)
            self.resp = []
            self.abort("reply too long")
            return None
        why = super().lineReceived(line)
        if not self.resp:  # a reply completed (or an ignored line): the next one starts afresh
            self._reply_lines = self._reply_bytes = 0
        return why

    def _on_reply(self, code: int, resp: bytes) -> None:
        reply = SmtpReply(code, resp.decode("utf-8", "replace"))
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(reply)
        elif len(self._replies) >= MAX_UNSOLICITED_REPLIES:
            log.warn("SMTP server sent more than {count} replies nobody asked for; dropping the connection",
                     count=MAX_UNSOLICITED_REPLIES)
            self.abort("too many unsolicited replies")
        else:
            self._replies.append(reply)

    def sendError(self, exc: Exception) -> None:  # noqa: N802 - called by SMTPClient.lineReceived
        # An unparsable reply line: the session cannot continue.
        log.warn("SMTP protocol error from server: {error}", error=str(exc))
        self.abort("protocol error")

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 - Twisted API
        self.abort("reply line too long")

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:  # noqa: N802
        self._lost = reason
        self.setTimeout(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(_SessionLost(self._abort_reason or reason.getErrorMessage()))
        if not self.closed.called:
            self.closed.callback(None)

    # coroutine face --------------------------------------------------------------------
    async def read_reply(self, timeout: float) -> SmtpReply:
        if self._aborted:
            raise _SessionLost(self._abort_reason or "connection aborted")
        if self._replies:
            return self._replies.pop(0)
        if self._lost is not None:
            raise _SessionLost(self._lost.getErrorMessage())
        d: defer.Deferred[SmtpReply] = defer.Deferred()
        self._waiting = d

        def expire() -> None:
            if self._waiting is d:
                self._waiting = None
                d.errback(_SessionTimeout())

        timer = self._clock.callLater(timeout, expire)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()
            if self._waiting is d:
                self._waiting = None

    async def command(self, line: bytes, timeout: float = COMMAND_TIMEOUT) -> SmtpReply:
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise ValueError("refusing to send a command containing CR, LF or NUL")
        if self._in_data:
            raise RuntimeError("refusing to send a command while message data is being written")
        if self._aborted:
            raise _SessionLost(self._abort_reason or "connection aborted")
        self.transport.write(line + b"\r\n")
        return await self.read_reply(timeout)

    async def send_data(self, payload: bytes, idle_timeout: float, final_timeout: float) -> SmtpReply:
        """Write ``payload`` exactly (already stuffed and terminated); the final reply."""
        idle: list[Any] = [None]

        def stalled() -> None:
            log.warn("SMTP server stopped reading DATA for {seconds} s", seconds=idle_timeout)
            self.abort()

        def progress(chunk: bytes) -> bytes:
            if idle[0] is not None and idle[0].active():
                idle[0].reset(idle_timeout)
            return chunk  # exactly as given: no newline rewriting, no per-chunk stuffing

        idle[0] = self._clock.callLater(idle_timeout, stalled)
        self._in_data = True
        try:
            await basic.FileSender().beginFileTransfer(BytesIO(payload), self.transport, progress)
        except Exception as exc:
            # Cancelled or failed mid-transfer: the far end is inside DATA, and anything we
            # wrote now (QUIT included) would become message text. Drop the connection instead;
            # the transport then stops the FileSender as well.
            why = self._abort_reason or str(exc) or type(exc).__name__
            self.abort("message data not completely sent")
            raise _SessionLost(f"connection lost while sending message data ({why})") from exc
        finally:
            if idle[0].active():
                idle[0].cancel()
        self._in_data = False
        return await self.read_reply(final_timeout)

    def start_tls(self, creator: Any) -> None:
        """Switch to TLS after the server's 2xx to STARTTLS.

        RFC 3207 §6: anything the server sent in plain text after that reply (already parsed
        into replies, or still in the line buffer) is discarded, never read as an answer to a
        command sent over TLS.
        """
        stale = len(self._replies) + (1 if self.clearLineBuffer() else 0)
        self._replies.clear()
        self.resp = []
        self._reply_lines = self._reply_bytes = 0
        if stale:
            log.warn("discarded plaintext the SMTP server sent after its STARTTLS reply")
        self.transport.startTLS(creator)

    async def close(self) -> None:
        """QUIT (best effort), then close and wait for the transport to be gone.

        Mid-DATA (the transfer did not finish) there is no QUIT: it would land in the message
        body. The connection is aborted instead."""
        if self._in_data:
            self.abort("message data not completely sent")
        if self._lost is None and not self._aborted:
            try:
                await self.command(b"QUIT", QUIT_TIMEOUT)
            except (_SessionLost, _SessionTimeout):
                pass
        if self._lost is None and not self._aborted:
            self.transport.loseConnection()
        timer = self._clock.callLater(QUIT_TIMEOUT, self.abort)
        try:
            await self.closed
        finally:
            if timer.active():
                timer.cancel()

    def abort(self, reason: str = "") -> None:
        """Drop the connection now (timeouts, protocol errors): nothing more is sent, and
        nothing more that arrives is read."""
        if self._lost is None and not self._aborted and self.transport is not None:
            self._aborted = True
            self._abort_reason = reason
            self._replies.clear()
            self.clearLineBuffer()
            self.transport.abortConnection()


def _extensions(ehlo_text: str) -> dict[str, str]:
    items: dict[str, str] = {}
    for line in ehlo_text.splitlines()[1:]:
        parts = line.strip().split(None, 1)
        if parts:
            items[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
    return items


# ---------------------------------------------------------------------------------- one session


@dataclass
class _Plan:
    """How to talk to one address."""

    address: str
    port: int
    tls_name: str  # name the certificate is checked against / SNI
    implicit_tls: bool
    starttls: bool  # try STARTTLS when offered
    require_tls: bool
    verify: bool
    username: str = ""
    password: str = ""


@dataclass
class _SessionResult:
    """``greeted`` False: the host never answered usefully (try the next one)."""

    greeted: bool
    outcomes: dict[str, RecipientOutcome]
    error: str = ""
    greeting_code: int = 0
    tls_failed: bool = False


BeforeData = Callable[[list[str]], Awaitable[None]]


class Relay:
    """Sends one message to its SMTP recipients through the configured route.

    Args:
        reactor: connects (``IReactorTCP``).
        clock: every timeout (``IReactorTime``; tests pass ``task.Clock``).
        dns: the :class:`~e2a.mailauth.dns.DnsClient` (MX and address lookups, never another
            resolver).
        config: :class:`RouteConfig`.
        rand: uniform [0, 1) source for equal-preference MX shuffling.
    """

    def __init__(
        self,
        reactor: Any,
        clock: Any,
        dns: Any,
        config: RouteConfig,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._clock = clock or reactor
        self._dns = dns
        self.config = config
        self._rand = rand

    async def deliver(
        self,
        message_bytes: bytes,
        mail_from: str,
        recipients: Sequence[str],
        *,
        before_data: BeforeData | None = None,
    ) -> dict[str, RecipientOutcome]:
        """One attempt for ``recipients``; an outcome for every one of them.

        ``before_data(accepted)`` runs after the server's 354 and before the first message
        byte is written (the worker records the in-doubt window there); when it raises, the
        connection is dropped without sending and the accepted recipients are deferred.
        Never raises for network or protocol trouble: that is an outcome.
        """
        recipients = list(dict.fromkeys(recipients))
        if not recipients:
            return {}
        payload = smtp_data_bytes(message_bytes)
        eight_bit = any(b > 0x7F for b in message_bytes)
        if self.config.uses_upstream:
            return await self._via_upstream(payload, eight_bit, mail_from, recipients, before_data)
        if self.config.outbound.direct_mx:
            outcomes: dict[str, RecipientOutcome] = {}
            for domain, group in _by_domain(recipients).items():
                outcomes.update(
                    await self._via_mx(domain, payload, eight_bit, mail_from, group, before_data)
                )
            return outcomes
        return _all(recipients, "deferred", "no outbound route configured")

    # -------------------------------------------------------------------- upstream relay

    async def _via_upstream(
        self,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
    ) -> dict[str, RecipientOutcome]:
        cfg = self.config.outbound_smtp
        host = cfg.host.strip().strip("[]")
        try:
            addresses = await self._resolve(host)
        except DnsTemporaryError as exc:
            return _all(recipients, "deferred", f"relay host {host}: {exc}")
        if not addresses:
            return _all(recipients, "deferred", f"relay host {host} does not resolve")
        mode = cfg.tls
        implicit = mode == "implicit" or (mode == "auto" and cfg.port == 465)
        last = _SessionResult(False, _all(recipients, "deferred", "relay unreachable"))
        for address in addresses:
            require = implicit or mode == "starttls" or (
                mode == "auto" and bool(cfg.username) and not _is_loopback(address)
            )
            plan = _Plan(
                address=address,
                port=cfg.port,
                tls_name=host,
                implicit_tls=implicit,
                starttls=mode in ("auto", "starttls"),
                require_tls=require,
                verify=cfg.tls_verify,
                username=cfg.username,
                password=cfg.password,
            )
            result = await self._attempt(plan, payload, eight_bit, mail_from, recipients, before_data, True)
            if result.greeted:
                return result.outcomes
            last = result
        return last.outcomes

    # -------------------------------------------------------------------- direct MX

    async def _via_mx(
        self,
        domain: str,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
    ) -> dict[str, RecipientOutcome]:
        try:
            records = await self._dns.lookup_mx(domain)
        except DnsTemporaryError as exc:
            return _all(recipients, "deferred", f"MX lookup for {domain} failed: {exc}")
        if is_null_mx(records):
            return _all(recipients, "failed", f"556 5.1.10 {domain} does not accept mail (null MX)")
        hosts = order_mx(records, self._rand) if records else [domain]
        port = self.config.outbound.mx_port
        tried_any = had_address = dns_trouble = False
        errors: list[str] = []
        all_greeting_5xx = True
        for host in hosts:
            try:
                addresses = await self._resolve(host)
            except DnsTemporaryError as exc:
                errors.append(f"{host}: {exc}")
                dns_trouble = True
                continue
            had_address = had_address or bool(addresses)
            if self.config.production:
                public = [a for a in addresses if is_public_address(a)]
                if len(public) < len(addresses):
                    log.info("skipping non-public addresses of MX {host}", host=host)
                addresses = public
            for address in addresses:
                tried_any = True
                plan = _Plan(
                    address=address, port=port, tls_name=host, implicit_tls=False,
                    starttls=True, require_tls=False, verify=False,
                )
                result = await self._attempt(plan, payload, eight_bit, mail_from, recipients, before_data, False)
                if result.tls_failed:
                    # mail.md §7.7: a failed handshake → that host once more, in plain text.
                    log.info("TLS with {host} ({address}) failed; retrying without TLS",
                             host=host, address=address)
                    plan.starttls = False
                    result = await self._attempt(plan, payload, eight_bit, mail_from, recipients, before_data, False)
                if result.greeted:
                    return result.outcomes
                errors.append(f"{host} [{address}]: {result.error}")
                if not 500 <= result.greeting_code <= 599:
                    all_greeting_5xx = False
        if tried_any:
            status: RecipientStatus = "failed" if all_greeting_5xx else "deferred"
            return _all(recipients, status, errors[-1] if errors else "MX unreachable")
        if dns_trouble:
            return _all(recipients, "deferred", errors[-1])
        if not had_address:
            # NXDOMAIN / no data for every mail host: permanent (RFC 5321 §5.1).
            return _all(recipients, "failed", f"550 5.1.2 no mail host address for {domain}")
        return _all(recipients, "deferred", f"no public MX address for {domain}")

    # -------------------------------------------------------------------- shared

    async def _resolve(self, host: str) -> list[str]:
        if _is_ip(host):
            return [host.strip("[]")]
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return ["127.0.0.1", "::1"]
        addresses: list[str] = await self._dns.lookup_addresses(host)
        return addresses

    async def _connect(self, plan: _Plan) -> _ClientProtocol:
        proto = _ClientProtocol(self._clock)
        if ":" in plan.address:
            endpoint: Any = endpoints.TCP6ClientEndpoint(self._reactor, plan.address, plan.port)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self._reactor, plan.address, plan.port)
        if plan.implicit_tls:
            endpoint = endpoints.wrapClientTLS(_tls_creator(plan.tls_name, plan.verify), endpoint)
        d = quiet_connect(endpoint, proto)  # no "Starting factory" line per connection
        timer = self._clock.callLater(CONNECT_TIMEOUT, d.cancel)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()
        return proto

    async def _attempt(
        self,
        plan: _Plan,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
        upstream: bool,
    ) -> _SessionResult:
        try:
            proto = await self._connect(plan)
        except Exception as exc:  # refused, unreachable, timed out (cancelled)
            timed_out = isinstance(exc, (defer.CancelledError, ConnectingCancelledError))
            error = "connect timeout" if timed_out else f"connect failed: {exc}"
            return _SessionResult(False, _all(recipients, "deferred", error), error=error)
        try:
            return await _Session(proto, plan, self.config.helo_name, upstream).run(
                payload, eight_bit, mail_from, recipients, before_data
            )
        finally:
            try:
                await proto.close()
            except Exception:
                proto.abort()


class _Session:
    """One SMTP conversation, start to QUIT, as a straight line of awaits."""

    def __init__(self, proto: _ClientProtocol, plan: _Plan, helo_name: str, upstream: bool) -> None:
        self.proto = proto
        self.plan = plan
        self.helo = helo_name.encode("idna") if not helo_name.isascii() else helo_name.encode("ascii")
        self.upstream = upstream
        self.greeted = False
        self.tls_active = plan.implicit_tls
        self.step = "greeting"

    async def run(
        self,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
    ) -> _SessionResult:
        outcomes: dict[str, RecipientOutcome] = {}
        pending = list(recipients)
        try:
            return await self._run(payload, eight_bit, mail_from, recipients, before_data, outcomes, pending)
        except _TlsFailed as exc:
            error = f"TLS handshake failed ({exc})"
            outcomes.update(_all(pending, "deferred", error))
            return _SessionResult(self.greeted and self.upstream, outcomes, error=error, tls_failed=True)
        except (_SessionLost, _SessionTimeout) as exc:
            what = "timeout" if isinstance(exc, _SessionTimeout) else "connection lost"
            error = f"{what} at {self.step}" + (f" ({exc})" if str(exc) else "")
            if isinstance(exc, _SessionTimeout):
                self.proto.abort()
            doubt = self.step == "end of data"
            outcomes.update({r: RecipientOutcome("deferred", _clip(error), in_doubt=doubt) for r in pending})
            return _SessionResult(self.greeted, outcomes, error=error)

    async def _expect_2xx(self, reply: SmtpReply, pending: list[str], outcomes: dict[str, RecipientOutcome]) -> bool:
        status = status_for_code(reply.code)
        if status is None:
            return True
        outcomes.update(_all(pending, status, reply.line()))
        pending.clear()
        return False

    async def _run(
        self,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
        outcomes: dict[str, RecipientOutcome],
        pending: list[str],
    ) -> _SessionResult:
        proto, plan = self.proto, self.plan
        try:
            greeting = await proto.read_reply(COMMAND_TIMEOUT)
        except _SessionLost as exc:
            if plan.implicit_tls:
                raise _TlsFailed(str(exc)) from exc
            raise
        if status_for_code(greeting.code) is not None:
            error = greeting.line()
            return _SessionResult(
                False, _all(recipients, status_for_code(greeting.code) or "deferred", error),
                error=error, greeting_code=greeting.code,
            )
        self.greeted = True

        self.step = "EHLO"
        ehlo = await proto.command(b"EHLO " + self.helo)
        if 500 <= ehlo.code <= 599 and not plan.require_tls and not plan.username:
            self.step = "HELO"
            ehlo = await proto.command(b"HELO " + self.helo)
        if not await self._expect_2xx(ehlo, pending, outcomes):
            return _SessionResult(True, outcomes)
        extensions = _extensions(ehlo.text)

        if not self.tls_active and plan.starttls and "STARTTLS" in extensions:
            self.step = "STARTTLS"
            reply = await proto.command(b"STARTTLS")
            if status_for_code(reply.code) is None:
                proto.start_tls(_tls_creator(plan.tls_name, plan.verify))
                self.tls_active = True
                self.step = "EHLO after STARTTLS"
                try:
                    ehlo = await proto.command(b"EHLO " + self.helo)
                except _SessionLost as exc:
                    raise _TlsFailed(str(exc)) from exc
                if not await self._expect_2xx(ehlo, pending, outcomes):
                    return _SessionResult(True, outcomes)
                extensions = _extensions(ehlo.text)
            elif plan.require_tls:
                await self._expect_2xx(reply, pending, outcomes)
                return _SessionResult(True, outcomes)
        if plan.require_tls and not self.tls_active:
            outcomes.update(_all(pending, "deferred", "TLS required but the relay does not offer STARTTLS"))
            pending.clear()
            return _SessionResult(True, outcomes)

        if plan.username:
            self.step = "AUTH"
            if not await self._authenticate(extensions, pending, outcomes):
                return _SessionResult(True, outcomes)

        self.step = "MAIL FROM"
        mail = b"MAIL FROM:" + smtp.quoteaddr(mail_from.encode("utf-8"))
        if eight_bit and "8BITMIME" in extensions:
            mail += b" BODY=8BITMIME"
        if not await self._expect_2xx(await proto.command(mail), pending, outcomes):
            return _SessionResult(True, outcomes)

        accepted: list[str] = []
        for rcpt in recipients:
            self.step = "RCPT TO"
            reply = await proto.command(b"RCPT TO:" + smtp.quoteaddr(rcpt.encode("utf-8")))
            status = status_for_code(reply.code)
            if status is None:
                accepted.append(rcpt)
            else:
                outcomes[rcpt] = RecipientOutcome(status, reply.line())
                pending.remove(rcpt)
        if not accepted:
            return _SessionResult(True, outcomes)

        self.step = "DATA"
        reply = await proto.command(b"DATA")
        if reply.code != 354:
            status = status_for_code(reply.code) or "deferred"
            outcomes.update(_all(accepted, status, reply.line()))
            pending.clear()
            return _SessionResult(True, outcomes)

        if before_data is not None:
            try:
                await before_data(accepted)
            except Exception as exc:
                log.failure("could not record the in-flight state; not sending")
                proto.abort()
                outcomes.update(_all(pending, "deferred", f"not sent: {type(exc).__name__}"))
                pending.clear()
                return _SessionResult(True, outcomes)

        self.step = "end of data"
        final = await proto.send_data(payload, COMMAND_TIMEOUT, DATA_TIMEOUT)
        status = status_for_code(final.code)
        provider_id = parse_provider_message_id(final.text) if status is None and self.upstream else ""
        for rcpt in accepted:
            outcomes[rcpt] = RecipientOutcome(status or "sent", final.line(), provider_id)
        pending.clear()
        return _SessionResult(True, outcomes)

    async def _authenticate(
        self, extensions: dict[str, str], pending: list[str], outcomes: dict[str, RecipientOutcome]
    ) -> bool:
        proto, plan = self.proto, self.plan
        mechanisms = {m.upper() for m in extensions.get("AUTH", "").split()}
        user = plan.username.encode("utf-8")
        secret = plan.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await proto.command(b"AUTH PLAIN " + token)
            if reply.code == 334:  # server wanted the initial response separately
                reply = await proto.command(token)
        elif "LOGIN" in mechanisms:
            reply = await proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(user))
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(secret))
        else:
            outcomes.update(_all(pending, "deferred", "the relay offers neither AUTH PLAIN nor AUTH LOGIN"))
            pending.clear()
            return False
        if reply.code == 334:
            await proto.command(b"*")
            outcomes.update(_all(pending, "deferred", "unexpected AUTH challenge"))
            pending.clear()
            return False
        return await self._expect_2xx(reply, pending, outcomes)


def _all(recipients: Sequence[str], status: RecipientStatus, reply: str) -> dict[str, RecipientOutcome]:
    return {r: RecipientOutcome(status, _clip(reply)) for r in recipients}


def _by_domain(recipients: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        domain = rcpt.rsplit("@", 1)[-1].lower()
        groups.setdefault(domain, []).append(rcpt)
    return groups


async def deliver(
    message_bytes: bytes,
    mail_from: str,
    recipients: Sequence[str],
    route_config: RouteConfig,
    *,
    reactor: Any,
    dns: Any,
    clock: Any = None,
    before_data: BeforeData | None = None,
) -> dict[str, RecipientOutcome]:
    """Module-level convenience for :meth:`Relay.deliver` (one attempt, outcome per recipient)."""
    relay = Relay(reactor, clock or reactor, dns, route_config)
    return await relay.deliver(message_bytes, mail_from, recipients, before_data=before_data)
