"""``GET /api/v1/agents/{email}/ws``: the WebSocket handshake checks of api.md §13.

Every check needs the database or the registry and must fail as a plain HTTP response with the
JSON error body, *before* any upgrade — Autobahn's own ``onConnect`` denial would answer HTML.
So the checks run here, in the spec's order, and only when all pass does the route return the
``WebSocketResource`` (Klein renders an ``IResource`` returned by a route), which performs the
upgrade and hands the authenticated grant to the protocol.

The service is ``deps.services.websocket``, looked up per request; an API built without one
(some tests) answers the path as an unknown route.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a.api.auth import authenticate_key, extract_key
from e2a.api.http import header_str, query_arg
from e2a.api.messages import visible_agent
from e2a.delivery.websocket import is_upgrade_request, redact_token
from e2a.errors import BadRequest, E2AError, Forbidden, NotFound, Unavailable, UpgradeRequired

UPGRADE_HEADERS = {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"}


def install(router: Klein, deps: Any) -> None:
    db = deps.db

    @router.route("/api/v1/agents/<path:email>/ws", methods=["GET"])
    async def agent_socket(request: Request, email: str) -> Any:
        token = query_arg(request, "token")
        # Nothing downstream needs the key in the URI: the access log (written when an error
        # response finishes) and Autobahn's re-parse of the request both see ``token=***``.
        request.uri = redact_token(request.uri)
        service = deps.services.websocket
        if service is None:
            raise NotFound("no such route", code="not_found")
        if not service.running:
            raise Unavailable()

        # 1. key: the header wins when both are present; an invalid header never falls back.
        header = header_str(request, "authorization")
        key = extract_key(header) if header is not None else (token or None)
        principal = await authenticate_key(db, key)

        # 2. Origin (browsers only; absent is fine).
        if not service.origin_allowed(header_str(request, "origin")):
            raise Forbidden("origin not allowed", code="origin_not_allowed")

        # 3. agent visible to this key (404 for foreign and missing alike), 4. local mode.
        agent = await visible_agent(db, principal, email)
        if agent.agent_mode != "local":
            raise BadRequest("agent is not in local mode", code="agent_not_local")

        # 5. capacity, 6. a real upgrade request — then reserve synchronously (no await
        # between the count and the reservation, so concurrent handshakes cannot overshoot).
        if not service.has_capacity(agent.id):
            raise E2AError("too many connections for this agent", code="too_many_connections", status=429)
        upgradable = getattr(request.channel, "transport", None) is not None  # None over HTTP/2
        if not upgradable or not is_upgrade_request(request.method, request.getHeader):
            raise UpgradeRequired(headers=UPGRADE_HEADERS)
        return service.upgrade_resource(principal, agent.id)
