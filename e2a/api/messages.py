"""Inbox routes: list and read an agent's inbound mail (api.md §5.1–5.2)."""

from __future__ import annotations

import base64
from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.http import query_arg, write_json
from e2a.errors import BadRequest, NotFound
from e2a.mailauth.authheaders import format_ts_sec
from e2a.policy.principal import Principal
from e2a.store import agents as agent_store
from e2a.store import deliveries as delivery_store
from e2a.store import messages, ratelimits
from e2a.store.database import Database
from e2a.store.models import Agent, InboundMessage

INBOX_FILTERS = ("unread", "read", "all")


async def visible_agent(db: Database, principal: Principal, path_email: str) -> Agent:
    """The agent named in the path if this key may see it; otherwise exactly 404."""
    key = wire.path_agent_key(path_email)
    if not principal.may_see_agent(key):
        raise NotFound("agent not found", code="agent_not_found")
    agent = await agent_store.find_agent(db, principal.user_id, key)
    if agent is None:
        raise NotFound("agent not found", code="agent_not_found")
    return agent


def page_size_arg(request: Request) -> int:
    """api.md §0.7: 1–100, default 50; anything else silently becomes 50."""
    raw = query_arg(request, "page_size")
    try:
        value = int(raw) if raw is not None else 50
    except ValueError:
        return 50
    return value if 1 <= value <= 100 else 50


def summary_json(m: InboundMessage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message_id": m.id,
        "from": m.display_from,
        "to": m.to_addrs or [],
        "recipient": m.recipient,
        "subject": m.subject,
    }
    if m.cc_addrs:
        body["cc"] = m.cc_addrs
    if m.conversation_id:
        body["conversation_id"] = m.conversation_id
    body["status"] = m.status
    body["created_at"] = format_ts_sec(m.created_at)
    return body


def detail_json(m: InboundMessage) -> dict[str, Any]:
    body = summary_json(m)
    body["cc"] = m.cc_addrs or None
    body["conversation_id"] = m.conversation_id
    body["auth_headers"] = m.auth_headers
    body["raw_message"] = base64.b64encode(m.raw_message).decode("ascii")
    return body


def install(router: Klein, deps: Any) -> None:
    db: Database = deps.db
    poll_limit = deps.config.rate_limits.poll_per_minute

    async def poll_limited(principal: Principal) -> None:
        await ratelimits.hit(db, f"poll:{principal.user_id}", poll_limit, 60, deps.clock.seconds())

    @router.route("/api/v1/agents/<path:email>/messages", methods=["GET"])
    async def list_messages(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        await poll_limited(principal)
        agent = await visible_agent(db, principal, email)
        status = query_arg(request, "status") or "unread"
        if status not in INBOX_FILTERS:
            raise BadRequest("status must be unread, read or all", code="invalid_field")
        token = query_arg(request, "token")
        after = wire.decode_cursor(token, status, agent.id) if token else None
        rows, more = await messages.list_inbox(db, agent.id, status, page_size_arg(request), after)
        body: dict[str, Any] = {"messages": [summary_json(m) for m in rows]}
        if more and rows:
            body["next_token"] = wire.encode_cursor(rows[-1].created_at, rows[-1].id, status, agent.id)
        return write_json(request, 200, body)

    @router.route("/api/v1/agents/<path:email>/messages/<message_id>", methods=["GET"])
    async def get_message(request: Request, email: str, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        await poll_limited(principal)
        agent = await visible_agent(db, principal, email)
        message_id = wire.path_id(message_id, ids.MESSAGE_ID_RE, "message_not_found", "message")
        mark_read = query_arg(request, "mark_read")
        if mark_read not in (None, "true", "false"):
            raise BadRequest("mark_read must be true or false", code="invalid_field")
        record = await messages.read_inbound(db, agent.id, message_id, mark_read=mark_read != "false")
        if record is None:
            raise NotFound("message not found", code="message_not_found")
        body = detail_json(record)
        delivery = await delivery_store.latest_for_message(db, record.id)
        if delivery is not None and agent.agent_mode == "cloud":
            d: dict[str, Any] = {
                "id": delivery.id,
                "status": delivery.status,
                "attempts": delivery.attempts,
                "last_error": delivery.last_error,
            }
            if delivery.next_attempt_at is not None and delivery.status == "pending":
                d["next_attempt_at"] = wire.format_ts_frac(delivery.next_attempt_at)
            body["delivery"] = d
        return write_json(request, 200, body)
