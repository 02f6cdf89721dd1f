"""Migration runner contract on real PostgreSQL."""

from __future__ import annotations

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
