"""Routes: agents (api.md §4.1–4.5) — list, register, read, update, delete.

Registration follows the check order of api.md §4.2 exactly (first failure wins); the
register limit is counted per client IP before authentication so that unauthenticated
floods are limited too. Every update rule of §4.4 is applied by the store in one transaction.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.http import (
    AGENT_HEADER_FIELDS,
    JSON_CAP,
    client_ip,
    get_bool,
    get_int,
    get_str,
    get_str_list,
    header_str,
    json_body,
    write_json,
)
from e2a.errors import BadRequest, NotFound
from e2a.policy import ssrf
from e2a.policy.principal import Principal
from e2a.store import agents as agent_store
from e2a.store import ratelimits
from e2a.store.agents import AgentUpdate

REGISTER_WINDOW_SECONDS = 3600
UPDATE_FIELDS = (
    "webhook_url",
    "agent_mode",
    "hitl_enabled",
    "hitl_ttl_seconds",
    "hitl_expiration_action",
    "name",
    "hitl_notify",
    "hitl_reviewers",
)


def agent_not_found() -> NotFound:
    return NotFound("agent not found", code="agent_not_found")


def request_client_ip(request: Request, deps: Any) -> str:
    """api.md §0.9 client IP of ``request``."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", "") or ""
    forwarded = header_str(request, "x-forwarded-for")
    return client_ip(host, forwarded, deps.trusted_proxies)


def parse_update(body: dict[str, Any]) -> AgentUpdate:
    """The recognised ``PUT`` fields (api.md §4.4), each checked on its own.

    Raises:
        BadRequest: ``no_fields``, ``invalid_request_body`` (JSON types), ``invalid_field``,
            ``invalid_header_value``, ``invalid_address``.
    """
    if not any(f in body for f in UPDATE_FIELDS):
        raise BadRequest("no recognised field in the request", code="no_fields")
    webhook_url = get_str(body, "webhook_url") if "webhook_url" in body else None
    agent_mode = get_str(body, "agent_mode") if "agent_mode" in body else None
    hitl_enabled = get_bool(body, "hitl_enabled")
    hitl_ttl = get_int(body, "hitl_ttl_seconds")
    action = get_str(body, "hitl_expiration_action") if "hitl_expiration_action" in body else None
    name = get_str(body, "name") if "name" in body else None
    hitl_notify = get_bool(body, "hitl_notify")
    reviewers = get_str_list(body, "hitl_reviewers")

    if agent_mode is not None and agent_mode not in wire.AGENT_MODES:
        raise BadRequest("agent_mode must be cloud or local", code="invalid_field")
    if hitl_ttl is not None and not 1 <= hitl_ttl <= wire.HITL_TTL_MAX:
        raise BadRequest(
            f"hitl_ttl_seconds must be between 1 and {wire.HITL_TTL_MAX}", code="invalid_field"
        )
    if action is not None and action not in wire.HITL_ACTIONS:
        raise BadRequest("hitl_expiration_action must be approve or reject", code="invalid_field")
    if name is not None:
        wire.check_agent_name(name)
    parsed_reviewers = tuple(wire.parse_reviewers(reviewers)) if reviewers is not None else None
    return AgentUpdate(
        webhook_url=webhook_url,
        agent_mode=agent_mode,
        hitl_enabled=hitl_enabled,
        hitl_ttl_seconds=hitl_ttl,
        hitl_expiration_action=action,
        name=name,
        hitl_notify=hitl_notify,
        hitl_reviewers=parsed_reviewers,
    )


async def check_webhook_url(deps: Any, url: str) -> None:
    """api.md §4.2 #7 webhook URL rules (SSRF): shared by the API and the web console."""
    config = deps.config
    await ssrf.validate_webhook_url(
        deps.dns,
        url,
        production=config.production,
        allow_private=config.webhooks.allow_private,
    )


def shared_domain_of(config: Any) -> str:
    if not config.shared_domain:
        return ""
    return wire.path_domain(config.shared_domain) or config.shared_domain.lower()


async def register_agent(
    deps: Any, user_id: str, *, slug: str, email: str, name: str, webhook_url: str, agent_mode: str
) -> Any:
    """api.md §4.2 checks 4-10 (after the rate limit, authentication and JSON types), in that
    order; the API route and the web console both register through here. Returns the Agent."""
    db = deps.db
    # 4. slug: shared domain configured; slug valid
    via_slug = slug != ""
    shared = shared_domain_of(deps.config)
    if via_slug:
        if not shared:
            raise BadRequest(
                "slug registration is disabled (no shared domain)", code="shared_domain_disabled"
            )
        wire.check_slug(slug)
        email = f"{slug}@{shared}"
    # 5. address present
    if not email.strip():
        raise BadRequest("email is required (or slug)", code="missing_field")
    # 6. address syntax; name
    address, domain = wire.normalise_agent_address(email)
    wire.check_agent_name(name)
    # 7. webhook URL rules
    if webhook_url:
        await check_webhook_url(deps, webhook_url)
    # 8. custom domain owned and verified; the shared domain only through a slug
    if not via_slug:
        await agent_store.check_agent_domain(db, user_id, domain)
    # 9. mode
    mode = agent_mode or "cloud"
    if mode not in wire.AGENT_MODES:
        raise BadRequest("agent_mode must be cloud or local", code="invalid_field")
    if mode == "cloud" and not webhook_url:
        raise BadRequest("a cloud-mode agent needs a webhook_url", code="webhook_url_required")
    # 10. address free (the unique index decides, case-insensitively, across users)
    return await agent_store.create_agent(
        db,
        user_id,
        address,
        domain,
        via_slug=via_slug,
        name=name,
        agent_mode=mode,
        webhook_url=webhook_url,
    )


def install(router: Klein, deps: Any) -> None:
    db = deps.db
    config = deps.config

    async def check_webhook(url: str) -> None:
        await check_webhook_url(deps, url)

    @router.route("/api/v1/agents", methods=["GET"])
    async def list_agents(request: Request) -> bytes:
        principal = await authenticate(request, db)
        only = None if principal.is_user_scoped else (principal.agent_id or "")
        found = await agent_store.list_agents(db, principal.user_id, only)
        return write_json(request, 200, {"agents": [wire.agent_json(a) for a in found]})

    @router.route("/api/v1/agents", methods=["POST"])
    async def create_agent(request: Request) -> bytes:
        # 1. register limit per client IP, every attempt, before authentication
        await ratelimits.hit(
            db,
            f"register:{request_client_ip(request, deps)}",
            config.rate_limits.register_per_hour,
            REGISTER_WINDOW_SECONDS,
            deps.clock.seconds(),
        )
        # 2. authentication; user scope
        principal: Principal = await authenticate(request, db)
        principal.require_user_scope()
        # 3. JSON (types included)
        body = json_body(request, JSON_CAP, optional=True, header_fields=AGENT_HEADER_FIELDS)
        slug = get_str(body, "slug")
        email = get_str(body, "email")
        name = get_str(body, "name")
        webhook_url = get_str(body, "webhook_url")
        agent_mode = get_str(body, "agent_mode")
        agent = await register_agent(
            deps, principal.user_id, slug=slug, email=email, name=name, webhook_url=webhook_url, agent_mode=agent_mode
        )
        return write_json(request, 201, {"id": agent.id, "domain": agent.domain, "email": agent.id})

    @router.route("/api/v1/agents/<email>", methods=["GET"])
    async def get_agent(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        key = wire.path_agent_key(email)
        if not principal.may_see_agent(key):
            raise agent_not_found()
        agent = await agent_store.get_agent(db, principal.user_id, key)
        if agent is None:
            raise agent_not_found()
        return write_json(request, 200, wire.agent_json(agent))

    @router.route("/api/v1/agents/<email>", methods=["PUT"])
    async def update_agent(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        key = wire.path_agent_key(email)
        if await agent_store.get_agent(db, principal.user_id, key) is None:
            raise agent_not_found()
        body = json_body(request, JSON_CAP, optional=True, header_fields=AGENT_HEADER_FIELDS)
        update = parse_update(body)
        if update.webhook_url:
            await check_webhook(update.webhook_url)
        agent = await agent_store.update_agent(db, principal.user_id, key, update)
        if agent is None:
            raise agent_not_found()
        return write_json(request, 200, wire.agent_json(agent))

    @router.route("/api/v1/agents/<email>", methods=["DELETE"])
    async def delete_agent(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        deleted = await agent_store.delete_agent(db, principal.user_id, wire.path_agent_key(email))
        if deleted is None:
            raise agent_not_found()
        return write_json(request, 200, {"status": "deleted"})
