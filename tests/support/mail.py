"""Test mail: DKIM keys published in the local DNS zone, signed messages, an SMTP send helper."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import smtpclient


@dataclass(frozen=True)
class DkimTestKey:
    domain: str
    selector: str
    private_pem: bytes
    txt_record: str

    @classmethod
    def generate(cls, domain: str, selector: str = "sel") -> DkimTestKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(domain, selector, pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode())

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def sign(self, message: bytes) -> bytes:
        sig = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return sig + message


def make_message(
    *,
    from_addr: str,
    to_addr: str,
    subject: str = "Hello",
    body: str = "Hi there.\r\n",
    message_id: str = "<m1@example.org>",
    extra_headers: str = "",
) -> bytes:
    text = (
        f"From: Alice <{from_addr}>\r\n"
        f"To: {to_addr}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\n"
        f"{extra_headers}"
        "\r\n"
        f"{body}"
    )
    return text.encode()


def dot_stuff(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


async def send_mail(port: int, mail_from: str, rcpts: list[str], message: bytes, helo: str = "client.example.org"):
    """One SMTP transaction; returns the final reply (after the dot)."""
    client = await smtpclient.connect(port)
    await client.reply()  # greeting
    r = await client.command(f"EHLO {helo}")
    assert r.code == 250, r
    r = await client.command(f"MAIL FROM:<{mail_from}>")
    assert r.code == 250, r
    for rcpt in rcpts:
        r = await client.command(f"RCPT TO:<{rcpt}>")
        if r.code != 250:
            await client.command("QUIT")
            return r
    r = await client.command("DATA")
    assert r.code == 354, r
    body = dot_stuff(message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    client.send(body + b".\r\n")
    final = await client.reply()
    await client.command("QUIT")
    await client.wait_closed()
    return final
