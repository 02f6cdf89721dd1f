"""A caller that stops waiting for the database is answered at once, also when the server no
longer replies, and the reactor keeps running (e2a.store.database: ``_shielded``,
``CancelRequests``). Before, cancelling a statement called libpq's cancel request through
psycopg2, which waits for the server holding the GIL: a server that accepted connections but
did not answer froze the whole process, the health check included."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from e2a.store.database import Database
from tests.support.pgproxy import PgProxy
from tests.support.waiting import wait_for


@pytest_twisted.ensureDeferred
async def test_server_that_stops_answering_holds_neither_the_caller_nor_the_reactor(db_dsn):
    """Frozen server: the caller's timeout fires at once, the reactor runs, the abandoned
    statement keeps its connection until the server answers again, then it is back in the pool."""
    params = psycopg2.extensions.parse_dsn(db_dsn)
    proxy = PgProxy(reactor)
    dsn = proxy.start(params["host"], int(params["port"]), f"user={params['user']} dbname={params['dbname']}")
    db = Database(dsn, pool_size=2, reactor=reactor)
    await db.start()
    try:
        assert await db.fetchone("SELECT 1 AS one") == {"one": 1}
        proxy.freeze()
        clock = task.Clock()
        d = defer.Deferred.fromCoroutine(db.fetchone("SELECT 2 AS two"))
        d.addTimeout(5, clock)
        assert db.idle == 1  # the statement is out, on its connection
        clock.advance(5)
        assert d.called
        with pytest.raises(defer.TimeoutError):
            await d
        await task.deferLater(reactor, 0.05, lambda: None)  # the reactor turns
        assert db.idle == 1  # held until PostgreSQL answers (its cancel request waits too)
        proxy.thaw()
        await wait_for(lambda: db.idle == 2, timeout=10, step=0.02)
        assert await db.fetchone("SELECT 3 AS three") == {"three": 3}
    finally:
        db.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_abandoned_statement_is_cancelled_in_postgresql(db):
    """A long statement whose caller gave up is cancelled on the server: its connection is
    back in the pool long before the statement would have ended."""
    clock = task.Clock()
    d = defer.Deferred.fromCoroutine(db.fetchone("SELECT pg_sleep(60)"))
    d.addTimeout(1, clock)
    clock.advance(1)
    with pytest.raises(defer.TimeoutError):
        await d
    await wait_for(lambda: db.idle == 4, timeout=10, step=0.02)
    rows = await db.fetchall("SELECT count(*) AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                             " AND state = 'active'")
    assert rows == [{"n": 0}]


@pytest_twisted.ensureDeferred
async def test_server_closing_idle_connections_logs_no_traceback(db, db_dsn):
    """The server ends the pool's idle connections (a restart, a crash): no "Unhandled Error"
    per connection; the next query gets fresh connections."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        admin = psycopg2.connect(db_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        admin.close()
        await wait_for(lambda: all(c.pollable().closed for c in db._idle), timeout=10, step=0.02)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(e) for e in events if e.get("isError") or e.get("log_failure")] == []
    assert await db.fetchone("SELECT 1 AS one") == {"one": 1}


@pytest_twisted.ensureDeferred
async def test_callers_that_give_up_while_queued_leave_the_queue(db_dsn):
    """Callers waiting for a connection that give up are taken out of the pool's queue: when
    the connection frees, the pool still has its one slot, and nothing is left queued."""
    db = Database(db_dsn, pool_size=1, reactor=reactor)
    await db.start()
    try:
        busy = defer.Deferred.fromCoroutine(db.fetchone("SELECT pg_sleep(0.3)"))
        clock = task.Clock()
        waiting = []
        for _ in range(300):
            d = defer.Deferred.fromCoroutine(db.fetchone("SELECT 1 AS one"))
            d.addTimeout(1, clock)
            waiting.append(d)
        clock.advance(1)
        results = await defer.DeferredList(waiting, consumeErrors=True)
        assert all(not ok and f.check(defer.TimeoutError) for ok, f in results)
        assert db._semaphore.waiting == []
        await busy
        await wait_for(lambda: db.idle == 1, timeout=10, step=0.02)
        assert db._semaphore.tokens == 1
        assert await db.fetchone("SELECT 2 AS two") == {"two": 2}
    finally:
        db.close()
