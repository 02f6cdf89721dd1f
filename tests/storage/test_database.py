"""Database wrapper contract: named transactions, retries, after-commit hooks."""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.store.database import Database, DatabaseUnavailable
from e2a.store.events import CHANNEL_INBOUND, EventListener


@pytest_twisted.ensureDeferred
async def test_run_commits_and_calls_after_commit_hooks(db):
    """A successful transaction commits, then runs its hooks exactly once."""
    calls = []

    async def _insert_txn(txn):
        await txn.execute("INSERT INTO users (id, email) VALUES ('u1', 'a@example.com')")
        txn.call_after(lambda: calls.append("after"))
        return "done"

    assert await db.run("insert_user", _insert_txn) == "done"
    assert calls == ["after"]
    assert (await db.fetchone("SELECT email FROM users WHERE id = 'u1'"))["email"] == "a@example.com"


@pytest_twisted.ensureDeferred
async def test_run_rolls_back_and_skips_hooks_on_error(db):
    """A failing transaction leaves nothing behind and runs no hook."""
    calls = []

    async def _fail_txn(txn):
        await txn.execute("INSERT INTO users (id, email) VALUES ('u2', 'b@example.com')")
        txn.call_after(lambda: calls.append("after"))
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await db.run("fail", _fail_txn)
    assert calls == []
    assert await db.fetchone("SELECT 1 FROM users WHERE id = 'u2'") is None


@pytest_twisted.ensureDeferred
async def test_run_retries_serialization_failure(db):
    """40001 makes the whole transaction function run again."""
    attempts = []

    async def _flaky_txn(txn):
        attempts.append(1)
        if len(attempts) == 1:
            await txn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
            )
        return len(attempts)

    assert await db.run("flaky", _flaky_txn) == 2


@pytest_twisted.ensureDeferred
async def test_unreachable_database_is_transient():
    """No server → DatabaseUnavailable (a TransientError: SMTP 451, HTTP 503)."""
    database = Database("host=/nonexistent-e2a port=1 user=x dbname=x", 1, reactor)
    with pytest.raises(DatabaseUnavailable):
        await database.start()


@pytest_twisted.ensureDeferred
async def test_notify_reaches_listener_only_after_commit(db, db_dsn):
    """NOTIFY inside a transaction is delivered to LISTEN on another connection at commit."""
    listener = EventListener(db_dsn, reactor)
    await listener.start()
    got = defer.Deferred()
    listener.subscribe(CHANNEL_INBOUND, lambda payload: got.callback(payload) if not got.called else None)

    async def _rollback_txn(txn):
        await txn.notify(CHANNEL_INBOUND, "rolled-back")
        raise psycopg2.DataError("abort")

    with pytest.raises(psycopg2.DataError):
        await db.run("notify_rollback", _rollback_txn)

    async def _notify_txn(txn):
        await txn.notify(CHANNEL_INBOUND, "agent@example.com\tmsg_1")

    await db.run("notify", _notify_txn)
    assert await got == "agent@example.com\tmsg_1"
    listener.stop()


@pytest_twisted.ensureDeferred
async def test_pooled_connections_speak_utf8_whatever_the_dsn_asks(db_dsn):
    """The pool's client encoding is UTF8 even when the DSN names another one (octets_params'
    text form relies on it)."""
    database = Database(f"{db_dsn} client_encoding=SHIFT_JIS_2004", 1, reactor)
    await database.start()
    try:
        row = await database.fetchone("SHOW client_encoding")
        assert row == {"client_encoding": "UTF8"}
    finally:
        database.close()
