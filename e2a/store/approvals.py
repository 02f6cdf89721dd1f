"""HITL holds: reading a held message and every transition out of ``pending_approval``
(mail.md §8.3, §8.6).

Every transition is ONE conditional ``UPDATE … WHERE status = 'pending_approval'``: whoever
commits first wins and every other approver, rejecter or expiry worker updates zero rows (in
READ COMMITTED a writer blocked on the winner's row lock re-checks the condition on the new row
version). The same statement removes the bodies and attachments from the row, so no terminal
state ever keeps them. Each transition also writes its audit row to ``approvals`` in the same
transaction. ``now`` is always passed in (the caller's injected clock), never ``now()``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from e2a.store.database import Database, Txn, octets_params, octets_sql
from e2a.store.models import HeldAttachment, HeldMessage

__all__ = [
    "ACTORS",
    "TERMINAL_STATUSES",
    "DueHold",
    "Released",
    "count_pending",
    "due_holds",
    "expire_reject_txn",
    "get_held",
    "get_status",
    "lock_pending_txn",
    "record_txn",
    "reject_txn",
    "release_txn",
]

PENDING = "pending_approval"
TERMINAL_STATUSES = ("sent", "rejected", "expired_approved", "expired_rejected")
ACTORS = ("api", "magic_link", "worker", "console")  # console: the web console (e2a/console)

_COLUMNS = (
    "id, agent_id, user_id, type, status, subject, to_addrs, cc_addrs, bcc_addrs, body_text, body_html,"
    " attachments, conversation_id, in_reply_to, references_ids, email_message_id, approval_expires_at,"
    " created_at, edited, reviewed_at, rejection_reason, hitl_expiration_action"
)

# Set on every terminal transition: held content leaves the row (mail.md §9).
_SCRUB = "body_text = NULL, body_html = NULL, attachments = NULL"


def _list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(value or ())


def _held(row: dict[str, Any]) -> HeldMessage:
    attachments = row["attachments"]
    if isinstance(attachments, str):
        attachments = json.loads(attachments)
    return HeldMessage(
        id=row["id"],
        agent_id=row["agent_id"],
        user_id=row["user_id"],
        type=row["type"],
        status=row["status"],
        subject=row["subject"],
        to=_list(row["to_addrs"]),
        cc=_list(row["cc_addrs"]),
        bcc=_list(row["bcc_addrs"]),
        body_text=row["body_text"],
        body_html=row["body_html"] or None,
        attachments=tuple(
            HeldAttachment(a.get("filename", ""), a.get("content_type", ""), a.get("data", ""))
            for a in attachments or ()
        ),
        conversation_id=row["conversation_id"],
        in_reply_to=row["in_reply_to"],
        references=row["references_ids"],
        replied_message_id=row["email_message_id"],
        approval_expires_at=row["approval_expires_at"],
        created_at=row["created_at"],
        edited=bool(row["edited"]),
        reviewed_at=row["reviewed_at"],
        rejection_reason=row["rejection_reason"],
        expiration_action=row["hitl_expiration_action"],
    )


async def get_held(db: Database, message_id: str) -> HeldMessage | None:
    """The outbound message ``message_id`` (any status, any owner); None for unknown or
    inbound ids and for e2a's own mail (reviewer notifications, console sign-in links: 404 like
    in the message API).
    Ownership is the caller's check (magic links have none)."""
    row = await db.fetchone(
        f"SELECT {_COLUMNS} FROM messages WHERE id = %s AND direction = 'outbound'"
        " AND type NOT IN ('notify', 'signin')",
        (message_id,),
    )
    return None if row is None else _held(row)


async def get_status(db: Database, message_id: str) -> tuple[str, datetime | None] | None:
    """(status, approval_expires_at) of an outbound message, to explain a lost transition."""
    row = await db.fetchone(
        "SELECT status, approval_expires_at FROM messages WHERE id = %s AND direction = 'outbound'"
        " AND type NOT IN ('notify', 'signin')",
        (message_id,),
    )
    return None if row is None else (row["status"], row["approval_expires_at"])


async def count_pending(db: Database) -> int:
    """Held messages right now (the ``e2a_hitl_pending`` gauge): served by the partial index
    ``messages_pending_idx``, so it stays cheap however many messages were ever sent."""
    value = await db.fetchone("SELECT count(*) AS n FROM messages WHERE status = 'pending_approval'")
    return int(value["n"]) if value else 0


async def record_txn(txn: Txn, message_id: str, action: str, actor: str, detail: str = "") -> None:
    """The audit row of one hold transition (``approvals``)."""
    await txn.execute(
        "INSERT INTO approvals (message_id, action, actor, detail) VALUES (%s, %s, %s, %s)",
        (message_id, action, actor, detail),
    )


@dataclass(frozen=True)
class Released:
    """The row values a release writes (besides status, review time and scrubbing)."""

    subject: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    smtp_message_id: str
    method: str
    delivery_status: str
    composed: bytes | None


async def release_txn(
    txn: Txn,
    message_id: str,
    *,
    status: str,
    now: datetime,
    edited: bool,
    values: Released,
    require_unexpired: bool,
) -> bool | None:
    """Flip a pending hold to ``status`` (``sent`` or ``expired_approved``) with the released
    values; bodies and attachments are removed. ``require_unexpired`` (reviewer approvals): also
    only while ``now < approval_expires_at``. Returns the row's ``edited`` flag, or None when the
    hold was no longer pending (or, with ``require_unexpired``, had expired): the caller lost."""
    unexpired = " AND approval_expires_at > %(now)s" if require_unexpired else ""
    row = await txn.fetchone(
        f"UPDATE messages SET status = %(status)s, reviewed_at = %(now)s, edited = edited OR %(edited)s,"
        f" subject = %(subject)s, to_addrs = %(to)s, cc_addrs = %(cc)s, bcc_addrs = %(bcc)s,"
        f" smtp_message_id = %(smtp_message_id)s, method = %(method)s, delivery_status = %(delivery_status)s,"
        f" composed = {octets_sql('composed')}, {_SCRUB}"
        f" WHERE id = %(id)s AND direction = 'outbound' AND status = 'pending_approval'{unexpired}"
        f" RETURNING edited",
        {
            "status": status,
            "now": now,
            "edited": edited,
            "subject": values.subject,
            "to": json.dumps(list(values.to)),
            "cc": json.dumps(list(values.cc)),
            "bcc": json.dumps(list(values.bcc)),
            "smtp_message_id": values.smtp_message_id,
            "method": values.method,
            "delivery_status": values.delivery_status,
            **octets_params("composed", values.composed),
            "id": message_id,
        },
    )
    return None if row is None else bool(row["edited"])


async def reject_txn(txn: Txn, message_id: str, *, status: str, reason: str, now: datetime) -> bool:
    """Flip a pending hold to ``status`` (``rejected`` or ``expired_rejected``) with ``reason``;
    bodies and attachments are removed. False when it was no longer pending."""
    await txn.execute(
        f"UPDATE messages SET status = %(status)s, rejection_reason = %(reason)s, reviewed_at = %(now)s, {_SCRUB}"
        " WHERE id = %(id)s AND direction = 'outbound' AND status = 'pending_approval'",
        {"status": status, "reason": reason, "now": now, "id": message_id},
    )
    return txn.rowcount == 1


async def lock_pending_txn(txn: Txn, message_id: str) -> bool:
    """Claim one hold for the expiry worker: lock it if it is still pending and nobody else holds
    it (``FOR UPDATE SKIP LOCKED``). False: gone, resolved, or being resolved right now."""
    row = await txn.fetchone(
        "SELECT id FROM messages WHERE id = %s AND status = 'pending_approval' FOR UPDATE SKIP LOCKED",
        (message_id,),
    )
    return row is not None


@dataclass(frozen=True)
class DueHold:
    """A hold whose window has closed, with the expiration action that applies to it."""

    id: str
    action: str  # approve | reject


async def due_holds(db: Database, now: datetime, limit: int) -> list[DueHold]:
    """Up to ``limit`` pending holds with ``approval_expires_at <= now``, oldest first; rows
    another transaction is resolving right now are skipped (``SKIP LOCKED``). The action is the
    one stored at hold time, else (older holds) the agent's current one."""
    if limit <= 0:
        return []

    async def _due_txn(txn: Txn) -> list[DueHold]:
        rows = await txn.fetchall(
            "SELECT m.id, CASE WHEN m.hitl_expiration_action <> '' THEN m.hitl_expiration_action"
            " ELSE a.hitl_expiration_action END AS action"
            " FROM messages m JOIN agents a ON a.id = m.agent_id"
            " WHERE m.status = 'pending_approval' AND m.approval_expires_at <= %(now)s"
            " ORDER BY m.approval_expires_at, m.id LIMIT %(limit)s FOR UPDATE OF m SKIP LOCKED",
            {"now": now, "limit": limit},
        )
        return [DueHold(r["id"], r["action"]) for r in rows]

    return await db.run("due_holds", _due_txn)


async def expire_reject_txn(
    txn: Txn, message_ids: Sequence[str], *, reason: str, now: datetime, actor: str = "worker"
) -> list[str]:
    """Expire the given holds as ``expired_rejected`` with ``reason``, skipping any that are no
    longer pending, not yet due, or locked by a concurrent transition (``SKIP LOCKED``); one audit
    row each. Returns the ids that changed."""
    if not message_ids:
        return []
    rows = await txn.fetchall(
        "WITH due AS (SELECT id FROM messages WHERE id = ANY(%(ids)s) AND status = 'pending_approval'"
        " AND approval_expires_at <= %(now)s FOR UPDATE SKIP LOCKED)"
        f" UPDATE messages m SET status = 'expired_rejected', rejection_reason = %(reason)s,"
        f" reviewed_at = %(now)s, {_SCRUB}"
        " FROM due WHERE m.id = due.id AND m.status = 'pending_approval' RETURNING m.id",
        {"ids": list(message_ids), "now": now, "reason": reason},
    )
    done = [r["id"] for r in rows]
    if done:
        await txn.execute(
            "INSERT INTO approvals (message_id, action, actor, detail)"
            " SELECT unnest(%(ids)s::text[]), 'expire_reject', %(actor)s, %(reason)s",
            {"ids": done, "actor": actor, "reason": reason},
        )
    return done


async def record_hold_txn(txn: Txn, message_id: str) -> None:
    """The audit row of a new API hold, in the hold's transaction."""
    await txn.execute("INSERT INTO approvals (message_id, action, actor) VALUES (%s, 'hold', 'api')", (message_id,))
