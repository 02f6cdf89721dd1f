"""TLS for outbound SMTP: verified (upstream relay, ``tls_verify``) or opportunistic without
certificate checks (direct MX, RFC 7435), always with SNI.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from zope.interface import implementer

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS

from e2a.outbound.relay.rules import (
    _is_ip,
)


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
