"""DKIM keys for custom domains (mail.md §7.5): RSA 2048, selector ``e2a`` + ``YYYYMMDD``.

A key is generated when a domain is registered or taken over. The private key is kept as
PKCS#8 PEM, encrypted at rest with the master key and bound to the domain name (AES-GCM
associated data), so a row's key cannot be moved to another domain's row and still open. The
public half is the base64 DER SubjectPublicKeyInfo that goes into ``p=`` of the TXT record.

RSA key generation costs tens to hundreds of milliseconds of CPU, so it runs in a thread
(:func:`thd_generate_key`) and never on the reactor.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from twisted.internet import threads

from e2a import crypto

__all__ = [
    "KEY_BITS",
    "DkimKeyPair",
    "generate_key",
    "open_private_key",
    "seal_private_key",
    "selector_for",
    "thd_generate_key",
]

KEY_BITS = 2048
SELECTOR_PREFIX = "e2a"


@dataclass(frozen=True)
class DkimKeyPair:
    """A freshly generated key: ``private_pem`` is plaintext PKCS#8 — seal it before storing."""

    private_pem: bytes
    public_key_b64: str  # base64 DER SubjectPublicKeyInfo (the ``p=`` value)


def selector_for(when: datetime) -> str:
    """``e2a`` + the UTC creation date as ``YYYYMMDD`` (e.g. ``e2a20260427``)."""
    d = when.astimezone(UTC) if when.tzinfo is not None else when
    return f"{SELECTOR_PREFIX}{d.year:04d}{d.month:02d}{d.day:02d}"


def thd_generate_key(bits: int = KEY_BITS) -> DkimKeyPair:
    """Generate an RSA key (e = 65537). Blocking and CPU-heavy: thread only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKeyPair(private_pem, base64.b64encode(spki).decode("ascii"))


async def generate_key(reactor: Any = None, pool: Any = None) -> DkimKeyPair:
    """Generate a key off the reactor thread.

    With ``reactor`` and ``pool`` (an owned, started ``ThreadPool``) the work runs there;
    otherwise in the reactor's default thread pool via ``deferToThread``.
    """
    if reactor is not None and pool is not None:
        return await threads.deferToThreadPool(reactor, pool, thd_generate_key)
    return await threads.deferToThread(thd_generate_key)


def seal_private_key(master_key: bytes, private_pem: bytes, domain: str) -> str:
    """The stored form of a private key: ``v1:…`` with associated data = the domain name."""
    return crypto.encrypt(master_key, private_pem, domain)


def open_private_key(master_key: bytes, sealed: str, domain: str) -> bytes:
    """The PKCS#8 PEM of a stored key (for the DKIM signer).

    Raises:
        e2a.crypto.DecryptionError: wrong master key, another domain's value, tampering.
    """
    return crypto.decrypt(master_key, sealed, domain)
