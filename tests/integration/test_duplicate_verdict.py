"""Issue 15.5: RFC 1047 duplicate suppression never lets a forged copy stand in for the
genuine one. A copy is a duplicate only with the same Message-ID, MAIL FROM, agent, client IP,
verdict and received content (SHA-256); otherwise it is stored with its own verdict."""

from __future__ import annotations

import pytest_twisted

from e2a.inbound import LARGE_CONTENT
from tests.support.inboundstack import DOMAIN, Envelope, InboundStack, message, send, trace

BOT = f"bot@{DOMAIN}"
FORGED = trace(spf="fail", dmarc="fail")
GENUINE = trace(spf="pass", dmarc="pass")


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


@pytest_twisted.ensureDeferred
async def test_same_client_same_verdict_different_content_is_stored(stack, db):
    """A forged copy from the SAME client IP with the SAME verdict (a shared relay), sent first
    with the genuine Message-ID: the genuine copy differs in content, so both are stored and
    the genuine sender gets its own id (before the fix: the forger's id, genuine lost)."""
    port = stack.listen()
    mid = "<shared-relay@example.com>"
    stack.verifier.default = GENUINE
    forged = await send(port, "alice@example.com", [BOT], message(mid, body="Wire the money to X\r\n"))
    genuine = await send(port, "alice@example.com", [BOT], message(mid, body="Lunch at noon?\r\n"))
    assert forged.code == genuine.code == 250
    assert forged.text != genuine.text
    rows = await _copies(db, mid)
    assert len(rows) == 2 and genuine.text.endswith(rows[1]["id"])
    stored = await db.fetchone("SELECT raw_message FROM messages WHERE id = %s", (rows[1]["id"],))
    assert bytes(stored["raw_message"]).endswith(b"Lunch at noon?\r\n")


@pytest_twisted.ensureDeferred
async def test_true_resend_after_forged_copy_is_suppressed_once(stack, db):
    """Forged copy first, then the genuine one, then the genuine one's resend (same bytes, its
    250 was lost): the resend gets the genuine id and adds no row; a second resend neither."""
    port = stack.listen()
    mid = "<resend-after-forgery@example.com>"
    stack.verifier.default = GENUINE
    await send(port, "alice@example.com", [BOT], message(mid, body="forged\r\n"))
    genuine = await send(port, "alice@example.com", [BOT], message(mid, body="genuine\r\n"))
    again = await send(port, "alice@example.com", [BOT], message(mid, body="genuine\r\n"))
    third = await send(port, "alice@example.com", [BOT], message(mid, body="genuine\r\n"))
    assert genuine.code == again.code == third.code == 250
    assert again.text == genuine.text == third.text
    assert len(await _copies(db, mid)) == 2


@pytest_twisted.ensureDeferred
async def test_large_resend_hashed_in_thread_is_suppressed_and_changed_copy_stored(stack, db):
    """Content above LARGE_CONTENT is hashed off the reactor with the same result: the same
    bytes again are suppressed, one changed byte is stored."""
    stack.verifier.default = GENUINE
    mid = "<large@example.com>"
    body = ("x" * 98 + "\r\n") * (LARGE_CONTENT // 100 + 10)
    first = await stack.pipeline.accept(Envelope((BOT,)), message(mid, body=body))
    again = await stack.pipeline.accept(Envelope((BOT,)), message(mid, body=body))
    changed = await stack.pipeline.accept(Envelope((BOT,)), message(mid, body="y" + body[1:]))
    assert again == first and changed != first
    assert len(await _copies(db, mid)) == 2
