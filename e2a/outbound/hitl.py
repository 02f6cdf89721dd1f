"""HoldReview: every way a held message leaves ``pending_approval`` (api.md §7.3-§7.4, §8;
mail.md §8.3, §8.6).

One object serves the API routes, the magic-link pages and the expiry worker, so the three
apply the same checks in the same order and release through the same outbound path
(:class:`~e2a.outbound.send.SendService`: internal route, relay jobs, DKIM, the held threading
ids). The outcome is decided by ONE conditional update in the store
(:mod:`e2a.store.approvals`), in the same transaction as the delivery jobs: approvers,
rejecters and expiry workers racing on a hold, in one process or several, produce exactly one
transition; every loser sees :class:`NotPending`.

The checks before that update (not found, not pending, expired, domain, validation, route)
only decide which error the caller gets; they never decide the outcome of a race.
Composition and signing run before the transaction (signing is a thread), so a racing loser
may have composed a message for nothing — cheap, and never sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

from e2a.errors import BadRequest, Conflict, E2AError, Forbidden, NotFound
from e2a.outbound import compose
from e2a.outbound.send import Draft, OutboundNotConfigured, SendService, log_internal_outcomes, release_result
from e2a.store import agents as agents_store
from e2a.store import approvals
from e2a.store.database import Database, Txn
from e2a.store.models import Agent, HeldMessage

__all__ = [
    "ACTIONS",
    "EDIT_FIELDS",
    "MAGIC_LINK_REJECTION",
    "MAX_REASON_CHARS",
    "TTL_EXPIRED",
    "Expired",
    "HoldReview",
    "NotPending",
    "build_draft",
]

log = Logger()

ACTIONS = ("approve", "reject")
EDIT_FIELDS = ("subject", "body_text", "body_html", "to", "cc", "bcc", "attachments")
MAX_REASON_CHARS = 1000
TTL_EXPIRED = "ttl_expired"
MAGIC_LINK_REJECTION = "magic-link rejection"
SWEEP_LIMIT = 100


class NotPending(Conflict):
    """409 ``not_pending``: the message already left ``pending_approval`` (api.md §7.3).
    ``current_status`` is its status now (the magic-link page shows it)."""

    code = "not_pending"
    default_message = "message is not pending approval"

    def __init__(self, current_status: str, message: str | None = None) -> None:
        super().__init__(message or f"message is not pending approval (status {current_status})")
        self.current_status = current_status


class Expired(Conflict):
    """409 ``expired``: approve at or after ``approval_expires_at`` (reject is still allowed)."""

    code = "expired"
    default_message = "the approval window of this message has closed"


class _Lost(Exception):
    """Raised inside a transition's transaction when its conditional update matched nothing:
    rolls the transaction back; the caller then explains the loss from the row's state."""


def _message_not_found() -> NotFound:
    return NotFound("message not found", code="message_not_found")


def _edit_str(edits: Mapping[str, Any], name: str, current: str) -> str:
    if name not in edits:
        return current
    value = edits[name]
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", code="invalid_request_body")
    return value


def _edit_list(edits: Mapping[str, Any], name: str, current: tuple[str, ...]) -> list[str]:
    if name not in edits:
        return list(current)
    value = edits[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be an array of strings", code="invalid_request_body")
    return value


def build_draft(held: HeldMessage, agent: Agent, edits: Mapping[str, Any] | None, max_recipients: int) -> tuple[Draft, bool]:
    """The held content with the reviewer's ``edits`` applied, validated and normalised exactly
    as a send is (api.md §6.1 #8, mail.md §7.1-§7.2) → (draft without routes, edited).

    A field counts as an edit only when its normalised value differs from the stored one;
    ``attachments`` counts whenever present (``[]`` removes them all). ``null`` = absent.
    A held test email is the fixed message of mail.md §7.4, so it cannot be edited.

    Raises:
        BadRequest: the codes of §6.1 #8, ``missing_field`` for an emptied subject or text
            body, ``invalid_request_body`` for a field of the wrong JSON type.
    """
    edits = {k: v for k, v in (edits or {}).items() if k in EDIT_FIELDS and v is not None}
    subject = _edit_str(edits, "subject", held.subject)
    body_text = _edit_str(edits, "body_text", held.body_text or "")
    body_html = _edit_str(edits, "body_html", held.body_html or "")
    if "attachments" in edits:
        attachments = edits["attachments"]
        if not isinstance(attachments, list):
            raise BadRequest("attachments must be an array", code="invalid_request_body")
    else:
        attachments = [dataclasses.asdict(a) for a in held.attachments]
    to = _edit_list(edits, "to", held.to)
    cc = _edit_list(edits, "cc", held.cc)
    bcc = _edit_list(edits, "bcc", held.bcc)

    content = compose.validate_content(subject, body_text, body_html, held.conversation_id, attachments)
    if held.type != "test":
        if not content.subject:
            raise BadRequest("subject is required", code="missing_field")
        if not content.body_text:
            raise BadRequest("body_text is required", code="missing_field")
    recipients = compose.normalise_recipients(to, cc, bcc, agent.id, kind=held.type, max_recipients=max_recipients)
    edited = (
        "attachments" in edits
        or content.subject != held.subject
        or content.body_text != (held.body_text or "")
        or content.body_html != (held.body_html or "")
        or (recipients.to, recipients.cc, recipients.bcc) != (held.to, held.cc, held.bcc)
    )
    if edited and held.type == "test":
        raise BadRequest("a held test email cannot be edited", code="invalid_field")
    draft = Draft(
        agent,
        held.type,
        recipients,
        {},
        content,
        in_reply_to=held.in_reply_to,
        references=held.references,
        replied_message_id=held.replied_message_id,
    )
    return draft, edited


class HoldReview:
    """Approve, reject and expire held messages.

    Built once by the composition root (e2a/service.py) and shared by the API routes, the
    magic-link pages and the expiry worker. ``via`` names who acted (``api``,
    ``magic_link``, ``worker``) for the audit trail in ``approvals``.
    """

    def __init__(self, db: Database, send: SendService, clock: Any) -> None:
        self.db = db
        self.send = send
        self.clock = clock
        self.max_recipients = send.outbound.max_recipients

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    # ---- checks ---------------------------------------------------------------------------

    async def _load(self, message_id: str, user_id: str | None) -> HeldMessage:
        held = await approvals.get_held(self.db, message_id)
        if held is None or (user_id is not None and held.user_id != user_id):
            raise _message_not_found()
        return held

    async def _checked(
        self, message_id: str, action: str, now: datetime, user_id: str | None
    ) -> tuple[HeldMessage, Agent | None]:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        held = await self._load(message_id, user_id)
        if not held.is_pending:
            raise NotPending(held.status)
        if action == "reject":
            return held, None
        if held.approval_expires_at is not None and now >= held.approval_expires_at:
            raise Expired()
        agent = await agents_store.get_agent_by_address(self.db, held.agent_id)
        if agent is None:  # the agent was deleted meanwhile (its messages go with it)
            raise _message_not_found()
        if not agent.domain_verified:
            raise Forbidden("the agent's domain is not verified", code="domain_not_verified")
        return held, agent

    async def check(
        self, message_id: str, action: str, *, now: datetime | None = None, user_id: str | None = None
    ) -> HeldMessage:
        """Read-only pre-checks in the magic-link order (api.md §8): 404 ``message_not_found``
        → 409 :class:`NotPending` → approve only: 409 :class:`Expired` (now ≥
        ``approval_expires_at``) → approve only: 403 ``domain_not_verified``. Changes nothing.

        ``user_id``: also 404 when the message is not that user's (API callers); None for
        magic links, whose token is the only credential.
        """
        held, _agent = await self._checked(message_id, action, now or self.now(), user_id)
        return held

    # ---- approve ----------------------------------------------------------------------------

    async def approve(
        self, message_id: str, *, user_id: str | None, edits: Mapping[str, Any] | None, via: str
    ) -> dict[str, Any]:
        """Release a hold (api.md §7.3), checks in this order: 404 → 409 ``not_pending`` → 409
        ``expired`` → 403 ``domain_not_verified`` → 400 validation (stays pending) → 503
        ``outbound_not_configured`` (stays pending) → release.

        ``user_id`` None: authorised by a magic-link token, no ownership check; the owner is
        recorded as reviewer. Returns the §7.3 200 body.
        """
        _check_via(via)
        now = self.now()
        held, agent = await self._checked(message_id, "approve", now, user_id)
        assert agent is not None
        draft, edited = build_draft(held, agent, edits, self.max_recipients)
        routes = await self.send.route(draft.recipients.envelope)
        draft = dataclasses.replace(draft, routes=routes)
        prepared = await self.send.prepare_release(draft, held.id, now)
        values = _released(draft, prepared)
        detail = f"reviewer={user_id or held.user_id}" + (";edited" if edited else "")

        async def _approve_txn(txn: Txn) -> bool:
            flag = await approvals.release_txn(
                txn, held.id, status="sent", now=now, edited=edited, values=values, require_unexpired=True
            )
            if flag is None:
                raise _Lost()
            await self.send.release_jobs_txn(txn, draft, prepared)
            await approvals.record_txn(txn, held.id, "approve", via, detail)
            return flag

        try:
            was_edited = await self.db.run("approve_hold", _approve_txn)
        except _Lost:
            raise await self._why_lost(held.id, now, "approve") from None
        log_internal_outcomes(draft, prepared)
        result = release_result(draft, prepared)
        return {
            "status": result["status"],
            "message_id": result["message_id"],
            "edited": was_edited,
            "method": result["method"],
            "smtp_message_id": result["smtp_message_id"],
            "delivery_status": result["delivery_status"],
        }

    async def _why_lost(self, message_id: str, now: datetime, action: str) -> E2AError:
        state = await approvals.get_status(self.db, message_id)
        if state is None:
            return _message_not_found()
        status, expires = state
        if status != "pending_approval":
            return NotPending(status)
        if action == "approve" and expires is not None and now >= expires:
            return Expired()
        return NotPending(status)  # not reached: only the two reasons above make us lose

    # ---- reject -----------------------------------------------------------------------------

    async def reject(self, message_id: str, *, user_id: str | None, reason: str, via: str) -> dict[str, Any]:
        """Reject a hold (api.md §7.4), also after ``approval_expires_at`` while the worker has
        not processed it: 404 → 409 ``not_pending`` → 400 ``invalid_field`` (reason over 1000
        characters). A magic-link rejection without a reason stores ``magic-link rejection``.
        Returns the §7.4 200 body."""
        _check_via(via)
        now = self.now()
        held, _agent = await self._checked(message_id, "reject", now, user_id)
        if not isinstance(reason, str):
            raise BadRequest("reason must be a string", code="invalid_request_body")
        if len(reason) > MAX_REASON_CHARS:
            raise BadRequest(f"reason must be at most {MAX_REASON_CHARS} characters", code="invalid_field")
        if via == "magic_link" and not reason.strip():
            reason = MAGIC_LINK_REJECTION
        detail = f"reviewer={user_id or held.user_id}"

        async def _reject_txn(txn: Txn) -> None:
            if not await approvals.reject_txn(txn, held.id, status="rejected", reason=reason, now=now):
                raise _Lost()
            await approvals.record_txn(txn, held.id, "reject", via, detail)

        try:
            await self.db.run("reject_hold", _reject_txn)
        except _Lost:
            raise await self._why_lost(held.id, now, "reject") from None
        return {"status": "rejected", "message_id": held.id, "rejection_reason": reason}

    # ---- expiry (mail.md §8.6) ----------------------------------------------------------------

    async def expire_due(self, limit: int = SWEEP_LIMIT) -> int:
        """One expiry sweep: up to ``limit`` due holds, oldest first, each per mail.md §8.3.
        A hold whose processing fails is logged and stays pending for the next sweep.
        Returns how many holds this sweep moved to a terminal state."""
        now = self.now()
        due = await approvals.due_holds(self.db, now, limit)
        done = 0
        rejects = [d.id for d in due if d.action != "approve"]
        if rejects:
            try:
                done += len(await self.db.run(
                    "expire_holds", approvals.expire_reject_txn, rejects, reason=TTL_EXPIRED, now=now
                ))
            except Exception:
                log.failure("expiring {n} held message(s) failed; retrying next sweep", n=len(rejects))
        for hold in due:
            if hold.action != "approve":
                continue
            try:
                done += int(await self._auto_approve(hold.id, now))
            except Exception:
                log.failure("auto-approving held message {id} failed; retrying next sweep", id=hold.id)
        return done

    async def _auto_approve(self, message_id: str, now: datetime) -> bool:
        held = await approvals.get_held(self.db, message_id)
        if held is None or not held.is_pending:
            return False
        agent = await agents_store.get_agent_by_address(self.db, held.agent_id)
        if agent is None:
            return False
        reason = ""
        try:
            if not agent.domain_verified:
                raise Forbidden("agent domain not verified", code="domain_not_verified")
            draft, _edited = build_draft(held, agent, None, self.max_recipients)
            draft = dataclasses.replace(draft, routes=await self.send.route(draft.recipients.envelope))
            prepared = await self.send.prepare_release(draft, held.id, now)
        except Forbidden:
            reason = "auto-approve failed: agent domain not verified"
        except OutboundNotConfigured:
            reason = "auto-approve failed: outbound not configured"
        except BadRequest as e:
            reason = f"auto-approve failed: {e.message}"
        if reason:
            changed = await self.db.run("expire_holds", approvals.expire_reject_txn, [held.id], reason=reason, now=now)
            return bool(changed)
        values = _released(draft, prepared)

        async def _expire_approve_txn(txn: Txn) -> bool:
            if not await approvals.lock_pending_txn(txn, held.id):
                return False
            if await approvals.release_txn(
                txn, held.id, status="expired_approved", now=now, edited=False, values=values, require_unexpired=False
            ) is None:
                return False
            await self.send.release_jobs_txn(txn, draft, prepared)
            await approvals.record_txn(txn, held.id, "expire_approve", "worker")
            return True

        released = await self.db.run("expire_approve_hold", _expire_approve_txn)
        if released:
            log_internal_outcomes(draft, prepared)
        return released


def _check_via(via: str) -> None:
    if via not in approvals.ACTORS:
        raise ValueError(f"via must be one of {approvals.ACTORS}, not {via!r}")


def _released(draft: Draft, prepared: Any) -> approvals.Released:
    return approvals.Released(
        subject=draft.content.subject,
        to=draft.recipients.to,
        cc=draft.recipients.cc,
        bcc=draft.recipients.bcc,
        smtp_message_id=prepared.smtp_message_id,
        method=draft.method,
        delivery_status=prepared.delivery_status,
        composed=prepared.smtp_bytes,
    )
