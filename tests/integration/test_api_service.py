"""Service endpoints and the JSON error shape on a real socket."""

from __future__ import annotations

import pytest_twisted

from e2a.store import migrate


@pytest_twisted.ensureDeferred
async def test_health_answers_ok_without_auth(api_server_factory):
    """Liveness needs no key and no database."""
    api = await api_server_factory()
    r = await api.request("GET", "/api/health")
    assert r.code == 200 and r.json() == {"status": "ok"}
    assert r.header("Content-Type") == "application/json"
    assert r.header("X-Content-Type-Options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_ready_reports_ready_when_migrated(api_server_factory):
    """Readiness checks the database and that every migration is applied."""
    api = await api_server_factory()
    r = await api.request("GET", "/api/ready")
    assert r.code == 200 and r.json() == {"status": "ready"}


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_a_shipped_migration_is_not_applied(api_server_factory, db):
    """A migration of this e2a missing from the database: not ready, saying which check failed."""
    api = await api_server_factory()
    await db.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    r = await api.request("GET", "/api/ready")
    assert r.code == 503
    assert r.json() == {"status": "not_ready", "checks": {"database": "ok", "migrations": "pending"}}


@pytest_twisted.ensureDeferred
async def test_ready_judges_the_migrations_it_was_started_with(api_server_factory, monkeypatch):
    """A newer e2a installed while this one runs (more migration files on disk, applied only
    after this one stops) leaves it ready: it runs the code it started with."""
    api = await api_server_factory()
    shipped = migrate.load_migrations()
    monkeypatch.setattr(migrate, "load_migrations", lambda: [*shipped, migrate.Migration(9999, "future", "")])
    r = await api.request("GET", "/api/ready")
    assert r.code == 200 and r.json() == {"status": "ready"}


@pytest_twisted.ensureDeferred
async def test_info_shows_shared_domain_and_version(api_server_factory):
    """/api/v1/info reports slug registration and the version."""
    api = await api_server_factory()
    body = (await api.request("GET", "/api/v1/info")).json()
    assert body["shared_domain"] == "agents.test"
    assert body["slug_registration_enabled"] is True
    assert "public_url" not in body and body["version"]


@pytest_twisted.ensureDeferred
async def test_unknown_route_answers_json_404(api_server_factory):
    """Unknown paths use the spec's error body."""
    api = await api_server_factory()
    r = await api.request("GET", "/api/v1/nothing-here")
    assert r.code == 404 and r.json()["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_wrong_method_answers_json_405_with_allow(api_server_factory):
    """A known path with another method is 405 with Allow."""
    api = await api_server_factory()
    r = await api.request("DELETE", "/api/health")
    assert r.code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in r.header("Allow")
