"""e2a.tlsreload: a renewed STARTTLS certificate is picked up; a broken one is not."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from twisted.internet import task

from e2a.smtp.server import load_tls_options
from e2a.tlsreload import CertificateWatcher


def _write_pair(directory: Path, cn: str, key: rsa.RSAPrivateKey | None = None) -> rsa.RSAPrivateKey:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key


def _watcher(tmp_path: Path, applied: list) -> tuple[CertificateWatcher, task.Clock]:
    clock = task.Clock()
    w = CertificateWatcher(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), load_tls_options, applied.append,
                           clock, interval=60)
    w.start()
    return w, clock


def _cn(context) -> str:
    return context.certificate.to_cryptography().subject.rfc4514_string().removeprefix("CN=")


def test_renewed_certificate_is_applied_at_the_next_check(tmp_path):
    """New files → the next tick loads them and hands the new context over; no change → nothing."""
    _write_pair(tmp_path, "old.example")
    applied: list = []
    w, clock = _watcher(tmp_path, applied)
    clock.advance(60)
    assert applied == []
    _write_pair(tmp_path, "new.example")
    clock.advance(60)
    assert [_cn(c) for c in applied] == ["new.example"] and w.reloads == 1
    clock.advance(60)
    assert len(applied) == 1
    w.stop()


def test_mismatched_pair_keeps_the_previous_certificate(tmp_path):
    """A certificate whose key does not match is refused (logged); fixing it is picked up."""
    key = _write_pair(tmp_path, "old.example")
    applied: list = []
    w, clock = _watcher(tmp_path, applied)
    other = tmp_path / "other"
    other.mkdir()
    _write_pair(other, "bad.example")
    (tmp_path / "tls.crt").write_bytes((other / "tls.crt").read_bytes())  # key unchanged: mismatch
    clock.advance(60)
    assert applied == []
    _write_pair(tmp_path, "fixed.example", key)
    clock.advance(60)
    assert [_cn(c) for c in applied] == ["fixed.example"]
    w.stop()


def test_missing_file_is_not_a_change(tmp_path):
    """A file briefly missing during a renewal is skipped, not an error."""
    _write_pair(tmp_path, "old.example")
    applied: list = []
    w, clock = _watcher(tmp_path, applied)
    (tmp_path / "tls.key").unlink()
    clock.advance(60)
    assert applied == [] and w.check() is False
    w.stop()
