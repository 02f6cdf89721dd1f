"""Send, reply, test and outbound message routes (api.md §4.6, §5.3, §6, §7.1–7.2)."""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import Principal, authenticate
from e2a.api.http import (
    MAIL_HEADER_FIELDS,
    SEND_CAP,
    get_bool,
    get_str,
    get_str_list,
    json_body,
    query_arg,
    read_body,
    write_json,
)
from e2a.errors import BadRequest, NotFound
from e2a.outbound import compose
from e2a.outbound.send import Draft, SendService
from e2a.store import agents as agents_store
from e2a.store.database import Database
from e2a.timefmt import ts_frac, ts_sec


def _attachments(body: dict[str, Any]) -> list[Any] | None:
    value = body.get("attachments")
    if value is not None and not isinstance(value, list):
        raise BadRequest("attachments must be an array", code="invalid_request_body")
    return value


def outbound_summary(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "direction": "outbound",
        "subject": row["subject"],
        "type": row["type"],
    }
    if row["conversation_id"]:
        out["conversation_id"] = row["conversation_id"]
    out["to"] = row["to_addrs"] or None
    if row["cc_addrs"]:
        out["cc"] = row["cc_addrs"]
    if row["bcc_addrs"]:
        out["bcc"] = row["bcc_addrs"]
    out["status"] = row["status"]
    if row["status"] == "pending_approval" and row["approval_expires_at"] is not None:
        out["approval_expires_at"] = ts_sec(row["approval_expires_at"])
    out["created_at"] = ts_sec(row["created_at"])
    return out


def outbound_detail(row: dict[str, Any], recipients: list[dict[str, Any]]) -> dict[str, Any]:
    out = outbound_summary(row)
    if row["email_message_id"]:
        out["email_message_id"] = row["email_message_id"]
    if row["status"] == "pending_approval":
        if row["body_text"]:
            out["body_text"] = row["body_text"]
        if row["body_html"]:
            out["body_html"] = row["body_html"]
        if row["attachments"]:
            out["attachments"] = row["attachments"]
    out["edited"] = bool(row["edited"])
    if row["reviewed_at"] is not None:
        out["reviewed_at"] = ts_sec(row["reviewed_at"])
    if row["rejection_reason"]:
        out["rejection_reason"] = row["rejection_reason"]
    for key in ("method", "smtp_message_id", "provider_message_id", "delivery_status"):
        if row[key]:
            out[key] = row[key]
    if recipients:
        out["recipients"] = [
            {
                "address": r["address"],
                "kind": r["kind"],
                "route": r["route"],
                "status": r["status"],
                "attempts": r["attempts"],
                "last_reply": r["last_reply"],
                "updated_at": ts_frac(r["updated_at"]),
            }
            for r in recipients
        ]
    return out


_OUTBOUND_COLUMNS = (
    "id, agent_id, subject, type, conversation_id, to_addrs, cc_addrs, bcc_addrs, status, approval_expires_at,"
    " created_at, email_message_id, body_text, body_html, attachments, edited, reviewed_at, rejection_reason,"
    " method, smtp_message_id, provider_message_id, delivery_status"
)


def install(router: Klein, deps: Any) -> None:
    db: Database = deps.db

    def service() -> SendService:
        svc = deps.extras.get("send")
        if svc is None:
            svc = SendService(db, deps.config, deps.master_key, deps.clock, deps.clock, None)
            deps.extras["send"] = svc
        return svc

    max_recipients = deps.config.outbound.max_recipients

    @router.route("/api/v1/send", methods=["POST"])
    async def send(request: Request) -> bytes:
        principal = await authenticate(request, db)
        body = json_body(request, SEND_CAP, header_fields=MAIL_HEADER_FIELDS)
        subject, text = get_str(body, "subject"), get_str(body, "body")
        html = get_str(body, "html_body")
        to, cc, bcc = get_str_list(body, "to"), get_str_list(body, "cc"), get_str_list(body, "bcc")
        conversation_id = get_str(body, "conversation_id")
        from_value = get_str(body, "from")
        attachments = _attachments(body)
        if not subject.strip():
            raise BadRequest("subject is required", code="missing_field")
        if not text:
            raise BadRequest("body is required", code="missing_field")
        if not any(a.strip() for a in (to or []) + (cc or [])):
            raise BadRequest("at least one to or cc recipient is required", code="no_recipients")
        svc = service()
        agent = await svc.resolve_sender(principal, from_value)
        await svc.check_send_allowed(agent)
        content = compose.validate_content(subject, text, html, conversation_id, attachments)
        recipients = compose.normalise_recipients(to, cc, bcc, agent.id, kind="send", max_recipients=max_recipients)
        routes = await svc.route(recipients.envelope)
        status, result = await svc.submit(Draft(agent, "send", recipients, routes, content))
        return write_json(request, status, result)

    @router.route("/api/v1/agents/<path:email>/messages/<message_id>/reply", methods=["POST"])
    async def reply(request: Request, email: str, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        agent = await _agent(principal, email)
        message_id = wire.path_id(message_id, ids.MESSAGE_ID_RE, "message_not_found", "message")
        original = await db.fetchone(
            "SELECT raw_message, subject, display_from, conversation_id, email_message_id FROM messages"
            " WHERE id = %s AND agent_id = %s AND direction = 'inbound'",
            (message_id, agent.id),
        )
        if original is None:
            raise NotFound("message not found", code="message_not_found")
        svc = service()
        await svc.check_send_allowed(agent)
        raw_body = read_body(request, SEND_CAP)
        from e2a.api.http import parse_json_object

        body = parse_json_object(raw_body, header_fields=MAIL_HEADER_FIELDS)
        text, html = get_str(body, "body"), get_str(body, "html_body")
        reply_all = bool(get_bool(body, "reply_all", False))
        cc, bcc = get_str_list(body, "cc"), get_str_list(body, "bcc")
        conversation_id = body.get("conversation_id")
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise BadRequest("conversation_id must be a string", code="invalid_request_body")
        attachments = _attachments(body)
        if not text:
            raise BadRequest("body is required", code="missing_field")
        raw = original["raw_message"]
        plan = compose.reply_plan(
            bytes(raw) if raw is not None else None,
            original["subject"],
            original["display_from"],
            original["conversation_id"],
            agent.id,
            reply_all,
            cc,
            bcc,
            conversation_id,
        )
        content = compose.validate_content(plan.subject, text, html, plan.conversation_id, attachments)
        recipients = compose.normalise_recipients(
            plan.to, plan.cc, plan.bcc, agent.id, kind="reply", max_recipients=max_recipients
        )
        routes = await svc.route(recipients.envelope)
        draft = Draft(
            agent,
            "reply",
            recipients,
            routes,
            content,
            in_reply_to=plan.in_reply_to,
            references=plan.references,
            replied_message_id=original["email_message_id"],
        )
        status, result = await svc.submit(draft)
        return write_json(request, status, result)

    @router.route("/api/v1/agents/<path:email>/test", methods=["POST"])
    async def test_email(request: Request, email: str) -> bytes:
        principal = await authenticate(request, db)
        agent = await _agent(principal, email)
        svc = service()
        await svc.check_send_allowed(agent)
        subject = "Test email from e2a"
        content = compose.validate_content(subject, compose.agent_test_body(agent.id, agent.name))
        recipients = compose.normalise_recipients([agent.id], None, None, agent.id, kind="test")
        routes = await svc.route(recipients.envelope)
        draft = Draft(agent, "test", recipients, routes, content)
        status, result = await svc.submit(draft)
        return write_json(request, status, result)

    @router.route("/api/v1/messages", methods=["GET"])
    async def list_outbound(request: Request) -> bytes:
        principal = await authenticate(request, db)
        status = query_arg(request, "status")
        if status not in (None, "pending_approval"):
            raise BadRequest("status must be pending_approval", code="invalid_field")
        sql = (
            f"SELECT {_OUTBOUND_COLUMNS} FROM messages WHERE user_id = %s AND direction = 'outbound'"
            " AND status = 'pending_approval'"
        )
        params: list[Any] = [principal.user_id]
        if not principal.is_user_scoped:
            sql += " AND lower(agent_id) = lower(%s)"
            params.append(principal.agent_id)
        rows = await db.fetchall(sql + " ORDER BY approval_expires_at ASC, id LIMIT 100", params)
        return write_json(request, 200, {"messages": [outbound_summary(r) for r in rows]})

    @router.route("/api/v1/messages/<message_id>", methods=["GET"])
    async def get_outbound(request: Request, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        message_id = wire.path_id(message_id, ids.MESSAGE_ID_RE, "message_not_found", "message")
        row = await db.fetchone(
            f"SELECT {_OUTBOUND_COLUMNS} FROM messages WHERE id = %s AND user_id = %s AND direction = 'outbound'"
            " AND type <> 'notify'",  # reviewer notifications (e2a.store.notifications) are e2a's own mail
            (message_id, principal.user_id),
        )
        if row is None or not principal.may_see_agent(row["agent_id"]):
            raise NotFound("message not found", code="message_not_found")
        recipients = await db.fetchall(
            "SELECT address, kind, route, status, attempts, last_reply, updated_at FROM outbound_recipients"
            " WHERE message_id = %s ORDER BY id",
            (message_id,),
        )
        return write_json(request, 200, outbound_detail(row, recipients))

    async def _agent(principal: Principal, email: str):
        """The path's agent as a model, with exactly the 404 rules of ``visible_agent``."""
        key = wire.path_agent_key(email)
        agent = await agents_store.get_agent(db, principal.user_id, key) if principal.may_see_agent(key) else None
        if agent is None:
            raise NotFound("agent not found", code="agent_not_found")
        return agent


__all__ = ["install", "outbound_detail", "outbound_summary"]
