"""The RCPT lookup's memory of found agents against PostgreSQL, LISTEN and a real SMTP session
(e2a.smtp.recipients): an agent deleted through the store is forgotten when its revocation
event arrives, and mail whose every recipient was deleted after RCPT is refused at end of data
with nothing stored."""

from __future__ import annotations

import pytest_twisted

from twisted.internet import reactor, task

from e2a.smtp.recipients import AgentRecipients
from e2a.store import agents
from e2a.store.events import CHANNEL_REVOKE, EventListener
from tests.support.inboundstack import DOMAIN, InboundStack, message, send
from tests.support.smtpclient import connect
from tests.support.waiting import wait_for

BOT = f"bot@{DOMAIN}"


@pytest_twisted.async_yield_fixture
async def stack(db):
    s = await InboundStack(db).setup({"bot": "local", "other": "local"})
    yield s
    await s.close()


async def _rcpt_reply(port: int, rcpt: str) -> int:
    client = await connect(port)
    try:
        assert (await client.reply()).code == 220
        assert (await client.command("EHLO client.example")).code == 250
        assert (await client.command("MAIL FROM:<alice@example.com>")).code == 250
        return (await client.command(f"RCPT TO:<{rcpt}>")).code
    finally:
        client.abort()


async def _stored(db, email_message_id: str) -> list[str]:
    rows = await db.fetchall(
        "SELECT agent_id FROM messages WHERE email_message_id = %s ORDER BY agent_id", (email_message_id,)
    )
    return [r["agent_id"] for r in rows]


@pytest_twisted.ensureDeferred
async def test_a_deleted_agent_is_forgotten_when_its_event_arrives(stack, db, db_dsn):
    clock = task.Clock()  # the memory never runs out in this test: only the event can clear it
    recipients = AgentRecipients(db, clock)
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    listener.subscribe(CHANNEL_REVOKE, recipients.on_revoke)
    heard: list[str] = []
    listener.subscribe(CHANNEL_REVOKE, heard.append)
    try:
        port = stack.listen(recipients)
        assert (await send(port, "alice@example.com", [BOT], message())).code == 250
        assert await _rcpt_reply(port, BOT) == 250  # remembered
        assert await agents.delete_agent(db, stack.user_id, BOT) == BOT
        await wait_for(lambda: f"agent\t{BOT}" in heard)
        assert await _rcpt_reply(port, BOT) == 550
        assert await _rcpt_reply(port, f"other@{DOMAIN}") == 250
    finally:
        listener.stop()


@pytest_twisted.ensureDeferred
async def test_mail_whose_recipients_were_all_deleted_after_rcpt_is_refused(stack, db):
    """Before: the accept stored nothing, returned no id and the session logged an error and
    answered 451 (the sender retried the same refusal). Now the end of data answers what RCPT
    would: 550 5.1.1."""
    recipients = AgentRecipients(db, task.Clock())  # remembers, and hears no event
    port = stack.listen(recipients)
    assert (await send(port, "alice@example.com", [BOT], message("<first@example.com>"))).code == 250
    await db.execute("DELETE FROM agents WHERE id = %s", (BOT,))
    reply = await send(port, "alice@example.com", [BOT], message("<second@example.com>"))
    assert (reply.code, reply.text) == (550, "5.1.1 recipient not found")
    assert await _stored(db, "<second@example.com>") == []


@pytest_twisted.ensureDeferred
async def test_a_recipient_deleted_after_rcpt_does_not_stop_the_others(stack, db):
    recipients = AgentRecipients(db, task.Clock())
    port = stack.listen(recipients)
    other = f"other@{DOMAIN}"
    assert (await send(port, "alice@example.com", [BOT, other], message("<first@example.com>"))).code == 250
    await db.execute("DELETE FROM agents WHERE id = %s", (BOT,))
    assert (await send(port, "alice@example.com", [BOT, other], message("<second@example.com>"))).code == 250
    assert await _stored(db, "<second@example.com>") == [other]
