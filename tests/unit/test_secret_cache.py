"""SecretCache: decryption is cached per (secret id, ciphertext) and for a limited time."""

from __future__ import annotations

import pytest

from e2a import crypto
from e2a.store.accounts import SecretCache

KEY = b"k" * 32


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_decrypt_returns_plaintext_when_cached_and_fresh(monkeypatch):
    """The second call for the same secret does not decrypt again."""
    ct = crypto.encrypt(KEY, b"s3cret", "wsec_1")
    cache = SecretCache(ttl=10, clock=_Clock())
    assert cache.decrypt(KEY, "wsec_1", ct) == "s3cret"
    monkeypatch.setattr(crypto, "decrypt", lambda *a: pytest.fail("decrypted twice"))
    assert cache.decrypt(KEY, "wsec_1", ct) == "s3cret"


def test_decrypt_uses_new_secret_when_id_changes():
    """A rotated (new id) secret is decrypted and returned at once."""
    cache = SecretCache(clock=_Clock())
    assert cache.decrypt(KEY, "wsec_1", crypto.encrypt(KEY, b"old", "wsec_1")) == "old"
    assert cache.decrypt(KEY, "wsec_2", crypto.encrypt(KEY, b"new", "wsec_2")) == "new"


def test_decrypt_again_when_entry_expired(monkeypatch):
    """After ttl seconds the ciphertext is opened again."""
    clock = _Clock()
    ct = crypto.encrypt(KEY, b"s3cret", "wsec_1")
    cache = SecretCache(ttl=10, clock=clock)
    cache.decrypt(KEY, "wsec_1", ct)
    clock.now = 11
    calls = []
    real = crypto.decrypt
    monkeypatch.setattr(crypto, "decrypt", lambda *a: calls.append(1) or real(*a))
    assert cache.decrypt(KEY, "wsec_1", ct) == "s3cret"
    assert calls == [1]


def test_decrypt_raises_when_ciphertext_belongs_to_other_row():
    """AAD binding still applies: another row's ciphertext does not open (and is not cached)."""
    cache = SecretCache(clock=_Clock())
    with pytest.raises(crypto.DecryptionError):
        cache.decrypt(KEY, "wsec_2", crypto.encrypt(KEY, b"x", "wsec_1"))
