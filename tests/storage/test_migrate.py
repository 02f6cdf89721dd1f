"""Migration runner contract on real PostgreSQL."""

from __future__ import annotations

import hashlib
import re

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from e2a.store import migrate


def _tables(dsn: str) -> set[str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_plan_refuses_database_newer_than_code():
    """A recorded version above every shipped file means newer code migrated this database."""
    available = [migrate.Migration(1, "init", "")]
    with pytest.raises(migrate.MigrationError, match="newer"):
        migrate.plan({1: "init", 2: "future"}, available)


def test_plan_refuses_recorded_version_without_file():
    """A gap (recorded version whose file vanished) is an error, never silently ignored."""
    available = [migrate.Migration(1, "init", ""), migrate.Migration(3, "c", "")]
    with pytest.raises(migrate.MigrationError, match="missing"):
        migrate.plan({1: "init", 2: "b"}, available)


def test_plan_orders_pending_by_version():
    """Pending files are applied in ascending numeric order."""
    available = [migrate.Migration(v, f"m{v}", "") for v in (1, 2, 10)]
    assert [m.version for m in migrate.plan({1: "m1"}, available)] == [2, 10]


def test_shipped_migrations_are_numbered_and_loadable():
    """The schema package ships its SQL files (also from an installed wheel)."""
    migrations = migrate.load_migrations()
    assert migrations and migrations[0].version == 1
    assert "CREATE TABLE messages" in migrations[0].sql


@pytest_twisted.ensureDeferred
async def test_migrate_applies_all_then_is_idempotent(empty_db_dsn):
    """First run applies every file and records it; a second run applies nothing."""
    first = await migrate.migrate(empty_db_dsn, reactor)
    assert [m.version for m in first] == [m.version for m in migrate.load_migrations()]
    assert {"users", "agents", "messages", "deliveries", "schema_migrations"} <= _tables(empty_db_dsn)
    assert await migrate.migrate(empty_db_dsn, reactor) == []
    st = await migrate.status(empty_db_dsn, reactor)
    assert st.pending == [] and st.applied[0][0] == 1


@pytest_twisted.ensureDeferred
async def test_migrate_concurrent_starters_apply_once(empty_db_dsn):
    """Two processes starting together serialise on the advisory lock; each file runs once."""
    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(migrate.migrate(empty_db_dsn, reactor)) for _ in range(3)]
    )
    applied = [m.version for r in results for m in r]
    assert sorted(applied) == [m.version for m in migrate.load_migrations()]


@pytest_twisted.ensureDeferred
async def test_migrate_refuses_newer_database(empty_db_dsn):
    """A database recording a version the code lacks is refused at start."""
    await migrate.migrate(empty_db_dsn, reactor)
    conn = psycopg2.connect(empty_db_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'future')")
    conn.close()
    with pytest.raises(migrate.MigrationError, match="newer"):
        await migrate.migrate(empty_db_dsn, reactor)


@pytest_twisted.ensureDeferred
async def test_applied_versions_lists_every_shipped_migration(db):
    """The readiness check sees every shipped migration applied on a migrated database."""
    assert {m.version for m in migrate.load_migrations()} <= await migrate.applied_versions(db)


# The statements of every migration file as released (comments and layout aside). A database
# records only a migration's number, so a file changed after some database applied it leaves
# that database with another schema than a new one, silently (schema/0012 repairs one such
# change). Change the schema with a new file; comments may change freely.
RELEASED = {
    1: "8d84ea4f5bd39f03", 2: "f2b2c93fa56cf770", 3: "31de16e460afe2c5", 4: "4d25bab24056eb3b",
    5: "f1230ffe90e7a2fc", 6: "26baaab6f258dd9a", 7: "83bb7ffe5d292b85", 8: "b3ed7cb7f98e5610",
    9: "cabe4696da4f97a5", 10: "6b6430abeed85798", 11: "cfd230977863651d", 12: "1ac7bf7a15af67df",
}


def _statements_digest(sql: str) -> str:
    return hashlib.sha256(" ".join(re.sub(r"--[^\n]*", "", sql).split()).encode()).hexdigest()[:16]


def test_released_migrations_keep_their_statements():
    """No released migration file's statements change (add a new file instead); a new file is
    added to RELEASED when it is released."""
    shipped = {m.version: _statements_digest(m.sql) for m in migrate.load_migrations()}
    changed = sorted(v for v, digest in RELEASED.items() if shipped.get(v) != digest)
    assert changed == [], f"released migration(s) {changed} changed: add a new migration instead"
    assert sorted(shipped) == sorted(RELEASED), "a new migration file: add its digest to RELEASED"


@pytest_twisted.ensureDeferred
async def test_0012_repairs_a_database_migrated_by_an_earlier_0008(empty_db_dsn, monkeypatch):
    """A database whose version 8 came from an earlier text of 0008 (an overload with a boolean
    fourth argument, one with three, no index on paused jobs) is left with the one slot
    function 0011 made, which an untyped NULL fourth argument then calls, and the index."""
    shipped = migrate.load_migrations()
    monkeypatch.setattr(migrate, "load_migrations", lambda: [m for m in shipped if m.version <= 11])
    await migrate.migrate(empty_db_dsn, reactor)
    conn = psycopg2.connect(empty_db_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("DROP INDEX deliveries_paused_agent_idx")
            for args in ("p_agent TEXT, p_max INTEGER, p_now TIMESTAMPTZ",
                         "p_agent TEXT, p_max INTEGER, p_now TIMESTAMPTZ, p_wait BOOLEAN"):
                cur.execute(f"CREATE FUNCTION e2a_webhook_slots_free({args}) RETURNS INTEGER"
                            " LANGUAGE sql AS 'SELECT 0'")
            with pytest.raises(psycopg2.errors.AmbiguousFunction):
                cur.execute("SELECT e2a_webhook_slots_free('a@x', 4, now(), NULL)")
        monkeypatch.setattr(migrate, "load_migrations", lambda: shipped)
        assert [m.version for m in await migrate.migrate(empty_db_dsn, reactor)] == [12]
        with conn.cursor() as cur:
            cur.execute("SELECT pg_get_function_identity_arguments(oid) FROM pg_proc"
                        " WHERE proname = 'e2a_webhook_slots_free'")
            assert [r[0] for r in cur.fetchall()] == [
                "p_agent text, p_max integer, p_now timestamp with time zone, p_wait_ms integer"
            ]
            cur.execute("SELECT e2a_webhook_slots_free('a@x', 4, now(), NULL)")
            assert cur.fetchone() == (4,)
            cur.execute("SELECT to_regclass('deliveries_paused_agent_idx') IS NOT NULL")
            assert cur.fetchone() == (True,)
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_migration_waiting_for_a_busy_table_gives_up_and_says_why(db_dsn, monkeypatch):
    """A migration that needs a table another session holds (here a transaction that read it,
    as a pg_dump does) stops after LOCK_TIMEOUT, rolled back, naming the cause; run again once
    that session ended, it applies."""
    shipped = migrate.load_migrations()
    extra = migrate.Migration(9999, "busy", "ALTER TABLE deliveries ADD COLUMN busy_test INTEGER")
    monkeypatch.setattr(migrate, "load_migrations", lambda: [*shipped, extra])
    monkeypatch.setattr(migrate, "LOCK_TIMEOUT", 0.2)
    reader = psycopg2.connect(db_dsn)
    try:
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM deliveries")  # ACCESS SHARE until the transaction ends
        with pytest.raises(migrate.MigrationError, match="9999_busy waited 0.2 s .* rolled back"):
            await migrate.migrate(db_dsn, reactor)
        assert [m.version for m in (await migrate.status(db_dsn, reactor)).pending] == [9999]
    finally:
        reader.rollback()
        reader.close()
    assert [m.version for m in await migrate.migrate(db_dsn, reactor)] == [9999]
