"""A renewed inbound STARTTLS certificate is served to new sessions without a restart
(e2a.tlsreload, docs/deployment.md)."""

from __future__ import annotations

import pytest_twisted

from twisted.internet import ssl

from e2a.config import SmtpConfig
from tests.support import smtpclient
from tests.unit.test_tlsreload import _write_pair


async def _served_cn(port: int) -> str:
    client = await smtpclient.connect(port)
    await client.reply()
    await client.command("EHLO client.example.org")
    assert (await client.command("STARTTLS")).code == 220
    await client.start_tls(ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2))
    ehlo = await client.command("EHLO client.example.org")  # completes the handshake
    assert ehlo.code == 250
    cert = client.transport.getPeerCertificate()
    await client.command("QUIT")
    await client.wait_closed()
    return cert.to_cryptography().subject.rfc4514_string()


@pytest_twisted.ensureDeferred
async def test_renewed_certificate_served_to_new_sessions(e2a_service_factory, tmp_path):
    """Replace smtp.tls_cert/tls_key on disk; after the watcher's next look STARTTLS presents the new one."""
    _write_pair(tmp_path, "before.example")
    service = await e2a_service_factory(smtp=SmtpConfig(
        listen_addr="127.0.0.1:0", domain="mx.e2a.test", tls_cert=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
    ))
    port = service.smtp_port.getHost().port
    assert await _served_cn(port) == "CN=before.example"
    _write_pair(tmp_path, "after.example")
    assert service.tls_watcher.check() is True  # what the 60 s loop does
    assert await _served_cn(port) == "CN=after.example"
