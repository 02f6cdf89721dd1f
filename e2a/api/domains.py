"""Routes: custom domains (api.md §9) — list, claim, verify by DNS TXT, delete.

All of them need a user-scoped key; ``insufficient_scope`` is decided right after
authentication, before anything is read or looked up.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.http import JSON_CAP, get_str, json_body, write_json
from e2a.errors import BadRequest, NotFound, PreconditionFailed
from e2a.mailauth.dns import DnsTemporaryError
from e2a.policy.principal import Principal
from e2a.store import domains as domain_store
from e2a.timefmt import ts_frac


def _not_found() -> NotFound:
    return NotFound("domain not found", code="domain_not_found")


def reserved_domains(config: Any) -> set[str]:
    """The deployment's own domains, normalised like a claim (api.md §9.2)."""
    out = set()
    for name in config.reserved_domains():
        normalised = wire.path_domain(name)
        out.add(normalised if normalised is not None else name.lower().rstrip("."))
    return out


def token_found(records: list[str], token: str) -> bool:
    """api.md §9.3: verified when any TXT record (its strings concatenated) contains the token."""
    return any(token in record for record in records)


async def add_user_domain(deps: Any, user_id: str, raw: str) -> Any:
    """api.md §9.2 checks and claim, shared by the API route and the web console → Domain."""
    config = deps.config
    if not raw.strip():
        raise BadRequest("domain is required", code="missing_field")
    name = wire.normalise_domain(raw)
    if name in reserved_domains(config):
        raise BadRequest(f"domain {name} is reserved by this deployment", code="reserved_domain")
    now = datetime.fromtimestamp(deps.clock.seconds(), UTC)
    return await domain_store.claim_domain(
        deps.db,
        user_id,
        name,
        master_key=deps.master_key,
        takeover_hours=config.domains.claim_takeover_hours,
        now=now,
        keygen=deps.services.dkim_keygen,
    )


async def verify_user_domain(deps: Any, user_id: str, domain: str) -> Any:
    """api.md §9.3, shared by the API route and the web console → the verified Domain.

    Raises:
        NotFound: ``domain_not_found``. BadRequest: ``dns_lookup_failed``.
        PreconditionFailed: ``dns_record_not_found``.
    """
    db, config = deps.db, deps.config
    name = wire.path_domain(domain)
    if name is None:
        raise _not_found()
    found = await domain_store.get_user_domain(db, user_id, name)
    if found is None:
        raise _not_found()
    if not found.verified and not config.domains.auto_verify:
        if deps.dns is None:
            raise BadRequest("DNS lookup failed: no resolver configured", code="dns_lookup_failed")
        try:
            records = await deps.dns.lookup_txt(name)
        except DnsTemporaryError:
            raise BadRequest(
                f"DNS lookup of {name} failed temporarily; try again later",
                code="dns_lookup_failed",
            ) from None
        if not token_found(records, found.verification_token):
            raise PreconditionFailed(
                f"TXT record not found: publish a TXT record at {name} with the value "
                f"{found.verification_token}",
                code="dns_record_not_found",
            )
    if not found.verified:
        found = await domain_store.mark_verified(db, user_id, name)
    return found


def install(router: Klein, deps: Any) -> None:
    db = deps.db
    config = deps.config

    async def user_principal(request: Request) -> Principal:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        return principal

    def body_of(domain: Any) -> dict[str, Any]:
        return wire.domain_json(domain, config.smtp.domain)

    @router.route("/api/v1/domains", methods=["GET"])
    async def list_domains(request: Request) -> bytes:
        principal = await user_principal(request)
        found = await domain_store.list_domains(db, principal.user_id)
        return write_json(request, 200, {"domains": [body_of(d) for d in found]})

    @router.route("/api/v1/domains", methods=["POST"])
    async def add_domain(request: Request) -> bytes:
        principal = await user_principal(request)
        body = json_body(request, JSON_CAP, optional=True)
        domain = await add_user_domain(deps, principal.user_id, get_str(body, "domain"))
        return write_json(request, 201, body_of(domain))

    @router.route("/api/v1/domains/<domain>/verify", methods=["POST"])
    async def verify_domain(request: Request, domain: str) -> bytes:
        principal = await user_principal(request)
        found = await verify_user_domain(deps, principal.user_id, domain)
        assert found.verified_at is not None
        return write_json(
            request,
            200,
            {"domain": found.domain, "verified": True, "verified_at": ts_frac(found.verified_at)},
        )

    @router.route("/api/v1/domains/<domain>", methods=["DELETE"])
    async def delete_domain(request: Request, domain: str) -> bytes:
        principal = await user_principal(request)
        name = wire.path_domain(domain)
        if name is None:
            raise _not_found()
        await domain_store.delete_domain(db, principal.user_id, name)
        request.setResponseCode(204)
        request.setHeader(b"Cache-Control", b"no-store")
        return b""
