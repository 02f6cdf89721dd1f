"""Service endpoints: health, readiness, info (api.md §3) and the OpenAPI document."""

from __future__ import annotations

from importlib import resources
from typing import Any

from klein import Klein

from twisted.internet import defer
from twisted.web.server import Request

from e2a import __version__
from e2a.api.http import json_headers, write_json
from e2a.store import migrate


def openapi_document() -> bytes:
    """The shipped OpenAPI document (e2a/api/openapi.json), read once at start-up."""
    return resources.files("e2a.api").joinpath("openapi.json").read_bytes()


def install(router: Klein, deps: Any) -> None:
    @router.route("/api/health", methods=["GET", "HEAD"])
    def health(request: Request) -> bytes:
        return write_json(request, 200, {"status": "ok"}, authenticated=False)

    # The migrations this process was started with, read once: an upgrade installed while it
    # runs (new files on disk, applied after it stops) does not make it "not ready", and no
    # readiness probe reads files on the reactor.
    shipped = frozenset(m.version for m in migrate.load_migrations())

    @router.route("/api/ready", methods=["GET"])
    async def ready(request: Request) -> bytes:
        checks = {"database": "error", "migrations": "pending"}
        try:
            d = defer.Deferred.fromCoroutine(migrate.applied_versions(deps.db))
            d.addTimeout(2, deps.clock)
            applied = await d
            checks["database"] = "ok"
            if shipped <= applied:
                checks["migrations"] = "ok"
        except Exception:
            pass
        if checks == {"database": "ok", "migrations": "ok"}:
            return write_json(request, 200, {"status": "ready"}, authenticated=False)
        return write_json(request, 503, {"status": "not_ready", "checks": checks}, authenticated=False)

    openapi = openapi_document()

    @router.route("/api/openapi.json", methods=["GET"])
    def openapi_json(request: Request) -> bytes:
        json_headers(request, 200, authenticated=False)
        return openapi

    @router.route("/api/v1/info", methods=["GET"])
    def info(request: Request) -> bytes:
        config = deps.config
        body: dict[str, Any] = {
            "shared_domain": config.shared_domain,
            "slug_registration_enabled": config.shared_domain != "",
        }
        if config.http.public_url:
            body["public_url"] = config.http.public_url
        body["version"] = __version__
        return write_json(request, 200, body, authenticated=False)
