"""Test-session plumbing: one embedded PostgreSQL per session, a migrated template database,
and a fresh database cloned from it for every test that asks for one (Synapse's pattern:
``CREATE DATABASE … TEMPLATE`` is faster and stricter than truncating tables)."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted

from twisted.internet import defer
from twisted.internet import reactor as _reactor

from e2a.store.database import Database
from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings
from tests.support.dirs import end_run_tmp, start_run_tmp

TEMPLATE_DB = "e2a_template"
_counter = itertools.count()


def pytest_configure(config):
    """Every temporary file of the run under one directory, removed when the run ends
    (tests/support/dirs.py)."""
    start_run_tmp()


def pytest_unconfigure(config):
    end_run_tmp()


def _admin(dsn: str):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_server():
    """The session's private PostgreSQL (fsync off: the tests prove logic, not disks)."""
    base = Path(os.environ.get("E2A_TEST_PGDIR") or tempfile.mkdtemp(prefix="e2a-test-pg-"))
    server = EmbeddedPostgres(
        EmbeddedSettings(
            base / "pg",
            database="postgres",
            options=(("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")),
        )
    )
    server.thd_start()
    yield server
    server.thd_stop()


@pytest.fixture(scope="session")
def template_dsn(pg_server):
    """A database migrated once; every per-test database is cloned from it."""
    from e2a.store import migrate

    conn = _admin(pg_server.admin_dsn())
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        cur.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    conn.close()
    dsn = pg_server.admin_dsn(TEMPLATE_DB)
    pytest_twisted.blockon(defer.ensureDeferred(migrate.migrate(dsn, _reactor)))
    return dsn


def fresh_database(pg_server, template_dsn, name: str | None = None) -> str:
    """Clone the template into a new database and return its DSN."""
    name = name or f"e2a_t{os.getpid()}_{next(_counter)}"
    conn = _admin(pg_server.admin_dsn())
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    conn.close()
    return pg_server.admin_dsn(name)


def drop_database(pg_server, dsn: str) -> None:
    name = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    conn = _admin(pg_server.admin_dsn())
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def db_dsn(pg_server, template_dsn):
    dsn = fresh_database(pg_server, template_dsn)
    yield dsn
    drop_database(pg_server, dsn)


@pytest.fixture
def empty_db_dsn(pg_server):
    """A database with no schema at all (migration tests)."""
    name = f"e2a_e{os.getpid()}_{next(_counter)}"
    conn = _admin(pg_server.admin_dsn())
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    dsn = pg_server.admin_dsn(name)
    yield dsn
    drop_database(pg_server, dsn)


@pytest.fixture
def db(db_dsn):
    """A started :class:`Database` on a fresh clone of the migrated template."""
    database = Database(db_dsn, pool_size=4, reactor=_reactor)
    pytest_twisted.blockon(defer.ensureDeferred(database.start()))
    yield database
    database.close()


@pytest.fixture
def api_server_factory(db):
    """``await api_server_factory(config=…)`` starts an API server on 127.0.0.1:0 over the test database; stopped at teardown."""
    from tests.support.apiserver import ApiServer, make_test_config

    servers = []

    async def make(config=None, dns=None, clock=None):
        server = ApiServer(db, config or make_test_config(), dns=dns, clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        pytest_twisted.blockon(defer.ensureDeferred(server.stop()))


@pytest.fixture
def e2a_service_factory(db_dsn, tmp_path):
    """``await e2a_service_factory(**config_overrides)``: a whole E2AService (HTTP + SMTP on
    127.0.0.1:0) on the test database, as twistd would run it. Several may share the database
    (that is how the cross-process tests get two "processes" in one test run)."""
    import dataclasses

    from e2a.config import Config, DatabaseConfig, HttpConfig, SmtpConfig
    from e2a.service import build_service

    services = []

    async def make(**overrides):
        n = len(services)
        base = Config(
            data_dir=str(tmp_path / f"data{n}"),
            shared_domain="agents.test",
            database=DatabaseConfig(url=db_dsn, pool_size=4),
            http=HttpConfig(listen_addr="127.0.0.1:0"),
            smtp=SmtpConfig(listen_addr="127.0.0.1:0", domain="mx.e2a.test"),
        )
        if n:
            # every "process" of one deployment shares the master key and the generated HMAC
            # secret (when the configuration sets none)
            (tmp_path / f"data{n}").mkdir(parents=True, exist_ok=True)
            for name in ("master.key", "hmac.secret"):
                if (tmp_path / "data0" / name).exists():
                    (tmp_path / f"data{n}" / name).write_text((tmp_path / "data0" / name).read_text())
        config = dataclasses.replace(base, **overrides)
        service = build_service(config, _reactor, standalone=False)
        service.startService()
        services.append(service)
        await service.started
        return service

    yield make
    for service in reversed(services):
        pytest_twisted.blockon(defer.ensureDeferred(_stop(service)))


async def _stop(service):
    if service.running:
        await service.stopService()
