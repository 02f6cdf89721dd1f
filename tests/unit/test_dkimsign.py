"""DKIM signing of outbound mail (mail.md §7.5) and the deployment key files (config.md §6)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.util import parse_tag_value

from e2a.config import DkimKeyConfig
from e2a.mailauth.dkimkeys import thd_generate_key
from e2a.outbound import compose as c
from e2a.outbound import dkimsign
from e2a.outbound.compose import Attachment

DOMAIN = "agents.example"
SELECTOR = "e2a20260427"
NOW = 1_777_291_500
DATE = datetime(2026, 4, 27, 12, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def key():
    return thd_generate_key()


@pytest.fixture(scope="module")
def dnsfunc(key):
    record = f"v=DKIM1; k=rsa; p={key.public_key_b64}".encode("ascii")

    def lookup(name, timeout=5):
        return record if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else None

    return lookup


def message(**kw) -> bytes:
    args = dict(message_id="msg_" + "cd" * 16, mail_domain="e2a.example", agent_address=f"bot@{DOMAIN}",
                agent_name="Bot", to=["a@x.example"], subject="Hello", body_text="Hi\n.\n..dots\n", date=DATE,
                random_hex=lambda: "f" * 32)
    args.update(kw)
    return c.compose_message(**args)


def sign(raw: bytes, key) -> bytes:
    return dkimsign.thd_dkim_sign(raw, DOMAIN, SELECTOR, key.private_pem, NOW)


def tags(signed: bytes) -> dict[bytes, bytes]:
    d = dkim.DKIM(signed)
    value = [v for k, v in d.headers if k.lower() == b"dkim-signature"][0]
    return parse_tag_value(value)


def h_list(signed: bytes) -> list[str]:
    return [x.strip().decode() for x in b"".join(tags(signed)[b"h"].split()).split(b":")]


def unstuff(data: bytes) -> bytes:
    lines = data[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_sign_then_verify_passes(key, dnsfunc):
    """A signed composed message verifies against the published key."""
    signed = sign(message(), key)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(message())
    assert dkim.verify(signed, dnsfunc=dnsfunc)


def test_signature_tags(key):
    """a=rsa-sha256, c=relaxed/relaxed, d, s, t=now, no l=."""
    t = tags(sign(message(), key))
    assert t[b"a"] == b"rsa-sha256"
    assert t[b"c"] == b"relaxed/relaxed"
    assert t[b"d"] == DOMAIN.encode()
    assert t[b"s"] == SELECTOR.encode()
    assert t[b"t"] == str(NOW).encode()
    assert b"l" not in t and b"x" not in t


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["from", "reply-to", "subject", "date", "message-id", "to", "mime-version", "content-type",
              "content-transfer-encoding", "from"]),
        ({"cc": ["c@x.example"], "in_reply_to": "<o@x>", "references": "<r@x> <o@x>", "conversation_id": "conv"},
         ["from", "reply-to", "subject", "date", "message-id", "to", "cc", "in-reply-to", "references",
          "mime-version", "content-type", "content-transfer-encoding", "x-e2a-conversation-id", "from"]),
        ({"to": [], "cc": ["c@x.example"], "body_html": "<p>x</p>"},
         ["from", "reply-to", "subject", "date", "message-id", "cc", "mime-version", "content-type", "from"]),
        ({"test_email": True},
         ["from", "subject", "date", "message-id", "to", "mime-version", "content-type",
          "content-transfer-encoding", "from"]),
    ],
)
def test_h_lists_present_headers_with_from_oversigned(key, kwargs, expected):
    """h= holds the present §7.5 headers in order, with from listed twice."""
    signed = sign(message(**kwargs), key)
    assert h_list(signed) == expected
    assert h_list(signed).count("from") == 2


def test_added_from_breaks_signature(key, dnsfunc):
    """Oversigning: a second From added after signing fails verification."""
    signed = sign(message(), key)
    assert not dkim.verify(b"From: evil@x.example\r\n" + signed, dnsfunc=dnsfunc)
    head, sep, body = signed.partition(b"\r\n\r\n")
    assert not dkim.verify(head + b"\r\nFrom: evil@x.example" + sep + body, dnsfunc=dnsfunc)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"Subject: Hello", b"Subject: Hellp"), (b"Hi\r\n", b"Ho\r\n"), (b"To: a@x.example", b"To: b@x.example")],
)
def test_tampering_breaks_signature(key, dnsfunc, old, new):
    """Changing a signed header or the body fails verification."""
    signed = sign(message(), key)
    assert old in signed
    assert not dkim.verify(signed.replace(old, new, 1), dnsfunc=dnsfunc)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"subject": "Grüße " * 30, "agent_name": "Zoë \"q\"", "body_text": "é\n.\n" * 500},
        {"body_html": "<p>.</p>\n.\n", "attachments": [Attachment("résumé.pdf", "application/pdf", os.urandom(5000))]},
        {"to": [f"u{i}@x.example" for i in range(50)], "references": " ".join(f"<r{i}@x.example>" for i in range(30)),
         "in_reply_to": "<r29@x.example>"},
    ],
)
def test_verify_passes_after_smtp_data_round_trip(key, dnsfunc, kwargs):
    """The signed bytes survive dot-stuffing and un-stuffing and still verify."""
    signed = sign(message(**kwargs), key)
    data = c.smtp_data_bytes(signed)
    assert b"\r\n.\r\n" not in data[:-3]
    received = unstuff(data)
    assert received == signed
    assert dkim.verify(received, dnsfunc=dnsfunc)


def test_sign_is_deterministic(key):
    """RSA PKCS#1 v1.5 over the same bytes and t= gives the same signature."""
    assert sign(message(), key) == sign(message(), key)


def test_sign_refuses_message_without_from(key):
    """A message without From cannot be signed (From must be in h=)."""
    with pytest.raises(ValueError):
        dkimsign.thd_dkim_sign(b"Subject: x\r\n\r\nbody\r\n", DOMAIN, SELECTOR, key.private_pem, NOW)


def test_sign_refuses_bad_key():
    """Garbage instead of a PEM key → dkim.KeyFormatError."""
    with pytest.raises(dkim.KeyFormatError):
        dkimsign.thd_dkim_sign(message(), DOMAIN, SELECTOR, b"not a key", NOW)


def test_signed_header_names_case_insensitive():
    """Header names are matched case-insensitively."""
    raw = b"FROM: a@x\r\nsubject: s\r\nX-Other: y\r\nREFERENCES: <a@x>\r\n\r\nb\r\n"
    assert dkimsign.signed_header_names(raw) == [b"from", b"subject", b"references", b"from"]


# ---------------------------------------------------------------- deployment keys


def test_deployment_key_created_when_missing(tmp_path):
    """First use creates <data_dir>/dkim/<domain>.pem: PKCS#8, mode 0600, RSA 2048."""
    selector, pem = dkimsign.thd_load_deployment_key(tmp_path, "Shared.Example.", (), "e2a")
    path = tmp_path / "dkim" / "shared.example.pem"
    assert selector == "e2a"
    assert path.read_bytes() == pem
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert serialization.load_pem_private_key(pem, None).key_size == 2048
    again = dkimsign.thd_load_deployment_key(tmp_path, "shared.example", (), "sel2")
    assert again == ("sel2", pem)


def test_deployment_key_configured_entry_wins(tmp_path, key):
    """A dkim.keys entry for the domain is used instead of the data-dir file."""
    key_file = tmp_path / "custom.pem"
    key_file.write_bytes(key.private_pem)
    configured = (DkimKeyConfig("other.example", "x", "/nonexistent"), DkimKeyConfig(DOMAIN, "s1", str(key_file)))
    assert dkimsign.thd_load_deployment_key(tmp_path, DOMAIN.upper(), configured) == ("s1", key.private_pem)
    assert not (tmp_path / "dkim").exists()


def test_deployment_key_refused_when_file_garbage(tmp_path):
    """An existing key file that is not a PEM private key is an error, not silently replaced."""
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "m.example.pem").write_bytes(b"junk")
    with pytest.raises(ValueError):
        dkimsign.thd_load_deployment_key(tmp_path, "m.example")


def test_public_key_matches_generated_key(key):
    """public_key_b64 gives the p= value of the key pair."""
    assert dkimsign.public_key_b64(key.private_pem) == key.public_key_b64
