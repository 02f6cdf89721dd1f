"""A local agent's copies after the first are written without the accept's read: the process
remembers the agent and its owner's newest secret, and the copy's INSERT checks them and the
duplicate on the database's current rows and computes the conversation. Whatever changed in
between, the copy comes out as the read would have made it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import pytest_twisted

from twisted.internet import threads

from e2a.inbound import InboundPipeline
from e2a.mailauth import authheaders
from e2a.smtp.replies import MessageRejected
from e2a.store import accounts, messages
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.inboundstack import DOMAIN, MX, Envelope, InboundStack, message

BOT = f"bot@{DOMAIN}"


@pytest_twisted.async_yield_fixture
async def stack(db):
    s = await InboundStack(db).setup({"bot": "local"})
    yield s
    await s.close()


@pytest.fixture
def reads(monkeypatch):
    """The accept's reads, counted (one per recipient of an accept that reads)."""
    calls: list[str] = []
    read = messages.inbound_context_txn

    async def counting(txn, recipient, *args, **kwargs):
        calls.append(recipient)
        return await read(txn, recipient, *args, **kwargs)

    monkeypatch.setattr(messages, "inbound_context_txn", counting)
    return calls


@pytest.fixture
def refusals(monkeypatch):
    """The writes refused for a remembered context that no longer held (or a resend)."""
    seen: list[BaseException] = []
    stale = messages.remembered_context_stale

    def counting(error: BaseException) -> bool:
        if stale(error):
            seen.append(error)
            return True
        return False

    monkeypatch.setattr(messages, "remembered_context_stale", counting)
    return seen


def _another_process(stack: InboundStack) -> InboundPipeline:
    """A second pipeline on the same database, as another e2a process has."""
    return InboundPipeline(
        stack.db, stack.verifier, TEST_MASTER_KEY, MX, MX, to_trace=lambda v: v, in_thread=threads.deferToThread
    )


async def _row(db, message_id: str) -> dict:
    return await db.fetchone(
        "SELECT conversation_id, auth_headers, raw_message FROM messages WHERE id = %s", (message_id,)
    )


@pytest_twisted.ensureDeferred
async def test_later_copies_are_written_without_the_read_and_thread_as_the_read_would(stack, db, reads):
    """The first copy reads; the next ones do not, and still find the conversation of the
    message they reply to (outbound by its Message-ID, inbound by its Message-ID) or none."""
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, status, smtp_message_id, conversation_id)"
        " VALUES ('msg_out_1', %s, %s, 'outbound', 'sent', '<out1@mx.e2a.test>', 'conv_x')",
        (BOT, stack.user_id),
    )
    first = await stack.pipeline.accept(Envelope((BOT,)), message("<m1@example.com>", extra="In-Reply-To: <nobody@x>\r\n"))
    assert reads == [BOT]
    reply = await stack.pipeline.accept(
        Envelope((BOT,)), message("<m2@example.com>", extra="In-Reply-To: <out1@mx.e2a.test>\r\n")
    )
    await db.execute("UPDATE messages SET conversation_id = 'conv_y' WHERE id = %s", (first,))
    follow_up = await stack.pipeline.accept(
        Envelope((BOT,)), message("<m3@example.com>", extra="References: <zzz@x> <m1@example.com>\r\n")
    )
    unthreaded = await stack.pipeline.accept(Envelope((BOT,)), message("<m4@example.com>"))
    assert reads == [BOT]
    assert [(await _row(db, i))["conversation_id"] for i in (first, reply, follow_up, unthreaded)] == [
        "conv_y", "conv_x", "conv_y", "",
    ]


@pytest_twisted.ensureDeferred
async def test_resends_to_the_process_that_stored_the_message_go_through_the_read(stack, db, reads, refusals):
    """The process remembers which messages it stored: their resends are read (and suppressed
    there), never refused by an INSERT, however often a client repeats them."""
    mid = "<resend@example.com>"
    first = await stack.pipeline.accept(Envelope((BOT,)), message(mid))
    again = [await stack.pipeline.accept(Envelope((BOT,)), message(mid)) for _ in range(3)]
    assert again == [first] * 3
    assert reads == [BOT] * 4 and refusals == []
    count = await db.fetchone("SELECT count(*) AS n FROM messages WHERE email_message_id = %s", (mid,))
    assert count["n"] == 1


@pytest_twisted.ensureDeferred
async def test_a_resend_to_another_process_is_refused_by_its_insert_and_suppressed(stack, db, reads, refusals):
    """Another process, which remembers the agent but never saw the message, writes the resend
    with its remembered context: the INSERT finds the stored copy and refuses, nothing is
    written, and the read answers the first copy's id. A second resend there is read."""
    other = _another_process(stack)
    await other.accept(Envelope((BOT,)), message("<warm@example.com>"))
    mid = "<resend-elsewhere@example.com>"
    first = await stack.pipeline.accept(Envelope((BOT,)), message(mid))
    assert await other.accept(Envelope((BOT,)), message(mid)) == first
    assert len(refusals) == 1 and "duplicate" in str(refusals[0])
    assert await other.accept(Envelope((BOT,)), message(mid)) == first
    assert len(refusals) == 1
    count = await db.fetchone("SELECT count(*) AS n FROM messages WHERE email_message_id = %s", (mid,))
    assert count["n"] == 1


@pytest_twisted.ensureDeferred
async def test_a_new_secret_signs_the_next_copy_while_the_old_one_stays(stack, db, reads, refusals):
    """Rotation's first step (a new secret; the old one kept while receivers switch): the next
    copy is signed with the newest secret, as the read would sign it."""
    (old,) = await accounts.active_secrets(db, TEST_MASTER_KEY, stack.user_id)
    await stack.pipeline.accept(Envelope((BOT,)), message("<n1@example.com>"))
    _created, new = await accounts.create_signing_secret(db, TEST_MASTER_KEY, stack.user_id, "next")
    after = await stack.pipeline.accept(Envelope((BOT,)), message("<n2@example.com>"))
    assert len(refusals) == 1 and "agent" in str(refusals[0])
    row = await _row(db, after)
    now = datetime.now(UTC)
    authheaders.verify(row["auth_headers"], bytes(row["raw_message"]), [new], now)
    with pytest.raises(authheaders.VerificationError):
        authheaders.verify(row["auth_headers"], bytes(row["raw_message"]), [old], now)


@pytest_twisted.ensureDeferred
async def test_a_rotated_secret_signs_the_next_copy(stack, db, reads):
    """Rotation (a new secret, the old one deleted) between two copies: the second is signed
    with the new secret only, as a receiver holding only the new one requires."""
    (old,) = await accounts.active_secrets(db, TEST_MASTER_KEY, stack.user_id)
    before = await stack.pipeline.accept(Envelope((BOT,)), message("<r1@example.com>"))
    created, new = await accounts.create_signing_secret(db, TEST_MASTER_KEY, stack.user_id, "rotated")
    others = await db.fetchone("SELECT id FROM signing_secrets WHERE id <> %s", (created.id,))
    await accounts.delete_signing_secret(db, stack.user_id, others["id"])
    after = await stack.pipeline.accept(Envelope((BOT,)), message("<r2@example.com>"))
    assert reads == [BOT, BOT]
    now = datetime.now(UTC)
    for message_id, secret, other in ((before, old, new), (after, new, old)):
        row = await _row(db, message_id)
        authheaders.verify(row["auth_headers"], bytes(row["raw_message"]), [secret], now)
        with pytest.raises(authheaders.VerificationError):
            authheaders.verify(row["auth_headers"], bytes(row["raw_message"]), [other], now)
    # and the new secret is remembered from the read that found it
    await stack.pipeline.accept(Envelope((BOT,)), message("<r3@example.com>"))
    assert reads == [BOT, BOT]


@pytest_twisted.ensureDeferred
async def test_an_agent_deleted_after_being_remembered_gets_nothing(stack, db, reads):
    """The agent is deleted between two copies: the second is refused as at RCPT, none stored."""
    await stack.pipeline.accept(Envelope((BOT,)), message("<d1@example.com>"))
    await db.execute("DELETE FROM agents WHERE id = %s", (BOT,))
    with pytest.raises(MessageRejected):
        await stack.pipeline.accept(Envelope((BOT,)), message("<d2@example.com>"))
    assert await db.fetchall("SELECT id FROM messages WHERE email_message_id = '<d2@example.com>'") == []


@pytest_twisted.ensureDeferred
async def test_an_agent_switched_to_cloud_gets_a_delivery_job(stack, db, reads):
    """Local → cloud between two copies: the second gets its webhook job, as any cloud copy;
    copies to a cloud agent keep the read."""
    await stack.pipeline.accept(Envelope((BOT,)), message("<c1@example.com>"))
    await db.execute(
        "UPDATE agents SET agent_mode = 'cloud', webhook_url = 'http://127.0.0.1:9/hook', webhook_status = 'active'"
        " WHERE id = %s",
        (BOT,),
    )
    second = await stack.pipeline.accept(Envelope((BOT,)), message("<c2@example.com>"))
    third = await stack.pipeline.accept(Envelope((BOT,)), message("<c3@example.com>"))
    assert reads == [BOT, BOT, BOT]
    jobs = await db.fetchall("SELECT message_id FROM deliveries ORDER BY created_at")
    assert [j["message_id"] for j in jobs] == [second, third]


@pytest_twisted.ensureDeferred
async def test_one_remembered_recipient_out_of_date_leaves_no_copy_of_the_others_twice(stack, db, refusals):
    """Two recipients, one of them deleted after being remembered: the refused attempt wrote
    nothing, so the other agent gets exactly one copy. The message has no Message-ID, so a
    copy left behind by the refused attempt could not pass for a resend of the rerun's."""
    await stack.add_agents({"helper": "local"})
    helper = f"helper@{DOMAIN}"
    bare = b"From: Alice <alice@example.com>\r\nTo: bot@acme.test\r\nSubject: no id\r\n\r\nHi\r\n"
    await stack.pipeline.accept(Envelope((BOT, helper)), bare)
    await db.execute("DELETE FROM agents WHERE id = %s", (BOT,))
    second = await stack.pipeline.accept(Envelope((BOT, helper)), bare + b"again\r\n")
    assert len(refusals) == 1
    rows = await db.fetchall("SELECT id, agent_id FROM messages WHERE subject = 'no id' ORDER BY created_at")
    # the bot's first copy went with the agent; the helper has its two, the second answered
    assert [r["agent_id"] for r in rows] == [helper, helper] and rows[-1]["id"] == second
