"""The SMTP server factory (:class:`SmtpFactory`): builds sessions, enforces the connection
limits (mail.md §1.2) and drains them at shutdown; plus the TLS options it serves STARTTLS with.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IAddress,
    IReactorTime,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

from e2a.config import SmtpConfig
from e2a.metrics import E2AMetrics
from e2a.smtp.replies import (
    R_SHUTDOWN,
    R_TOO_MANY_CONNECTIONS,
    Reply,
)
from e2a.smtp.session import (
    AcceptFn,
    RecipientLookup,
    SmtpSession,
)

log = Logger()


def connection_key(ip: str) -> str:
    """The per-IP connection-limit bucket: the IPv4 address, or the IPv6 /64 (mail.md §1.2)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def load_tls_options(cert_path: str, key_path: str) -> CertificateOptions:
    """Server TLS options from PEM files (leaf first, then chain), TLS 1.2 or newer.

    Loaded once at start so a broken certificate fails the start, not the first STARTTLS.
    """
    with open(cert_path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )



class SmtpFactory(protocol.ServerFactory):
    """Builds :class:`SmtpSession`s and enforces the connection limits (mail.md §1.2).

    Args:
        config: the ``smtp`` config section.
        recipients: async ``(address) -> canonical agent address | None``.
        accept: async ``(envelope, raw) -> msg id``; resolves only after COMMIT.
        clock: the reactor (or a ``task.Clock`` in tests) all session timers use.
        tls: server TLS context factory (e.g. from :func:`load_tls_options`); None → no STARTTLS.
    """

    noisy = False

    def __init__(
        self,
        config: SmtpConfig,
        recipients: RecipientLookup,
        accept: AcceptFn,
        clock: IReactorTime,
        tls: Any | None = None,
        metrics: E2AMetrics | None = None,
    ) -> None:
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self.config = config
        self.recipients = recipients
        self.accept = accept
        self.clock = clock
        self.tls = tls
        self.sessions: set[SmtpSession] = set()
        self._per_ip: Counter[str] = Counter()
        self._shutting_down = False
        self._drained: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress) -> SmtpSession:
        return SmtpSession(self)

    def register(self, session: SmtpSession) -> Reply | None:
        """Admit a new session, or return the refusal to send before closing it."""
        if self._shutting_down:
            return R_SHUTDOWN
        key = connection_key(session._client_ip)
        if len(self.sessions) >= self.config.max_connections:
            return R_TOO_MANY_CONNECTIONS
        if self._per_ip[key] >= self.config.max_connections_per_ip:
            return R_TOO_MANY_CONNECTIONS
        self.sessions.add(session)
        self._per_ip[key] += 1
        return None

    def unregister(self, session: SmtpSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        key = connection_key(session._client_ip)
        self._per_ip[key] -= 1
        if self._per_ip[key] <= 0:
            del self._per_ip[key]
        if not self.sessions:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def shutdown(self) -> defer.Deferred[None]:
        """Refuse new sessions, send ``421 4.3.2`` to every live one and close it.

        Fires when every session has disconnected (stop the listener first). A session
        waiting for storage gets its final reply before the 421.
        """
        self._shutting_down = True
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        for session in list(self.sessions):
            session.shutdown()
        return d
