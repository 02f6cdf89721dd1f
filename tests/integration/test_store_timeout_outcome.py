"""Issue 15.2: the reply at ``smtp.store_timeout`` follows the transaction's real outcome.

The attack: make storing slow (a lock held by someone else, or a reactor busy with another
sender's CPU work while a statement's answer is pending) so ``store_timeout`` fires mid-
transaction. Before the fix the session answered 451 at once while the accept coroutine went
on and committed (txpostgres' cancel raises ``_CancelInProgress`` and stops nothing): the
sender retried a message that was already stored. Now every reply matches the rows.
"""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.abort import Aborted
from e2a.smtp import session as smtp_session
from e2a.store.database import BatchTxn, _BackendCanceller
from tests.support.inboundstack import DOMAIN, InboundStack, message, send

BOT = f"bot@{DOMAIN}"
STORE_TIMEOUT = 1


@pytest_twisted.async_yield_fixture
async def stack(db):
    s = await InboundStack(db).setup({"bot": "local", "other": "local"})
    yield s
    await s.close()


async def _copies(db, message_id: str) -> int:
    row = await db.fetchone("SELECT count(*) AS n FROM messages WHERE email_message_id = %s", (message_id,))
    return int(row["n"])


async def _warm(port: int) -> None:
    """Two messages to both agents first: the pooled connection that sends the writes has then
    prepared their statements, so the write query itself goes out as soon as ``BatchTxn.send``
    starts. The first is written after the accept's read, the second with the agents the
    pipeline remembered (e2a.inbound), as the messages under test are."""
    for n in (1, 2):
        reply = await send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message(f"<warm-up-{n}@x>"))
        assert reply.code == 250, reply


def _stall_reactor(dsn: str, seconds: float) -> None:
    """Block the reactor thread like a CPU-heavy accept of another sender would (a slow
    statement on a connection of the test's own, made slow on purpose)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(%s)", (seconds,))
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_store_timeout_while_write_blocked_by_lock_rolls_back_then_451(stack, db, db_dsn):
    """A lock held elsewhere blocks the commit past store_timeout: the write is cancelled in
    PostgreSQL, 451, and no copy exists — not even after the lock goes away."""
    port = stack.listen(store_timeout=STORE_TIMEOUT)
    holder = psycopg2.connect(db_dsn)
    try:
        with holder.cursor() as cur:
            # INSERT INTO messages checks its agent FK with FOR KEY SHARE: blocked by this lock.
            cur.execute("SELECT id FROM agents WHERE id = %s FOR UPDATE", (BOT,))
        reply = await send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message("<locked@x>"))
        assert reply.code == 451 and reply.enhanced == "4.3.0", reply
    finally:
        holder.rollback()
        holder.close()
    await task.deferLater(reactor, 0.3, lambda: None)  # a torn commit would show up now
    assert await _copies(db, "<locked@x>") == 0
    # The pooled connection whose statement was cancelled is sound: the retry is stored.
    reply = await send(port, "alice@example.com", [BOT], message("<locked@x>"))
    assert reply.code == 250, reply
    assert await _copies(db, "<locked@x>") == 1


@pytest.mark.parametrize(("where", "expected"), [("read", 451), ("commit", 250)])
@pytest_twisted.ensureDeferred
async def test_store_timeout_with_answer_pending_reply_matches_rows(stack, db, db_dsn, monkeypatch, where, expected):
    """store_timeout expires while a statement's answer waits behind a busy reactor: a read
    → the transaction stops before its writes (451, 0 rows); the commit → it won the race
    (250 with the stored id). Never 451 for stored copies (the old behaviour)."""
    port = stack.listen(store_timeout=STORE_TIMEOUT)
    await _warm(port)
    stack.pipeline.forget_agents()  # both recipients are read, as the stall below needs
    stalled: list[str] = []
    reads: list[str] = []
    original_read, original_send = BatchTxn.fetchall_prepared, BatchTxn.send

    async def read(self, statement, params):
        d = defer.Deferred.fromCoroutine(original_read(self, statement, params))  # query sent now
        reads.append(statement.name)
        # The second recipient's read: the first one's answer came back through the reactor,
        # so the session's store timer is running (the accept starts synchronously).
        if where == "read" and not stalled and reads.count("e2a_inbound_context") == 2:
            stalled.append(where)
            _stall_reactor(db_dsn, STORE_TIMEOUT + 0.5)
            # txpostgres may read the answer, already there, in the same reactor step as the
            # stall ends, before the due store timer runs: give the timer its turn first, so
            # the abort always lands between this read and the writes.
            await task.deferLater(reactor, 0, lambda: None)
        return await d

    async def send_now(self, writes, first=None):
        d = defer.Deferred.fromCoroutine(original_send(self, writes, first))  # the writes are sent now
        if where == "commit" and not stalled:
            stalled.append(where)
            _stall_reactor(db_dsn, STORE_TIMEOUT + 0.5)
        return await d

    monkeypatch.setattr(BatchTxn, "fetchall_prepared", read)
    monkeypatch.setattr(BatchTxn, "send", send_now)
    reply = await send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message(f"<{where}@x>"))
    assert stalled == [where]
    await task.deferLater(reactor, 0.3, lambda: None)
    copies = await _copies(db, f"<{where}@x>")
    assert reply.code == expected, reply
    if reply.code == 250:
        assert copies == 2
        first = reply.text.rsplit(" ", 1)[1]
        assert await db.fetchone("SELECT id FROM messages WHERE id = %s", (first,)) is not None
    else:
        assert copies == 0


@pytest_twisted.ensureDeferred
async def test_lock_released_around_store_timeout_replies_match_rows(stack, db, db_dsn):
    """20 messages, staggered, all blocked by a lock that goes away near their store_timeout:
    whatever mix of 250 and 451 comes out, 0 mismatches between replies and stored rows."""
    port = stack.listen(store_timeout=STORE_TIMEOUT)
    holder = psycopg2.connect(db_dsn)
    with holder.cursor() as cur:
        cur.execute("SELECT id FROM agents WHERE id = %s FOR UPDATE", (BOT,))
    # A real lock on a real PostgreSQL released near the real store timeout: the race under
    # test is between the database and the timer, which a fake clock cannot stage.
    reactor.callLater(STORE_TIMEOUT + 0.1, holder.rollback)  # allow-sleep
    sends = []
    for i in range(20):
        sends.append(defer.Deferred.fromCoroutine(
            send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message(f"<race{i}@x>"))
        ))
        await task.deferLater(reactor, 0.01, lambda: None)
    replies = await defer.gatherResults(sends)
    holder.close()
    await task.deferLater(reactor, 0.3, lambda: None)
    mismatches = []
    for i, reply in enumerate(replies):
        copies = await _copies(db, f"<race{i}@x>")
        if (reply.code, copies) not in ((250, 2), (451, 0)):
            mismatches.append((i, reply.code, copies))
    codes = [r.code for r in replies]
    print(f"\n250: {codes.count(250)}, 451: {codes.count(451)}, mismatches: {len(mismatches)}")
    assert set(codes) <= {250, 451}
    assert mismatches == []


async def _assert_250_with_stored_copies(db, reply, mid: str) -> None:
    await task.deferLater(reactor, 0.3, lambda: None)
    copies = await _copies(db, mid)
    assert (reply.code, copies) == (250, 2), (reply, copies)  # before the fix: (451, 2)
    first = reply.text.rsplit(" ", 1)[1]
    assert await db.fetchone("SELECT id FROM messages WHERE id = %s", (first,)) is not None


@pytest_twisted.ensureDeferred
async def test_cancel_request_slower_than_grace_after_commit_answers_250(stack, db, monkeypatch):
    """Residual of 15.2: the abort is set while the writes are in flight; they commit, but
    the cancel request does not go through within ABORT_GRACE, so the
    accept is given up. The session reads whether the first id is stored: 250 with it."""
    monkeypatch.setattr(smtp_session, "ABORT_GRACE", 0.5)
    port = stack.listen(store_timeout=STORE_TIMEOUT)
    held: defer.Deferred[None] = defer.Deferred()  # the cancel request, stuck on its way
    cancels: list[str] = []

    def on_abort(self):
        if self._running and self._sent is None:
            cancels.append("sent")
            self._sent = held

    await _warm(port)
    original_send = BatchTxn.send
    stalled: list[str] = []

    async def send_now(self, writes, first=None):
        d = defer.Deferred.fromCoroutine(original_send(self, writes, first))  # the writes are sent now
        if not stalled:
            stalled.append("commit")
            # The abort is set while the writes are in flight (as store_timeout would; the
            # session's own timer then finds it set and starts ABORT_GRACE).
            self.canceller.abort.request()
        return await d

    monkeypatch.setattr(_BackendCanceller, "_on_abort", on_abort)
    monkeypatch.setattr(BatchTxn, "send", send_now)
    try:
        reply = await send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message("<slow-cancel@x>"))
    finally:
        held.callback(None)  # ignored once the give-up cancelled it
    assert stalled == ["commit"] and cancels == ["sent"]
    await _assert_250_with_stored_copies(db, reply, "<slow-cancel@x>")


@pytest_twisted.ensureDeferred
async def test_canceled_reported_after_commit_applied_answers_250(stack, db, monkeypatch):
    """Residual of 15.2: the abort is set while the writes run and PostgreSQL reports the
    statement "canceled" although its COMMIT was applied (the accept raises Aborted). The
    session reads whether the first id is stored: 250 with it, not 451."""
    port = stack.listen()
    original_send = BatchTxn.send
    staged: list[str] = []

    async def send_now(self, writes, first=None):
        if not staged:
            staged.append("canceled after commit")
            await original_send(self, writes, first)  # the writes commit here
            self.canceller.abort.request()  # store_timeout fires at this instant
            # What the canceller makes of PostgreSQL's "canceling statement due to user request".
            raise Aborted("statement cancelled on abort, rolled back")
        return await original_send(self, writes, first)

    monkeypatch.setattr(BatchTxn, "send", send_now)
    reply = await send(port, "alice@example.com", [BOT, f"other@{DOMAIN}"], message("<late-cancel@x>"))
    assert staged == ["canceled after commit"]
    await _assert_250_with_stored_copies(db, reply, "<late-cancel@x>")
