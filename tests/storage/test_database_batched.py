"""Database.run_batched and single-statement reads: atomic batched writes, same error mapping."""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.store.database import Database, DatabaseUnavailable
from e2a.store.events import CHANNEL_INBOUND, EventListener


@pytest_twisted.ensureDeferred
async def test_run_batched_commits_all_writes_and_runs_hooks_once(db):
    """Queued writes commit together; reads see committed data; hooks run after the commit."""
    calls = []

    async def _txn(txn):
        assert await txn.fetchone("SELECT 1 AS one") == {"one": 1}
        await txn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", ("b1", "b1@example.com"))
        await txn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", ("b2", "100%% sure@example.com"))
        txn.call_after(lambda: calls.append("after"))
        return "done"

    assert await db.run_batched("batched", _txn) == "done"
    assert calls == ["after"]
    rows = await db.fetchall("SELECT id, email FROM users WHERE id IN ('b1', 'b2') ORDER BY id")
    assert rows == [{"id": "b1", "email": "b1@example.com"}, {"id": "b2", "email": "100%% sure@example.com"}]


@pytest_twisted.ensureDeferred
async def test_run_batched_writes_nothing_when_a_later_write_fails(db):
    """A failing statement in the batch rolls back the earlier ones: all or nothing."""
    calls = []

    async def _txn(txn):
        await txn.execute("INSERT INTO users (id, email) VALUES ('b3', 'b3@example.com')")
        await txn.execute("INSERT INTO users (id, email) VALUES ('b3', 'again@example.com')")  # duplicate key
        txn.call_after(lambda: calls.append("after"))

    with pytest.raises(psycopg2.IntegrityError):
        await db.run_batched("batched_fail", _txn)
    assert calls == []
    assert await db.fetchone("SELECT 1 FROM users WHERE id = 'b3'") is None
    # the connection is usable again (no transaction left open)
    assert await db.fetchone("SELECT 2 AS two") == {"two": 2}


@pytest_twisted.ensureDeferred
async def test_run_batched_sends_nothing_when_function_raises(db):
    """An exception before the flush leaves the database untouched."""

    async def _txn(txn):
        await txn.execute("INSERT INTO users (id, email) VALUES ('b4', 'b4@example.com')")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await db.run_batched("batched_raise", _txn)
    assert await db.fetchone("SELECT 1 FROM users WHERE id = 'b4'") is None


@pytest_twisted.ensureDeferred
async def test_run_batched_retries_serialization_failure(db):
    """40001 from the batch makes the whole function run again."""
    attempts = []

    async def _txn(txn):
        attempts.append(1)
        if len(attempts) == 1:
            await txn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
            )
        return len(attempts)

    assert await db.run_batched("batched_flaky", _txn) == 2


@pytest_twisted.ensureDeferred
async def test_run_batched_notify_only_when_batch_commits(db, db_dsn):
    """A NOTIFY queued with a failing write is never delivered; one in a good batch is."""
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    got = []
    first = defer.Deferred()

    def on_event(payload):
        got.append(payload)
        if not first.called:
            first.callback(payload)

    listener.subscribe(CHANNEL_INBOUND, on_event)

    async def _bad(txn):
        await txn.notify(CHANNEL_INBOUND, "rolled-back")
        await txn.execute("SELECT 1/0")

    with pytest.raises(psycopg2.DataError):
        await db.run_batched("notify_bad", _bad)

    async def _good(txn):
        await txn.notify(CHANNEL_INBOUND, "agent@example.com\tmsg_1")

    await db.run_batched("notify_good", _good)
    assert await first == "agent@example.com\tmsg_1"
    assert got == ["agent@example.com\tmsg_1"]
    listener.stop()


@pytest_twisted.ensureDeferred
async def test_fetchall_single_statement_maps_unreachable_to_unavailable(db):
    """A broken pooled connection turns a single read into DatabaseUnavailable."""
    database = Database(db.dsn, 1, reactor)
    await database.start()
    conn = database._idle[0]
    conn.close()
    database._idle[0] = conn  # closed connection is replaced at checkout
    assert await database.fetchone("SELECT 3 AS three") == {"three": 3}
    database.close()
    with pytest.raises(DatabaseUnavailable):
        await database.fetchone("SELECT 1")


@pytest_twisted.ensureDeferred
async def test_prepared_statement_gives_plain_sql_results_on_every_path(db):
    """A Prepared statement returns the same rows via the pool, a batch and a transaction."""
    from e2a.store.database import Prepared

    stmt = Prepared("test_prepared_echo", "SELECT %(a)s::text AS a, %(b)s::int + 1 AS b, '100%%' AS pct")
    params = {"a": "x'y", "b": 41}
    expected = {"a": "x'y", "b": 42, "pct": "100%"}
    for _ in range(3):  # first use prepares on the connection, later ones only execute
        assert await db.fetchone_prepared(stmt, params) == expected

    async def _batched(txn):
        return await txn.fetchone_prepared(stmt, params)

    async def _plain(txn):
        return await txn.fetchone_prepared(stmt, params)

    assert await db.run_batched("prepared_batched", _batched) == expected
    assert await db.run("prepared_plain", _plain) == expected


@pytest_twisted.ensureDeferred
async def test_prepared_write_in_batch_commits_with_the_rest(db):
    """execute_prepared queues an EXECUTE that commits (or rolls back) with the batch."""
    from e2a.store.database import Prepared

    stmt = Prepared("test_prepared_user", "INSERT INTO users (id, email) VALUES (%(id)s, %(email)s)")

    async def _ok(txn):
        await txn.execute_prepared(stmt, {"id": "p1", "email": "p1@example.com"})
        await txn.execute_prepared(stmt, {"id": "p2", "email": "p2@example.com"})

    async def _bad(txn):
        await txn.execute_prepared(stmt, {"id": "p3", "email": "p3@example.com"})
        await txn.execute_prepared(stmt, {"id": "p1", "email": "dup@example.com"})

    await db.run_batched("prepared_ok", _ok)
    with pytest.raises(psycopg2.IntegrityError):
        await db.run_batched("prepared_bad", _bad)
    rows = await db.fetchall("SELECT id FROM users WHERE id LIKE %s ORDER BY id", ("p%",))
    assert [r["id"] for r in rows] == ["p1", "p2"]
