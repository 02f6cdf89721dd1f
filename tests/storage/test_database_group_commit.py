"""The group commit of Database.run_batched: batches that finish while a commit is in flight
share the next transaction, each returns only after its own writes committed, and an error or
an abort reaches only the batch it belongs to (real PostgreSQL, real locks)."""

from __future__ import annotations

import psycopg2
import psycopg2.errorcodes
import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.abort import Aborted, AbortSignal
from e2a.store.database import Database, DatabaseUnavailable, GroupCommit, Prepared, Writes, rolled_back
from tests.support.waiting import wait_for

INSERT_T = Prepared("test_group_insert_t", "INSERT INTO t (id) VALUES (%(id)s)")


@pytest_twisted.async_yield_fixture
async def gdb(db_dsn):
    database = Database(db_dsn, pool_size=4, reactor=reactor)
    await database.start()
    await database.execute("CREATE TABLE t (id int PRIMARY KEY)")
    await database.execute("CREATE TABLE u (id int PRIMARY KEY)")
    # These tests hold a commit in flight on a table lock: no lock timeout gets in the way
    # (the lock timeout has its own test, with the default).
    database._commits = GroupCommit(database, lock_timeout=60)
    yield database
    database.close()


async def _ids(db: Database, table: str) -> list[int]:
    return [r["id"] for r in await db.fetchall(f"SELECT id FROM {table} ORDER BY id")]


async def _blocked_on_lock(dsn: str, table: str) -> bool:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f"%INSERT INTO {table} %",),
            )
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


async def _wait_blocked(dsn: str, table: str) -> None:
    """Until an insert into ``table`` waits for its lock in PostgreSQL."""
    await wait_for(lambda: _blocked_on_lock(dsn, table), timeout=10, step=0.02)


def _locker(dsn: str, table: str):
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    return conn


def _writes(table: str, *ids: int) -> Writes:
    return Writes([f"INSERT INTO {table} (id) VALUES ({i})".encode() for i in ids])


@pytest_twisted.ensureDeferred
async def test_batches_finishing_during_a_commit_share_the_next_one(gdb, db_dsn):
    """20 concurrent run_batched calls, prepared writes included, on a fresh pool: every row
    and every after-commit hook arrives once, and fewer commits than batches were made."""
    holder = _locker(db_dsn, "t")  # the first commit waits here while the rest queue up
    hooks: list[int] = []

    async def txn(batch, i):
        assert await batch.fetchone("SELECT %s::int AS i", (i,)) == {"i": i}
        await batch.execute_prepared(INSERT_T, {"id": i})
        await batch.notify("test_group", str(i))
        batch.call_after(lambda: hooks.append(i))
        return i

    runs = [defer.Deferred.fromCoroutine(gdb.run_batched("group", txn, i)) for i in range(20)]
    await _wait_blocked(db_dsn, "t")
    await wait_for(lambda: len(gdb._commits._pending) == 19, timeout=10, step=0.02)
    holder.rollback()
    holder.close()
    assert await defer.gatherResults(runs) == list(range(20))
    assert sorted(hooks) == list(range(20))
    assert await _ids(gdb, "t") == list(range(20))
    assert gdb._commits.batches == 20
    assert gdb._commits.commits == 2  # the first alone, the 19 that queued behind it together


@pytest_twisted.ensureDeferred
async def test_one_failing_batch_in_a_group_fails_alone(gdb, db_dsn):
    """A duplicate key in one batch of a group rolls the shared transaction back; each batch
    is then sent on its own: only the bad one raises, the others are stored."""
    await gdb.execute("INSERT INTO t (id) VALUES (7)")
    holder = _locker(db_dsn, "u")

    async def first(batch):
        await batch.execute("INSERT INTO u (id) VALUES (1)")

    async def txn(batch, i):
        await batch.execute("INSERT INTO t (id) VALUES (%s)", (i,))

    blocker = defer.Deferred.fromCoroutine(gdb.run_batched("first", first))
    await _wait_blocked(db_dsn, "u")
    runs = {i: defer.Deferred.fromCoroutine(gdb.run_batched("group", txn, i)) for i in (5, 6, 7, 8)}
    await wait_for(lambda: len(gdb._commits._pending) == 4, timeout=10, step=0.02)
    holder.rollback()
    holder.close()
    await blocker
    for i in (5, 6, 8):
        await runs[i]
    with pytest.raises(psycopg2.IntegrityError):
        await runs[7]
    assert await _ids(gdb, "t") == [5, 6, 7, 8]
    assert await _ids(gdb, "u") == [1]


@pytest_twisted.ensureDeferred
async def test_reports_come_back_after_the_commit_alone_in_a_group_and_after_a_resend(gdb, db_dsn):
    """A batch's ``report`` SELECTs run after every write of the transaction that carries them
    and their keys reach the batch once that transaction committed: sent alone, sent in a
    group (one final SELECT for all members), and sent again alone after the group failed."""
    await gdb.execute("INSERT INTO t (id) VALUES (7)")
    batches = {}

    async def txn(batch, table, i):
        batches[i] = batch
        await batch.execute(f"INSERT INTO {table} (id) VALUES (%s)", (i,))
        await batch.report(f"SELECT '{table}' || id AS key FROM {table} WHERE id = %s", (i,))

    await gdb.run_batched("alone", txn, "u", 1)
    assert batches[1].reported == {"u1"}

    holder = _locker(db_dsn, "u")
    blocker = defer.Deferred.fromCoroutine(gdb.run_batched("first", txn, "u", 2))
    await _wait_blocked(db_dsn, "u")
    runs = {i: defer.Deferred.fromCoroutine(gdb.run_batched("group", txn, "t", i)) for i in (5, 6)}
    await wait_for(lambda: len(gdb._commits._pending) == 2, timeout=10, step=0.02)
    commits = gdb._commits.commits
    holder.rollback()
    holder.close()
    await blocker
    await defer.gatherResults(list(runs.values()))
    assert gdb._commits.commits == commits + 2  # the blocked one, then 5 and 6 together
    assert batches[2].reported == {"u2"}
    # One SELECT for the group: each member gets the group's keys and looks up its own.
    assert batches[5].reported == batches[6].reported == {"t5", "t6"}

    holder = _locker(db_dsn, "u")
    blocker = defer.Deferred.fromCoroutine(gdb.run_batched("first", txn, "u", 3))
    await _wait_blocked(db_dsn, "u")
    runs = {i: defer.Deferred.fromCoroutine(gdb.run_batched("group", txn, "t", i)) for i in (8, 7)}
    await wait_for(lambda: len(gdb._commits._pending) == 2, timeout=10, step=0.02)
    holder.rollback()
    holder.close()
    await blocker
    await runs[8]
    with pytest.raises(psycopg2.IntegrityError):
        await runs[7]
    assert batches[8].reported == {"t8"}  # resent alone: its own report only


@pytest_twisted.ensureDeferred
async def test_abort_while_queued_withdraws_only_that_batch(gdb, db_dsn):
    """An abort set while a batch waits for the commit in flight: that batch raises Aborted at
    once and is never sent; the others commit."""
    holder = _locker(db_dsn, "u")
    commits = gdb._commits
    first = defer.Deferred.fromCoroutine(commits.commit("first", _writes("u", 1)))
    await _wait_blocked(db_dsn, "u")
    abort = AbortSignal()
    queued = defer.Deferred.fromCoroutine(commits.commit("aborted", _writes("t", 1), abort))
    other = defer.Deferred.fromCoroutine(commits.commit("other", _writes("t", 2), AbortSignal()))
    abort.request()
    with pytest.raises(Aborted):
        await queued
    assert len(commits._pending) == 1
    holder.rollback()
    holder.close()
    await first
    await other
    assert await _ids(gdb, "t") == [2]


@pytest_twisted.ensureDeferred
async def test_abort_of_a_member_in_flight_cancels_the_group_and_resends_the_rest(gdb, db_dsn):
    """A group blocked in PostgreSQL and one member's abort set: the group's query is cancelled
    (rolled back), that member raises Aborted, the others are sent again on their own and
    commit once the lock goes away."""
    lock_u, lock_t = _locker(db_dsn, "u"), _locker(db_dsn, "t")
    commits = gdb._commits
    first = defer.Deferred.fromCoroutine(commits.commit("first", _writes("u", 1)))
    await _wait_blocked(db_dsn, "u")
    aborts = [AbortSignal() for _ in range(3)]
    members = [
        defer.Deferred.fromCoroutine(commits.commit(f"m{i}", _writes("t", i), aborts[i])) for i in range(3)
    ]
    lock_u.rollback()  # the first commit goes through; the three are sent together and wait on t
    lock_u.close()
    await first
    await _wait_blocked(db_dsn, "t")
    assert commits.commits == 1 and not commits._pending
    aborts[1].request()
    with pytest.raises(Aborted):
        await members[1]
    await _wait_blocked(db_dsn, "t")  # the resend of member 0 waits for the lock again
    lock_t.rollback()
    lock_t.close()
    await members[0]
    await members[2]
    assert await _ids(gdb, "t") == [0, 2]


@pytest_twisted.ensureDeferred
async def test_terminated_backend_fails_every_member_and_resends_none(gdb, db_dsn):
    """The backend of a group is terminated mid-transaction: the outcome is PostgreSQL's to
    tell, not ours to guess, so every member gets the error and nothing is sent again."""
    lock_u, lock_t = _locker(db_dsn, "u"), _locker(db_dsn, "t")
    commits = gdb._commits
    first = defer.Deferred.fromCoroutine(commits.commit("first", _writes("u", 1)))
    await _wait_blocked(db_dsn, "u")
    members = [defer.Deferred.fromCoroutine(commits.commit(f"m{i}", _writes("t", i))) for i in range(3)]
    lock_u.rollback()
    lock_u.close()
    await first
    await _wait_blocked(db_dsn, "t")
    with lock_t.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO t %%'"
        )
    lock_t.rollback()
    lock_t.close()
    for d in members:
        with pytest.raises(DatabaseUnavailable):
            await d
    assert await _ids(gdb, "t") == []
    assert await gdb.fetchone("SELECT 1 AS ok") == {"ok": 1}  # the pool replaced the connection


@pytest.mark.parametrize(
    ("code", "resend"),
    [
        (psycopg2.errorcodes.UNIQUE_VIOLATION, True),
        (psycopg2.errorcodes.DIVISION_BY_ZERO, True),
        (psycopg2.errorcodes.SERIALIZATION_FAILURE, True),
        (psycopg2.errorcodes.DEADLOCK_DETECTED, True),
        (psycopg2.errorcodes.QUERY_CANCELED, True),
        (psycopg2.errorcodes.ADMIN_SHUTDOWN, False),
        (psycopg2.errorcodes.CONNECTION_FAILURE, False),
        (psycopg2.errorcodes.IO_ERROR, False),
        (psycopg2.errorcodes.INTERNAL_ERROR, False),
        (None, False),
    ],
)
def test_rolled_back_only_for_errors_that_prove_no_commit(code, resend):
    """Which PostgreSQL errors let a group's members be sent again on their own."""

    class Coded(psycopg2.Error):
        pgcode = code

    assert rolled_back(Coded()) is resend


@pytest_twisted.ensureDeferred
async def test_group_respects_member_and_byte_caps(gdb, db_dsn):
    """Queued batches beyond ``max_members`` go in the next commit."""
    commits = GroupCommit(gdb, max_members=3, lock_timeout=60)
    holder = _locker(db_dsn, "u")
    first = defer.Deferred.fromCoroutine(commits.commit("first", _writes("u", 1)))
    await _wait_blocked(db_dsn, "u")
    rest = [defer.Deferred.fromCoroutine(commits.commit(f"m{i}", _writes("t", i))) for i in range(7)]
    holder.rollback()
    holder.close()
    await first
    await defer.gatherResults(rest)
    assert (commits.commits, commits.batches) == (4, 8)  # 1, then 3 + 3 + 1
    assert await _ids(gdb, "t") == list(range(7))


@pytest_twisted.ensureDeferred
async def test_commit_waiting_on_a_lock_leaves_the_slot_to_other_tenants(gdb, db_dsn):
    """A write stuck on a row lock (another tenant's account being deleted) is rolled back
    after the slot's lock timeout and waits again outside the slot: the batches queued behind
    it, and those that shared its group, commit while it still waits."""
    commits = GroupCommit(gdb)  # the default lock timeout
    holder = _locker(db_dsn, "u")
    stuck = defer.Deferred.fromCoroutine(commits.commit("stuck", _writes("u", 1)))
    queued = defer.Deferred.fromCoroutine(commits.commit("queued", _writes("t", 1)))
    await queued  # committed in the slot once the stuck one timed out of it
    assert not stuck.called and await _ids(gdb, "t") == [1]
    grouped = [
        defer.Deferred.fromCoroutine(commits.commit("stuck-2", _writes("u", 2))),
        defer.Deferred.fromCoroutine(commits.commit("grouped", _writes("t", 2))),
    ]
    await grouped[1]  # sent with stuck-2, rolled back with it, then committed alone
    assert not grouped[0].called and await _ids(gdb, "t") == [1, 2]
    holder.rollback()
    holder.close()
    await stuck
    await grouped[0]
    assert await _ids(gdb, "u") == [1, 2]


@pytest_twisted.ensureDeferred
async def test_lone_batch_sends_on_its_own_connection_and_leaves_the_slot_on_a_lock(gdb, db_dsn):
    """With the slot free and nothing queued, a batch's writes go out on the connection that
    ran its reads (no second checkout); stuck on a lock past the lock timeout it leaves the
    slot, so the next batch commits while it waits."""
    gdb._commits = GroupCommit(gdb)  # the default lock timeout
    holder = _locker(db_dsn, "u")

    async def txn(batch, table, i):
        await batch.execute(f"INSERT INTO {table} (id) VALUES (%s)", (i,))

    stuck = defer.Deferred.fromCoroutine(gdb.run_batched("stuck", txn, "u", 1))
    await _wait_blocked(db_dsn, "u")
    await gdb.run_batched("next", txn, "t", 1)  # commits in the slot the stuck one left
    assert not stuck.called and await _ids(gdb, "t") == [1]
    holder.rollback()
    holder.close()
    await stuck
    assert await _ids(gdb, "u") == [1]
    assert (gdb._commits.commits, gdb._commits.batches) == (1, 1)  # the resend is outside the slot
