"""Delivery routes: list an agent's webhook deliveries and redeliver a message (api.md §5.4–5.5)."""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.http import query_arg, write_json
from e2a.api.messages import page_size_arg, visible_agent
from e2a.errors import BadRequest
from e2a.store import deliveries
from e2a.store.database import Database

DELIVERY_FILTERS = ("pending", "delivered", "failed", "paused", "all")


def _cursor_filter(status: str, message_id: str) -> str:
    """What a cursor is bound to besides the agent: the status and the message filter."""
    return f"{status}\t{message_id}"


def install(router: Klein, deps: Any) -> None:
    db: Database = deps.db

    @router.route("/api/v1/agents/<path:email>/deliveries", methods=["GET"])
    async def list_deliveries(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        agent = await visible_agent(db, principal, email)
        status = query_arg(request, "status") or "all"
        if status not in DELIVERY_FILTERS:
            raise BadRequest("status must be pending, delivered, failed, paused or all", code="invalid_field")
        message_id = wire.query_id(query_arg(request, "message_id"), ids.MESSAGE_ID_RE, "message_id") or ""
        bound = _cursor_filter(status, message_id)
        token = query_arg(request, "token")
        before = wire.decode_cursor(token, bound, agent.id) if token else None
        rows, more = await deliveries.list_deliveries(
            db, agent.id, status, message_id or None, page_size_arg(request), before
        )
        body: dict[str, Any] = {"deliveries": [wire.delivery_json(d) for d in rows]}
        if more and rows:
            body["next_token"] = wire.encode_cursor(rows[-1].created_at, rows[-1].id, bound, agent.id)
        return write_json(request, 200, body)

    @router.route("/api/v1/agents/<path:email>/messages/<message_id>/redeliver", methods=["POST"])
    async def redeliver(request: Request, email: str, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        agent = await visible_agent(db, principal, email)
        message_id = wire.path_id(message_id, ids.MESSAGE_ID_RE, "message_not_found", "message")
        delivery_id = await deliveries.redeliver(db, agent.id, message_id)
        return write_json(
            request, 202, {"status": "queued", "delivery_id": delivery_id, "message_id": message_id}
        )
