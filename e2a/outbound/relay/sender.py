"""The relay: one message to its SMTP recipients through the configured route (upstream relay or
direct MX per recipient domain), host after host.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger

from e2a.logsetup import quiet_connect
from e2a.mailauth.dns import DnsTemporaryError
from e2a.outbound.compose import smtp_data_bytes
from e2a.outbound.relay.protocol import (
    _ClientProtocol,
)
from e2a.outbound.relay.routeconfig import (
    RouteConfig,
)
from e2a.outbound.relay.rules import (
    CONNECT_TIMEOUT,
    RecipientOutcome,
    RecipientStatus,
    _is_ip,
    _is_loopback,
    is_null_mx,
    order_mx,
)
from e2a.outbound.relay.session import (
    BeforeData,
    _all,
    _Plan,
    _Session,
    _SessionResult,
)
from e2a.outbound.relay.tls import (
    _tls_creator,
)
from e2a.policy.ssrf import is_public_address

log = Logger()


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
