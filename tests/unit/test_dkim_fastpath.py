"""DkimMessage (the fast DKIM path) gives dkimpy's own answer, signature by signature.

Differential table test: each message variant is verified both by ``dkim.DKIM(raw).verify`` and
by :class:`e2a.mailauth.verify.DkimMessage`; outcome (True/False or the exception class) and
the parsed headers/body must match. No DNS: the key record is handed over directly.
"""

from __future__ import annotations

import base64
import itertools

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from e2a.mailauth.verify import DkimMessage, _dkim_split

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _record(key) -> bytes:
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


def _pkcs1_record(key) -> bytes:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return b"v=DKIM1; p=" + base64.b64encode(der)


ED_PRIV = base64.b64encode(
    ED_KEY.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
)
ED_RECORD = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(
    ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
)

BODIES = [
    b"Hello.\r\nSecond line.\r\n",
    b"",
    b"\r\n\r\n\r\n",
    b"no final crlf",
    b"tabs\there  and   spaces \t \r\ntrailing \r\n\r\n",
    b"line\r\n \r\n\t\r\n",
    b"x" * 5000 + b"\r\n" + b"y  y\r\n" * 100,
    b"bare\rCR inside\r\n",
]

CANON = [(b"relaxed", b"simple"), (b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"simple", b"relaxed")]


def _message(body: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: agent@e2a.test\r\n"
        b"Subject:  folded\r\n\tsubject   line\r\n"
        b"Date: Mon, 27 Apr 2026 12:05:00 +0000\r\n"
        b"\r\n" + body
    )


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the exception class is the outcome
        return type(exc)


def _both(raw: bytes, record: bytes, idx: int = 0):
    reference = dkim.DKIM(raw, minkey=1024)
    expected = _outcome(lambda: reference.verify(idx=idx, dnsfunc=lambda _n, timeout=5: record))
    got = _outcome(lambda: DkimMessage(raw).verify(idx, record))
    return expected, got


def _variants():
    for body, canon, length in itertools.product(BODIES, CANON, (False, True)):
        raw = _message(body)
        sig = dkim.sign(raw, b"sel", b"example.com", _pem(KEY), canonicalize=canon, length=length,
                        include_headers=[b"from", b"to", b"subject", b"date"])
        yield sig + raw
        yield sig + raw + b"tampered\r\n"
        yield sig + raw.replace(b"Second", b"Sec  ond")
        yield sig + raw.replace(b"Subject:  folded", b"Subject: folded")
        yield sig.replace(b"b=", b"b=AAAA", 1) + raw


@pytest.mark.parametrize("raw", list(_variants()))
@pytest.mark.parametrize("record", [_record(KEY), _pkcs1_record(KEY)], ids=["spki", "pkcs1"])
def test_fast_path_matches_dkimpy_when_rsa(raw, record):
    """Same result/exception as dkimpy for every body, canonicalisation, l= and tampering."""
    expected, got = _both(raw, record)
    assert got == expected


def test_fast_path_matches_dkimpy_when_signature_not_first():
    """idx selects the same DKIM-Signature field as dkimpy."""
    raw = _message(BODIES[0])
    sig1 = dkim.sign(raw, b"sel", b"example.com", _pem(KEY), include_headers=[b"from"])
    signed = sig1 + raw
    sig2 = dkim.sign(signed, b"sel", b"example.com", _pem(KEY), include_headers=[b"from", b"to"])
    twice = sig2 + b"DKIM-Signature: v=1; a=rsa-sha256; bogus\r\n" + signed
    for idx in (0, 1, 2):
        expected, got = _both(twice, _record(KEY), idx)
        assert got == expected


def test_fast_path_matches_dkimpy_when_ed25519():
    """ed25519-sha256 signatures pass and fail exactly as with dkimpy."""
    raw = _message(BODIES[0])
    sig = dkim.sign(raw, b"sel", b"example.com", ED_PRIV, signature_algorithm=b"ed25519-sha256",
                    include_headers=[b"from", b"to"])
    for msg in (sig + raw, sig + raw + b"x\r\n", sig + raw.replace(b"Alice", b"Mallory")):
        expected, got = _both(msg, ED_RECORD)
        assert got == expected
    assert _both(sig + raw, ED_RECORD)[1] is True


def test_fast_path_matches_dkimpy_when_key_is_other_type():
    """An RSA signature against an ed25519 key (and back) gives dkimpy's answer."""
    raw = _message(BODIES[0])
    sig = dkim.sign(raw, b"sel", b"example.com", _pem(KEY), include_headers=[b"from"])
    assert _both(sig + raw, ED_RECORD)[0] == _both(sig + raw, ED_RECORD)[1]


SPLIT_CASES = [
    b"",
    b"\r\n",
    b"\r\nbody only\r\n",
    b"A: b\r\n",
    b"A: b",
    b"A: b\r\n\r\n",
    b"A: b\r\n c\r\n\r\nbody\r\n\r\n",
    b"From x\r\nA: b\r\n\r\nbody",
    b"A: b\nC: d\n\nlf body\n",
    b"A: b\r\n\r\nmixed\nendings\r\n",
    b"A: b\r\r\n\r\nbody\r\n",
    b"A: b\r\nC: d\r\n\r\n" + b"line\r\n" * 2000,
]


def _crlf_only(raw: bytes) -> bool:
    """What the SMTP DATA scanner lets through: no CR or LF outside a CRLF (mail.md §1.5)."""
    return raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")


@pytest.mark.parametrize("raw", SPLIT_CASES)
def test_split_matches_rfc822_parse(raw):
    """Header/body split equals dkimpy's rfc822_parse for CRLF, LF and odd input."""
    expected = _outcome(lambda: dkim.rfc822_parse(raw))
    got = _outcome(lambda: _dkim_split(raw))
    if isinstance(expected, tuple):
        assert isinstance(got, tuple)
        assert [list(h) for h in got[0]] == [list(h) for h in expected[0]]
        assert got[1] == expected[1]
    else:
        assert got == expected


@pytest.mark.parametrize("raw", [raw for raw in SPLIT_CASES if _crlf_only(raw)])
def test_split_of_crlf_only_content_skips_the_count_and_still_matches(raw):
    """With ``crlf_only`` (content the SMTP DATA scanner let through) the split is still
    dkimpy's rfc822_parse, without counting the line ends."""
    class Uncounted(bytes):
        def count(self, *_args):
            raise AssertionError("counted the line ends of content known to be CRLF-only")

    expected = dkim.rfc822_parse(raw)
    headers, body = _dkim_split(Uncounted(raw), crlf_only=True)
    assert [list(h) for h in headers] == [list(h) for h in expected[0]] and body == expected[1]


def _btag_cases():
    import random

    rng = random.Random(7)
    alphabet = [b"b", b"=", b";", b" ", b"\t", b"\r", b"\n", b"\r\n", b"A", b"z", b"0", b"+", b"/", b"h", b"-", b"."]
    fixed = [
        b" v=1; a=rsa-sha256; bh=abc=; b=QUJD\r\n\tREVG\r\n",
        b" b=",
        b";b = ab cd  \r\n",
        b" b=ab\r\n",
        b" b=ab\n",
        b" b=ab  \r\n x",
        b"; b=; bh=x; b=yy",
        b" v=1;\r\n b=\r\n \r\n\tQUJD",
    ]
    return fixed + [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]


def test_btag_regex_matches_dkimpy():
    """The faster b= blanking regex substitutes exactly as dkimpy's RE_BTAG."""
    from e2a.mailauth.verify import _BTAG

    for value in _btag_cases():
        assert _BTAG.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value), value
