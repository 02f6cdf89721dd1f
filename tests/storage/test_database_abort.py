"""Database.run_batched with an AbortSignal (issue 15.2): no statement after the signal, the
statement in flight cancelled in PostgreSQL, the outcome known before it returns, and the
pooled connection clean for its next user."""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.abort import Aborted, AbortSignal
from e2a.store.database import Database


@pytest_twisted.async_yield_fixture
async def one_conn(db_dsn):
    database = Database(db_dsn, pool_size=1, reactor=reactor)
    await database.start()
    await database.execute("CREATE TABLE t (id int PRIMARY KEY)")
    yield database
    database.close()


@pytest_twisted.ensureDeferred
async def test_abort_before_any_statement_raises_and_commits_nothing(one_conn):
    """A signal set before the transaction starts: Aborted, no row."""
    abort = AbortSignal()
    abort.request()

    async def txn(batch):
        await batch.execute("INSERT INTO t VALUES (1)")

    with pytest.raises(Aborted):
        await one_conn.run_batched("t", txn, abort=abort)
    assert await one_conn.fetchall("SELECT * FROM t") == []


@pytest_twisted.ensureDeferred
async def test_abort_cancels_blocked_write_and_connection_stays_clean(one_conn, db_dsn):
    """A write blocked by another session's lock is cancelled in PostgreSQL (rolled back); the
    one pooled connection then runs a slow statement without a stray cancel hitting it."""
    holder = psycopg2.connect(db_dsn)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    abort = AbortSignal()

    async def txn(batch):
        await batch.execute("INSERT INTO t VALUES (2)")
        return "stored"

    d = defer.Deferred.fromCoroutine(one_conn.run_batched("t", txn, abort=abort))
    await task.deferLater(reactor, 0.3, lambda: None)
    assert not d.called  # blocked by the lock
    abort.request()
    with pytest.raises(Aborted):
        await d
    holder.rollback()
    holder.close()
    assert await one_conn.fetchall("SELECT * FROM t") == []
    row = await one_conn.fetchone("SELECT 1 AS slept FROM pg_sleep(0.3)")
    assert row == {"slept": 1}


@pytest_twisted.ensureDeferred
async def test_abort_after_commit_returns_the_result(one_conn):
    """A signal set once the writes committed changes nothing: the result comes back."""
    abort = AbortSignal()

    async def txn(batch):
        await batch.execute("INSERT INTO t VALUES (3)")
        return "stored"

    assert await one_conn.run_batched("t", txn, abort=abort) == "stored"
    abort.request()
    assert await one_conn.fetchall("SELECT id FROM t") == [{"id": 3}]
