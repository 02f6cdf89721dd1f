"""Routes: API keys (§11), signing secrets (§10), export and deletion of the user (§12).

All of them need a user-scoped key; ``insufficient_scope`` is decided right after
authentication, before the body is read or anything is looked up, so an agent key learns
nothing about the account.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.internet import threads
from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.export import export_document
from e2a.api.http import JSON_CAP, encode_json, get_str, json_body, json_headers, query_arg, write_json
from e2a.errors import BadRequest, NotFound
from e2a.policy.principal import Principal
from e2a.store import accounts
from e2a.timefmt import ts_frac, ts_sec

MAX_NAME_CHARS = 100
UNNAMED_SECRET = "unnamed"


def key_name(body: dict[str, Any]) -> str:
    """§11.1 ``name``: optional string, ≤ 100 chars, default ``""`` (kept as given)."""
    name = get_str(body, "name")
    if len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"name must be at most {MAX_NAME_CHARS} characters", code="invalid_field")
    return name


def key_agent(body: dict[str, Any]) -> str | None:
    """§11.1 ``agent``: absent, null or blank → a user-scoped key."""
    agent = get_str(body, "agent").strip()
    return agent or None


def secret_name(body: dict[str, Any]) -> str:
    """§10.2 ``name``: trimmed, ≤ 100 chars, empty → ``unnamed``."""
    name = get_str(body, "name").strip()
    if len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"name must be at most {MAX_NAME_CHARS} characters", code="invalid_field")
    return name or UNNAMED_SECRET


def no_content(request: Request) -> bytes:
    request.setResponseCode(204)
    request.setHeader(b"Cache-Control", b"no-store")
    return b""


def install(router: Klein, deps: Any) -> None:
    db = deps.db

    async def user_principal(request: Request) -> Principal:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        return principal

    # ---- API keys (§11) ----------------------------------------------------------------

    @router.route("/api/v1/keys", methods=["POST"])
    async def create_key(request: Request) -> bytes:
        principal = await user_principal(request)
        body = json_body(request, JSON_CAP, optional=True)
        name = key_name(body)
        agent = key_agent(body)
        key, plaintext = await accounts.create_api_key(db, principal.user_id, name, agent)
        return write_json(
            request,
            201,
            {
                "id": key.id,
                "name": key.name,
                "key": plaintext,
                "key_prefix": key.key_prefix,
                "scope": key.scope,
                "agent": key.agent_id if key.scope == "agent" else None,
                "created_at": ts_frac(key.created_at),
            },
        )

    @router.route("/api/v1/keys", methods=["GET"])
    async def list_keys(request: Request) -> bytes:
        principal = await user_principal(request)
        keys = await accounts.list_api_keys(db, principal.user_id)
        return write_json(request, 200, {"keys": [wire.api_key_json(k) for k in keys]})

    @router.route("/api/v1/keys/<key_id>", methods=["DELETE"])
    async def revoke_key(request: Request, key_id: str) -> bytes:
        principal = await user_principal(request)
        key_id = wire.path_id(key_id, ids.KEY_ID_RE, "key_not_found", "API key")
        await accounts.revoke_api_key(db, principal.user_id, key_id)
        return no_content(request)

    # ---- signing secrets (§10) ---------------------------------------------------------

    @router.route("/api/v1/users/me/signing-secrets", methods=["GET"])
    async def list_secrets(request: Request) -> bytes:
        principal = await user_principal(request)
        secrets = await accounts.list_signing_secrets(db, principal.user_id)
        return write_json(request, 200, {"secrets": [wire.signing_secret_json(s) for s in secrets]})

    @router.route("/api/v1/users/me/signing-secrets", methods=["POST"])
    async def create_secret(request: Request) -> bytes:
        principal = await user_principal(request)
        body = json_body(request, JSON_CAP, optional=True)
        name = secret_name(body)
        meta, plaintext = await accounts.create_signing_secret(db, deps.master_key, principal.user_id, name)
        return write_json(
            request,
            201,
            {
                "id": meta.id,
                "name": meta.name,
                "secret": plaintext,
                "secret_prefix": meta.secret_prefix,
                "created_at": ts_sec(meta.created_at),
            },
        )

    @router.route("/api/v1/users/me/signing-secrets/<secret_id>", methods=["DELETE"])
    async def delete_secret(request: Request, secret_id: str) -> bytes:
        principal = await user_principal(request)
        secret_id = wire.path_id(secret_id, ids.SECRET_ID_RE, "signing_secret_not_found", "signing secret")
        await accounts.delete_signing_secret(db, principal.user_id, secret_id)
        return no_content(request)

    # ---- user data (§12) ---------------------------------------------------------------

    @router.route("/api/v1/users/me/export", methods=["GET"])
    async def export(request: Request) -> bytes:
        principal = await user_principal(request)
        snapshot = await accounts.export_user(db, principal.user_id)
        if snapshot is None:  # deleted between authentication and the read
            raise NotFound("user not found")
        doc = export_document(snapshot)
        # An export can hold every stored message: encode it off the reactor thread.
        reactor = deps.clock
        payload = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), encode_json, doc)
        json_headers(request, 200)
        request.setHeader(
            b"Content-Disposition", f'attachment; filename="e2a-export-{principal.user_id}.json"'.encode()
        )
        return payload

    @router.route("/api/v1/users/me", methods=["DELETE"])
    async def delete_me(request: Request) -> bytes:
        principal = await user_principal(request)
        if query_arg(request, "confirm") != "DELETE":
            raise BadRequest("add ?confirm=DELETE to delete the account", code="confirmation_required")
        counts = await accounts.delete_user(db, principal.user_id)
        return write_json(request, 200, counts)
