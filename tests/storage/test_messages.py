"""Message store contract on PostgreSQL: the one InboundMessage shape written and read back,
the inbox, WebSocket summaries, reply sources, retention purges and feedback."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import psycopg2
import pytest
import pytest_twisted

from twisted.internet.defer import Deferred

from e2a.store import feedback as feedback_store
from e2a.store import messages as message_store
from e2a.store.database import DollarQuoted, octets_params
from e2a.store.models import InboundMessage, InboundSummary, ReplySource
from tests.storage.storehelpers import MAIL_OCTETS, stored_octets, user_with_agent
from tests.support.waiting import wait_for

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _message(user_id: str, agent_id: str, n: int = 1, **changes) -> InboundMessage:
    values = dict(
        id=f"msg_{n:032x}",
        agent_id=agent_id,
        user_id=user_id,
        status="unread",
        route="smtp",
        sender="alice@example.com",
        display_from="Alice <alice@example.com>",
        recipient=agent_id,
        envelope_from="bounce@example.com",
        client_ip="192.0.2.1",
        subject=f"hello {n}",
        to_addrs=[agent_id],
        cc_addrs=None,
        email_message_id=f"<m{n}@example.com>",
        in_reply_to="",
        references_ids="",
        conversation_id="conv_1",
        auth_headers={"X-E2A-Auth-Verified": "true"},
        raw_message=b"Subject: hi\r\n\r\nbody",
        created_at=T0.replace(minute=n),
    )
    values.update(changes)
    return InboundMessage(**values)


async def _insert(db, message: InboundMessage) -> None:
    await db.run("insert", message_store.insert_inbound_txn, message)


@pytest_twisted.ensureDeferred
async def test_inbound_message_round_trips_through_insert_and_read(db):
    """What insert_inbound_txn writes, read_inbound returns field for field (then marked read)."""
    user_id, agent = await user_with_agent(db)
    message = _message(user_id, agent)
    await _insert(db, message)
    unread = await message_store.read_inbound(db, agent, message.id, mark_read=False)
    assert unread == message
    read = await message_store.read_inbound(db, agent, message.id)
    assert read is not None and read.status == "read"
    assert await message_store.read_inbound(db, agent, "msg_" + "f" * 32) is None


@pytest.mark.parametrize(
    ("raw", "as_text"),
    [
        (b"Subject: hi\r\n\r\nbody\r\n", True),
        (b"", True),
        (b"quote ' backslash \\ E'\\x41' $$ -- ; \\000 \\\\\r\n", True),
        (b"\x7f\x01\t\r\n", True),  # every 7-bit octet but NUL is text
        (b"$ $$ $e2a$ e2a_octets$ $e2a_octets cut short", True),  # dollars, the tag in parts
        (b"$", True),
        (b"a body with $e2a_octets$ in it", False),  # the dollar-quote's tag
        (b"ends in $e2a_octets", False),  # with the closing tag's '$' it would end the constant
        (b"caf\xc3\xa9 (8BITMIME, UTF-8)", False),
        (b"\xff\xfe not UTF-8", False),
        (b"a NUL \x00 in the content", False),
        (None, False),
    ],
)
def test_octets_params_send_7bit_content_as_text_and_the_rest_as_bytes(raw, as_text):
    """Exactly one parameter carries the octets: a dollar-quoted string constant for 7-bit
    content without NUL that cannot end the constant early (none for no content)."""
    params = octets_params("raw_message", raw)
    if as_text:
        assert params == {"raw_message_text": DollarQuoted(raw), "raw_message": None}
        assert params["raw_message_text"].getquoted() == b"$e2a_octets$" + raw + b"$e2a_octets$"
    else:
        assert params == {"raw_message_text": None, "raw_message": raw}


@pytest_twisted.ensureDeferred
async def test_stored_bytes_are_the_received_bytes_whichever_parameter_carries_them(db):
    """Every kind of content comes back octet for octet, by read and by PostgreSQL's own hash,
    through the text form (quotes, backslashes and what would be escapes elsewhere) and the
    bytea form (8-bit octets, NUL, invalid UTF-8)."""
    user_id, agent = await user_with_agent(db)
    for n, raw in enumerate(MAIL_OCTETS, start=1):
        # Both ways the statement runs: plain SQL in a transaction, and the accept's way, the
        # prepared statement's EXECUTE in a batched (group-committed) write.
        for k, write in enumerate((db.run, db.run_batched)):
            message = _message(user_id, agent, n, id=f"msg_{k}{n:031x}", raw_message=raw)
            await write("insert", message_store.insert_inbound_txn, message)
            stored = await message_store.read_inbound(db, agent, message.id, mark_read=False)
            assert stored is not None and stored.raw_message == raw
            assert await stored_octets(db, message.id, "raw_message") == (len(raw), hashlib.sha256(raw).hexdigest())


@pytest_twisted.ensureDeferred
async def test_list_inbox_pages_oldest_first_without_bytes(db):
    """list_inbox pages by (created_at, id), filters by status and leaves raw_message empty."""
    user_id, agent = await user_with_agent(db)
    for n in (1, 2, 3):
        await _insert(db, _message(user_id, agent, n))
    page, more = await message_store.list_inbox(db, agent, "unread", 2, None)
    assert [m.id for m in page] == [f"msg_{1:032x}", f"msg_{2:032x}"] and more
    assert all(m.raw_message == b"" for m in page) and page[0].envelope_from == "bounce@example.com"
    rest, more = await message_store.list_inbox(db, agent, "all", 2, (page[-1].created_at, page[-1].id))
    assert [m.id for m in rest] == [f"msg_{3:032x}"] and not more


@pytest_twisted.ensureDeferred
async def test_unread_page_and_fetch_summary_give_notification_rows(db):
    """The WebSocket drain reads unread summaries in order; a live push finds one by any case."""
    user_id, agent = await user_with_agent(db)
    await _insert(db, _message(user_id, agent, 1))
    await _insert(db, _message(user_id, agent, 2, status="read"))
    page = await message_store.unread_page(db, agent, None, 10)
    assert page == [
        InboundSummary(f"msg_{1:032x}", "conv_1", "Alice <alice@example.com>", agent, "hello 1", T0.replace(minute=1))
    ]
    assert await message_store.fetch_summary(db, agent.upper(), f"msg_{2:032x}") is not None
    assert await message_store.fetch_summary(db, agent, "msg_" + "f" * 32) is None


@pytest_twisted.ensureDeferred
async def test_get_reply_source_reads_the_answered_message(db):
    """A reply reads the stored bytes and threading fields of the agent's own inbound message."""
    user_id, agent = await user_with_agent(db)
    message = _message(user_id, agent)
    await _insert(db, message)
    assert await message_store.get_reply_source(db, agent, message.id) == ReplySource(
        message.raw_message, message.subject, message.display_from, "conv_1", message.email_message_id
    )
    assert await message_store.get_reply_source(db, "other@agents.test", message.id) is None


@pytest_twisted.ensureDeferred
async def test_purges_drop_old_mail_but_never_holds(db):
    """Retention purges old inbound and released outbound mail, never a pending hold."""
    user_id, agent = await user_with_agent(db)
    await _insert(db, _message(user_id, agent, 1))
    await db.execute("UPDATE messages SET created_at = now() - interval '40 days'")
    for mid, status in (("msg_out_sent", "sent"), ("msg_out_held", "pending_approval")):
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, created_at)"
            " VALUES (%s, %s, %s, 'outbound', %s, now() - interval '40 days')",
            (mid, agent, user_id, status),
        )
    await message_store.purge_inbound_older_than(db, 30)
    await message_store.purge_outbound_older_than(db, 30)
    assert {r["id"] for r in await db.fetchall("SELECT id FROM messages")} == {"msg_out_held"}


@pytest_twisted.ensureDeferred
async def test_feedback_is_stored_and_purged(db):
    """Feedback is written under its id and purged after the retention period."""
    await feedback_store.insert_feedback(
        db, "fb_1", user_id=None, email="a@example.com", category="bug", message="hi", client_ip="192.0.2.1"
    )
    row = await db.fetchone("SELECT email, category, message, client_ip FROM feedback WHERE id = 'fb_1'")
    assert dict(row) == {"email": "a@example.com", "category": "bug", "message": "hi", "client_ip": "192.0.2.1"}
    await feedback_store.purge_older_than(db, 30)
    assert await db.fetchone("SELECT 1 FROM feedback") is not None
    await db.execute("UPDATE feedback SET created_at = now() - interval '31 days'")
    await feedback_store.purge_older_than(db, 30)
    assert await db.fetchone("SELECT 1 FROM feedback") is None


@pytest_twisted.ensureDeferred
async def test_of_two_concurrent_acks_only_one_marks_the_message_read(db, db_dsn):
    """An ack that finds the message unread in its snapshot while another ack's update is still
    uncommitted waits for it and then reports nothing newly read (a second WebSocket ack of
    the same message is answered ``unknown_message``, whichever process serves it)."""
    user_id, agent = await user_with_agent(db, mode="local")
    message = _message(user_id, agent)
    await _insert(db, message)
    other = psycopg2.connect(db_dsn)
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE messages SET status = 'read', read_at = now() WHERE id = %s", (message.id,))
        second = Deferred.fromCoroutine(message_store.mark_read(db, agent, message.id))

        def waiting() -> bool:
            with psycopg2.connect(db_dsn) as probe, probe.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'UPDATE messages SET status%%'"
                )
                return cur.fetchone()[0] > 0

        await wait_for(waiting, timeout=10, step=0.02)
        other.commit()
        assert await second is False
    finally:
        other.close()
    assert not await message_store.mark_read(db, agent, message.id)
