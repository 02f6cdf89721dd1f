"""The group commit on the real accept path: SMTP messages that finish while a commit is in
flight share the next transaction, and each still gets its own 250, its own stored copy and
its own notification; a message whose insert fails in a shared transaction fails alone."""

from __future__ import annotations

import psycopg2
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.store.database import GroupCommit
from e2a.store.events import CHANNEL_INBOUND, EventListener
from tests.support.inboundstack import DOMAIN, InboundStack, message, send
from tests.support.waiting import wait_for

BOT = f"bot@{DOMAIN}"
SENDERS = 10


@pytest_twisted.async_yield_fixture
async def stack(db):
    # A commit held on a lock below must not time out of the slot: that path has its own
    # tests (tests/storage/test_database_group_commit.py).
    db._commits = GroupCommit(db, lock_timeout=60)
    s = await InboundStack(db).setup({"bot": "local"})
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_messages_share_a_commit_and_each_is_stored_and_announced(stack, db, db_dsn):
    """10 senders at once while the first accept's commit waits on a lock: the other nine are
    committed together in one transaction; every sender gets 250 with its own id, every copy
    is stored once and every local-agent notification arrives."""
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    notified: list[str] = []
    listener.subscribe(CHANNEL_INBOUND, notified.append)
    port = stack.listen()
    commits = db._commits
    holder = psycopg2.connect(db_dsn)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE messages IN SHARE MODE")  # reads go on, inserts wait
    sends = [
        defer.Deferred.fromCoroutine(send(port, "alice@example.com", [BOT], message(f"<g{i}@example.com>")))
        for i in range(SENDERS)
    ]
    await wait_for(lambda: commits._in_flight == 1 and len(commits._pending) == SENDERS - 1, timeout=10, step=0.02)
    holder.rollback()
    holder.close()
    replies = await defer.gatherResults(sends)
    try:
        assert [r.code for r in replies] == [250] * SENDERS
        ids = {r.text.rsplit(" ", 1)[1] for r in replies}
        assert len(ids) == SENDERS
        rows = await db.fetchall("SELECT id, email_message_id FROM messages WHERE direction = 'inbound'")
        assert {r["id"] for r in rows} == ids
        assert sorted(r["email_message_id"] for r in rows) == sorted(f"<g{i}@example.com>" for i in range(SENDERS))
        assert (commits.commits, commits.batches) == (2, SENDERS)
        await wait_for(lambda: len(notified) == SENDERS, timeout=10, step=0.02)
        assert {n.split("\t")[1] for n in notified} == ids
    finally:
        listener.stop()


@pytest_twisted.ensureDeferred
async def test_failing_insert_in_a_shared_commit_fails_only_its_message(stack, db, db_dsn):
    """One of the queued messages' inserts breaks (a trigger refuses it): its sender gets a
    temporary failure and nothing is stored for it; the messages that shared its transaction
    are resent on their own and stored."""
    await db.execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF NEW.email_message_id = '<poison@example.com>' THEN"
        " RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$"
    )
    await db.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
    )
    port = stack.listen()
    commits = db._commits
    holder = psycopg2.connect(db_dsn)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE messages IN SHARE MODE")
    names = ["<first@example.com>", "<a@example.com>", "<poison@example.com>", "<b@example.com>"]
    sends = {}
    for name in names:
        sends[name] = defer.Deferred.fromCoroutine(send(port, "alice@example.com", [BOT], message(name)))
        if name == names[0]:
            await wait_for(lambda: commits._in_flight == 1, timeout=10, step=0.02)
    await wait_for(lambda: len(commits._pending) == 3, timeout=10, step=0.02)
    holder.rollback()
    holder.close()
    replies = {name: await d for name, d in sends.items()}
    poison = replies["<poison@example.com>"]
    assert (poison.code, poison.enhanced) == (451, "4.3.0"), poison
    for name in ("<first@example.com>", "<a@example.com>", "<b@example.com>"):
        assert replies[name].code == 250, replies[name]
    rows = await db.fetchall("SELECT email_message_id FROM messages WHERE direction = 'inbound' ORDER BY 1")
    assert [r["email_message_id"] for r in rows] == ["<a@example.com>", "<b@example.com>", "<first@example.com>"]
