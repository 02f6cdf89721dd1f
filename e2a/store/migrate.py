"""Forward-only migrations: ``schema/NNNN_name.sql`` applied in order, each in its own transaction.

A session-level ``pg_advisory_lock`` serialises concurrent starters (two e2a processes booting
against one database); whoever gets the lock second finds the work done. A database that records
a version this code does not have was migrated by newer code: we refuse to run against it rather
than guess which of our queries still fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errorcodes
from txpostgres import txpostgres

from twisted.logger import Logger

from e2a.store.database import Database, DatabaseUnavailable

log = Logger()

# Arbitrary but fixed: "e2a" + "migr" as an int64 key for pg_advisory_lock.
ADVISORY_LOCK_KEY = 0x6532614D696772
#: Longest a migration waits for a lock on a table (seconds). Some migrations lock a table
#: against every other session; while such a lock request waits (behind a long transaction: a
#: pg_dump, an e2a still running), PostgreSQL queues every later query on that table behind it,
#: so waiting without end would stall whatever else uses the database. Past it the migration
#: is rolled back and the run stops, saying so; running it again later is safe.
LOCK_TIMEOUT = 30.0
_NAME_RE = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")


class MigrationError(Exception):
    """The schema cannot be brought to this code's version (newer database, missing file, bad SQL)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[tuple[int, str]]
    pending: list[Migration]


def schema_files() -> Iterable[Any]:
    """The ``schema/`` directory: the ``e2a.schema`` package of an installed distribution, or
    the top-level ``schema/`` of a source checkout (where that package is only a mapping)."""
    try:
        return list(resources.files("e2a.schema").iterdir())
    except ModuleNotFoundError:
        return list((Path(__file__).resolve().parents[2] / "schema").iterdir())


def load_migrations() -> list[Migration]:
    """The migration files shipped with e2a, by ascending version."""
    found: dict[int, Migration] = {}
    for entry in schema_files():
        m = _NAME_RE.match(entry.name)
        if not m:
            continue
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"two migration files share version {version}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def plan(applied: dict[int, str], available: list[Migration]) -> list[Migration]:
    """Pure decision: which files to apply, or why we must refuse."""
    known = {m.version for m in available}
    newest_known = max(known, default=0)
    newer = sorted(v for v in applied if v > newest_known)
    if newer:
        raise MigrationError(
            f"the database schema is at version {max(applied)}, newer than this e2a (knows up to "
            f"{newest_known}); upgrade e2a or restore a matching database"
        )
    missing = sorted(v for v in applied if v not in known)
    if missing:
        raise MigrationError(f"migration(s) {missing} are recorded in the database but their files are missing")
    return [m for m in available if m.version not in applied]


async def _connect(dsn: str, reactor: Any) -> txpostgres.Connection:
    conn = txpostgres.Connection(reactor=reactor)
    try:
        await conn.connect(dsn)
    except psycopg2.Error as e:
        raise DatabaseUnavailable(f"cannot connect to the database: {e}".strip()) from e
    return conn


async def _applied(conn: txpostgres.Connection) -> dict[int, str]:
    rows = await conn.runQuery(
        "SELECT to_regclass('schema_migrations') IS NOT NULL"
    )
    if not rows[0][0]:
        return {}
    return {v: n for v, n in await conn.runQuery("SELECT version, name FROM schema_migrations")}


async def status(dsn: str, reactor: Any) -> MigrationStatus:
    conn = await _connect(dsn, reactor)
    try:
        applied = await _applied(conn)
        pending = plan(applied, load_migrations())
        return MigrationStatus(sorted(applied.items()), pending)
    finally:
        conn.close()


async def migrate(dsn: str, reactor: Any) -> list[Migration]:
    """Apply every pending migration; returns the ones this call applied."""
    conn = await _connect(dsn, reactor)
    done: list[Migration] = []
    try:
        await conn.runOperation("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            await conn.runOperation(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            pending = plan(await _applied(conn), load_migrations())
            for migration in pending:
                async def _apply(cursor: txpostgres.Cursor, m: Migration = migration) -> None:
                    await cursor.execute(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT * 1000)}")
                    await cursor.execute(m.sql)
                    await cursor.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                    )

                try:
                    await conn.runInteraction(lambda c, fn=_apply: _as_deferred(fn(c)))
                except psycopg2.Error as e:
                    name = f"{migration.version:04d}_{migration.name}"
                    if e.pgcode == psycopg2.errorcodes.LOCK_NOT_AVAILABLE:
                        raise MigrationError(
                            f"migration {name} waited {LOCK_TIMEOUT:g} s for a table another session is using "
                            "(an e2a still running, a pg_dump, a long transaction) and was rolled back; "
                            "run it again once that session ended"
                        ) from e
                    raise MigrationError(f"migration {name} failed: {e}") from e
                log.info("applied migration {version:04d}_{name}", version=migration.version, name=migration.name)
                done.append(migration)
        finally:
            await conn.runOperation("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    finally:
        conn.close()
    return done


def _as_deferred(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


async def applied_versions(db: Database) -> set[int]:
    """The migration versions recorded in the database (readiness check; fails when the DB is down)."""
    rows = await db.fetchall("SELECT version FROM schema_migrations")
    return {r["version"] for r in rows}
