"""At-rest AES-256-GCM format (config.md §2.4) and API-key hashing (api.md §0.2)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from e2a import crypto
from e2a.crypto import DecryptionError

KEY = bytes(range(32))
OTHER_KEY = bytes(32)
ROW = "wsec_0123456789abcdef0123456789abcdef"


def test_encrypt_format_v1_nonce_ciphertext_tag() -> None:
    """v1: + base64(12-byte nonce ‖ ciphertext ‖ 16-byte tag), AAD = row id (independent AESGCM check)."""
    nonce = b"\x01" * 12
    value = crypto.encrypt(KEY, b"secret text", ROW, nonce=nonce)
    assert value.startswith("v1:")
    blob = base64.b64decode(value[3:], validate=True)
    assert blob[:12] == nonce
    assert len(blob) == 12 + len(b"secret text") + 16
    assert AESGCM(KEY).decrypt(blob[:12], blob[12:], ROW.encode()) == b"secret text"


@given(st.binary(max_size=300), st.text(max_size=40))
def test_encrypt_decrypt_roundtrip(plaintext: bytes, row_id: str) -> None:
    """Anything encrypted for a row decrypts for that row."""
    assert crypto.decrypt(KEY, crypto.encrypt(KEY, plaintext, row_id), row_id) == plaintext


def test_encrypt_uses_fresh_nonce_each_time() -> None:
    """Two encryptions of the same value differ (random nonce)."""
    a, b = (crypto.encrypt(KEY, b"x", ROW) for _ in range(2))
    assert a != b
    assert base64.b64decode(a[3:])[:12] != base64.b64decode(b[3:])[:12]


def test_decrypt_wrong_row_id_raises() -> None:
    """A value moved to another row does not decrypt."""
    value = crypto.encrypt(KEY, b"x", ROW)
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.decrypt(KEY, value, "wsec_ffffffffffffffffffffffffffffffff")


def test_decrypt_wrong_master_key_raises() -> None:
    """Another master key does not decrypt."""
    with pytest.raises(DecryptionError):
        crypto.decrypt(OTHER_KEY, crypto.encrypt(KEY, b"x", ROW), ROW)


@pytest.mark.parametrize("index", [0, 11, 12, -16, -1])
def test_decrypt_tampered_byte_raises(index: int) -> None:
    """Flipping a bit in nonce, ciphertext or tag is detected."""
    blob = bytearray(base64.b64decode(crypto.encrypt(KEY, b"payload", ROW)[3:]))
    blob[index] ^= 0x01
    with pytest.raises(DecryptionError):
        crypto.decrypt(KEY, "v1:" + base64.b64encode(bytes(blob)).decode(), ROW)


@pytest.mark.parametrize(
    "value",
    ["", "v2:AAAA", "v1:not base64!", "v1:" + base64.b64encode(b"short").decode(), "AAAA"],
)
def test_decrypt_malformed_raises(value: str) -> None:
    """Unknown version, bad base64 or too-short blobs are clear errors."""
    with pytest.raises(DecryptionError):
        crypto.decrypt(KEY, value, ROW)


@pytest.mark.parametrize("bad", [b"", b"k" * 16, b"k" * 31, b"k" * 33])
def test_bad_master_key_length_is_value_error(bad: bytes) -> None:
    """Only 32-byte keys (AES-256) are accepted."""
    with pytest.raises(ValueError):
        crypto.encrypt(bad, b"x", ROW)
    with pytest.raises(ValueError):
        crypto.decrypt(bad, "v1:AAAA", ROW)


def test_encrypt_rejects_bad_nonce_length() -> None:
    """The nonce is exactly 12 bytes."""
    with pytest.raises(ValueError):
        crypto.encrypt(KEY, b"x", ROW, nonce=b"\x00" * 16)


def test_hash_api_key_sha256_hex() -> None:
    """Stored hash is lowercase hex SHA-256 of the key text."""
    key = "e2a_" + "1a2b3c4d" * 8
    assert crypto.hash_api_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert crypto.hash_api_key(key) == crypto.hash_api_key(key).lower()
    assert len(crypto.hash_api_key(key)) == 64


def test_key_prefix_first_12_chars() -> None:
    """Display prefix: first 12 chars (e2a_ + 8 hex)."""
    assert crypto.key_prefix("e2a_1a2b3c4d" + "0" * 56) == "e2a_1a2b3c4d"
    assert crypto.key_prefix("4a9d1c0e7b3f52a8" * 4) == "4a9d1c0e7b3f"
