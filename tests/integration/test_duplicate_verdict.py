"""Issue 15.5: RFC 1047 duplicate suppression never lets a forged copy stand in for the
genuine one. A copy is a duplicate only with the same Message-ID, MAIL FROM, agent, client IP
and verdict; otherwise it is stored with its own verdict."""

from __future__ import annotations

from dataclasses import dataclass

import pytest_twisted

from tests.support.inboundstack import DOMAIN, InboundStack, message, send, trace

BOT = f"bot@{DOMAIN}"
FORGED = trace(spf="fail", dmarc="fail")
GENUINE = trace(spf="pass", dmarc="pass")


@dataclass
class Envelope:
    recipients: tuple[str, ...]
    client_ip: str = "127.0.0.1"
    helo: str = "client.example"
    helo_kind: str = "EHLO"
    tls: bool = False
    mail_from: str = "alice@example.com"


@pytest_twisted.async_yield_fixture
async def stack(db):
    s = await InboundStack(db).setup({"bot": "local"})
    yield s
    await s.close()


async def _copies(db, mid: str) -> list[dict]:
    return await db.fetchall(
        "SELECT id, client_ip, auth_headers->>'X-E2A-Auth-Domain-Check' AS check,"
        " auth_headers->>'X-E2A-Auth-Verified' AS verified FROM messages WHERE email_message_id = %s"
        " ORDER BY created_at",
        (mid,),
    )


@pytest_twisted.ensureDeferred
async def test_forged_copy_first_does_not_suppress_genuine_copy(stack, db):
    """Forged (SPF fail) first, genuine (SPF pass) second, same Message-ID and MAIL FROM: both
    stored, each with its own verdict and id; the genuine sender gets its own id."""
    port = stack.listen()
    mid = "<target@example.com>"
    stack.verifier.default = FORGED
    forged = await send(port, "alice@example.com", [BOT], message(mid))
    stack.verifier.default = GENUINE
    genuine = await send(port, "alice@example.com", [BOT], message(mid))
    assert forged.code == genuine.code == 250
    assert forged.text != genuine.text  # before the fix: the attacker's id, genuine never stored
    rows = await _copies(db, mid)
    assert [(r["check"], r["verified"]) for r in rows] == [
        ("spf=fail; dkim=none; dmarc=fail", "false"),
        ("spf=pass; dkim=none; dmarc=pass", "true"),
    ]
    assert genuine.text.endswith(rows[1]["id"])


@pytest_twisted.ensureDeferred
async def test_true_duplicate_is_still_suppressed(stack, db):
    """Same verdict, same client: the resend gets 250 with the first id and is not stored."""
    port = stack.listen()
    mid = "<resend@example.com>"
    stack.verifier.default = GENUINE
    first = await send(port, "alice@example.com", [BOT], message(mid))
    again = await send(port, "alice@example.com", [BOT], message(mid))
    assert first.code == again.code == 250 and first.text == again.text
    assert len(await _copies(db, mid)) == 1


@pytest_twisted.ensureDeferred
async def test_same_verdict_from_another_client_is_stored(stack, db):
    """A copy from a different client IP is not a resend of the stored one: stored too."""
    stack.verifier.default = GENUINE
    mid = "<two-clients@example.com>"
    first = await stack.pipeline.accept(Envelope((BOT,)), message(mid))
    other = await stack.pipeline.accept(Envelope((BOT,), client_ip="192.0.2.7"), message(mid))
    same = await stack.pipeline.accept(Envelope((BOT,)), message(mid))
    assert first != other and same == first
    assert [r["client_ip"] for r in await _copies(db, mid)] == ["127.0.0.1", "192.0.2.7"]
