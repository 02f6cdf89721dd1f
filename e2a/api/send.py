"""Send, reply, test and outbound message routes (api.md §4.6, §5.3, §6, §7.1–7.2)."""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate
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
from e2a.policy.principal import Principal
from e2a.store import agents as agents_store
from e2a.store import messages as messages_store
from e2a.store import outbound as outbound_store
from e2a.store.database import Database
from e2a.store.models import OutboundRecipientState, OutboundRecord
from e2a.timefmt import ts_frac, ts_sec


def _attachments(body: dict[str, Any]) -> list[Any] | None:
    value = body.get("attachments")
    if value is not None and not isinstance(value, list):
        raise BadRequest("attachments must be an array", code="invalid_request_body")
    return value


def outbound_summary(m: OutboundRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id,
        "agent_id": m.agent_id,
        "direction": "outbound",
        "subject": m.subject,
        "type": m.type,
    }
    if m.conversation_id:
        out["conversation_id"] = m.conversation_id
    out["to"] = m.to_addrs or None
    if m.cc_addrs:
        out["cc"] = m.cc_addrs
    if m.bcc_addrs:
        out["bcc"] = m.bcc_addrs
    out["status"] = m.status
    if m.status == "pending_approval" and m.approval_expires_at is not None:
        out["approval_expires_at"] = ts_sec(m.approval_expires_at)
    out["created_at"] = ts_sec(m.created_at)
    return out


def outbound_detail(m: OutboundRecord, recipients: list[OutboundRecipientState]) -> dict[str, Any]:
    out = outbound_summary(m)
    if m.email_message_id:
        out["email_message_id"] = m.email_message_id
    if m.status == "pending_approval":
        if m.body_text:
            out["body_text"] = m.body_text
        if m.body_html:
            out["body_html"] = m.body_html
        if m.attachments:
            out["attachments"] = m.attachments
    out["edited"] = bool(m.edited)
    if m.reviewed_at is not None:
        out["reviewed_at"] = ts_sec(m.reviewed_at)
    if m.rejection_reason:
        out["rejection_reason"] = m.rejection_reason
    for key in ("method", "smtp_message_id", "provider_message_id", "delivery_status"):
        value = getattr(m, key)
        if value:
            out[key] = value
    if recipients:
        out["recipients"] = [
            {
                "address": r.address,
                "kind": r.kind,
                "route": r.route,
                "status": r.status,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "updated_at": ts_frac(r.updated_at),
            }
            for r in recipients
        ]
    return out


def install(router: Klein, deps: Any) -> None:
    db: Database = deps.db

    def service() -> SendService:
        svc: SendService = deps.services.send  # built by the composition root (e2a/service.py)
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
        original = await messages_store.get_reply_source(db, agent.id, message_id)
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
        plan = compose.reply_plan(
            original.raw_message,
            original.subject,
            original.display_from,
            original.conversation_id,
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
            replied_message_id=original.email_message_id,
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
        rows = await outbound_store.list_pending(
            db, principal.user_id, None if principal.is_user_scoped else principal.agent_id
        )
        return write_json(request, 200, {"messages": [outbound_summary(r) for r in rows]})

    @router.route("/api/v1/messages/<message_id>", methods=["GET"])
    async def get_outbound(request: Request, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        message_id = wire.path_id(message_id, ids.MESSAGE_ID_RE, "message_not_found", "message")
        row = await outbound_store.get_record(db, principal.user_id, message_id)
        if row is None or not principal.may_see_agent(row.agent_id):
            raise NotFound("message not found", code="message_not_found")
        recipients = await outbound_store.list_recipient_states(db, message_id)
        return write_json(request, 200, outbound_detail(row, recipients))

    async def _agent(principal: Principal, email: str):
        """The path's agent as a model, with exactly the 404 rules of ``visible_agent``."""
        key = wire.path_agent_key(email)
        agent = await agents_store.get_agent(db, principal.user_id, key) if principal.may_see_agent(key) else None
        if agent is None:
            raise NotFound("agent not found", code="agent_not_found")
        return agent


__all__ = ["install", "outbound_detail", "outbound_summary"]
