"""At-rest encryption of signing secrets and DKIM private keys (config.md §2.4) and API-key
hashing (api.md §0.2).

Ciphertexts are bound to their row id as AES-GCM associated data, so a database user who can
swap columns between rows cannot make one user's secret decrypt as another's: the tag check
fails instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "v1:"
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32


class DecryptionError(Exception):
    """A stored ciphertext could not be opened: wrong master key, wrong row id, tampered or
    malformed value. Never retryable; the message never contains key material."""


def _aead(master_key: bytes) -> AESGCM:
    if len(master_key) != KEY_LEN:
        raise ValueError("master key must be 32 bytes (AES-256)")
    return AESGCM(master_key)


def encrypt(master_key: bytes, plaintext: bytes, row_id: str, *, nonce: bytes | None = None) -> str:
    """``v1:`` + base64(12-byte nonce ‖ ciphertext ‖ 16-byte tag), AES-256-GCM, AAD = row id.

    ``nonce`` is for tests only; production always takes a fresh random one (a repeated
    nonce under one GCM key leaks the authentication key).
    """
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    elif len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    sealed = _aead(master_key).encrypt(nonce, plaintext, row_id.encode("utf-8"))
    return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


def decrypt(master_key: bytes, value: str, row_id: str) -> bytes:
    """Open a value made by :func:`encrypt` for the same row id.

    Raises:
        DecryptionError: unknown version prefix, bad base64, too short, or the GCM tag does
            not verify (tampered data, another row's value, or a different master key).
        ValueError: the master key is not 32 bytes (a configuration bug, not bad data).
    """
    aead = _aead(master_key)
    if not value.startswith(PREFIX):
        raise DecryptionError("unsupported at-rest encryption format (expected 'v1:')")
    try:
        blob = base64.b64decode(value[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("at-rest value is not valid base64") from None
    if len(blob) < NONCE_LEN + TAG_LEN:
        raise DecryptionError("at-rest value too short")
    try:
        return aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], row_id.encode("utf-8"))
    except InvalidTag:
        raise DecryptionError(
            f"at-rest value for row {row_id!r} failed authentication "
            "(tampered, belongs to another row, or wrong master key)"
        ) from None


def hash_api_key(key: str) -> str:
    """What is stored for an API key: lowercase hex SHA-256 of its ASCII text (api.md §0.2)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    """Display prefix stored and shown for keys and secrets: the first 12 characters."""
    return key[:12]
