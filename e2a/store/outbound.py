"""The outbound relay queue: ``outbound_recipients`` rows with route ``smtp`` (mail.md §7.8).

Same rules as the webhook queue (:mod:`e2a.store.deliveries`):

* Claims are ONE statement: due rows are grouped by message (one SMTP transaction carries all
  of a message's due recipients), locked with ``FOR UPDATE SKIP LOCKED`` and leased
  (``leased_until``). A crashed process's rows are claimable again when the lease runs out.
* Every claim stores a fresh random ``lease_token`` on its rows; every later write (lease
  renewal, in-doubt marker, outcome) is guarded by that token, ``attempts = <attempts at
  claim>`` and a non-terminal status. A worker whose lease ran out while its session was still
  alive (and whose rows another worker claimed since) therefore changes nothing, and
  :func:`mark_in_doubt` tells it not to send.
* ``now`` is passed in (the worker's injected clock), never ``now()``.
* Finishing locks the message row first, so two workers finishing different recipients of one
  message serialise and the recomputed ``delivery_status`` sees both.

The in-doubt marker: right before the message data is written, :func:`mark_in_doubt` commits
``last_reply = 'in doubt: …'`` on the accepted rows. A process that dies between the far end's
250 and :func:`record_outcomes` leaves that marker; the next claim sees it and the worker logs a
possible duplicate instead of resending silently (docs/outbound.md).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from e2a.store.database import Database, Txn, octets_params, octets_sql
from e2a.store.models import NewOutboundMessage, OutboundRecipientState, OutboundRecord

__all__ = [
    "IN_DOUBT_PREFIX",
    "ClaimedRecipient",
    "LeaseLost",
    "OutboundMessage",
    "RecipientResult",
    "claim_due",
    "delivery_status",
    "extend_leases",
    "load_message",
    "mark_in_doubt",
    "record_outcomes",
]

IN_DOUBT_PREFIX = "in doubt: "
PENDING_STATUSES = ("queued", "deferred")
TERMINAL_STATUSES = ("sent", "failed")


def delivery_status(statuses: Iterable[str]) -> str:
    """Message ``delivery_status`` from its recipients' statuses (mail.md §7.8).

    ``queued`` while any recipient is ``queued`` or ``deferred``; then ``sent`` when all are
    ``sent``, ``failed`` when all are ``failed``, else ``partial``. No recipients: ``sent``
    (nothing left to do).
    """
    seen = set(statuses)
    if seen & set(PENDING_STATUSES):
        return "queued"
    if not seen or seen == {"sent"}:
        return "sent"
    if seen == {"failed"}:
        return "failed"
    return "partial"


class LeaseLost(RuntimeError):
    """A claimed row is no longer this worker's (its lease ran out and another claim took it, or
    it was finished elsewhere)."""


@dataclass(frozen=True)
class ClaimedRecipient:
    """A leased row. ``attempts`` = attempts before this one."""

    id: int
    message_id: str
    address: str
    attempts: int
    queued_at: datetime
    last_reply: str
    #: The claim's token: proves this worker still owns the lease in every guarded write.
    lease_token: str = ""

    @property
    def attempt(self) -> int:
        return self.attempts + 1

    @property
    def in_doubt(self) -> bool:
        """A previous attempt wrote the message data and died before recording the outcome."""
        return self.last_reply.startswith(IN_DOUBT_PREFIX)


_CLAIM_SQL = """
WITH due AS (
    SELECT message_id, min(next_attempt_at) AS first_due
    FROM outbound_recipients
    WHERE route = 'smtp' AND status IN ('queued', 'deferred')
      AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s)
      AND (leased_until IS NULL OR leased_until <= %(now)s)
    GROUP BY message_id
    ORDER BY first_due NULLS FIRST, message_id
    LIMIT %(limit)s
), locked AS (
    SELECT r.id
    FROM outbound_recipients r JOIN due ON due.message_id = r.message_id
    WHERE r.route = 'smtp' AND r.status IN ('queued', 'deferred')
      AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= %(now)s)
      AND (r.leased_until IS NULL OR r.leased_until <= %(now)s)
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE outbound_recipients o SET leased_until = %(lease_until)s, lease_token = %(token)s
FROM locked
WHERE o.id = locked.id
RETURNING o.id, o.message_id, o.address, o.attempts, o.queued_at, o.last_reply, o.lease_token
"""


async def _claim_due_txn(txn: Txn, now: datetime, limit: int, lease_seconds: float) -> list[ClaimedRecipient]:
    # A fresh token per claim (not per row): unguessable, so no other claim can present it.
    token = secrets.token_hex(16)
    rows = await txn.fetchall(
        _CLAIM_SQL,
        {"now": now, "limit": limit, "lease_until": now + timedelta(seconds=lease_seconds), "token": token},
    )
    rows.sort(key=lambda r: (r["message_id"], r["id"]))
    return [
        ClaimedRecipient(
            r["id"], r["message_id"], r["address"], r["attempts"], r["queued_at"], r["last_reply"],
            r["lease_token"],
        )
        for r in rows
    ]


async def claim_due(
    db: Database, now: datetime, limit: int, lease_seconds: float
) -> dict[str, list[ClaimedRecipient]]:
    """Lease the due ``smtp`` recipients of up to ``limit`` messages (oldest due first) for
    ``lease_seconds``; returns them grouped by message id, recipients in insertion order."""
    if limit <= 0:
        return {}
    rows = await db.run("claim_outbound", _claim_due_txn, now, limit, lease_seconds)
    grouped: dict[str, list[ClaimedRecipient]] = {}
    for row in rows:
        grouped.setdefault(row.message_id, []).append(row)
    return grouped


def _guard_params(rows: Sequence[ClaimedRecipient]) -> dict[str, list[Any]]:
    return {
        "ids": [r.id for r in rows],
        "attempts": [r.attempts for r in rows],
        "tokens": [r.lease_token for r in rows],
    }


_GUARDED = (
    "FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(tokens)s::text[]) AS g(id, attempts, token)"
    " WHERE o.id = g.id AND o.attempts = g.attempts AND o.lease_token = g.token"
    " AND o.status IN ('queued', 'deferred')"
)


async def extend_leases(db: Database, rows: Sequence[ClaimedRecipient], until: datetime) -> int:
    """Push the lease of rows still being attempted to ``until`` (a slow but live session).
    Returns how many rows were still ours; fewer than ``len(rows)`` means a lease was lost."""
    if not rows:
        return 0
    guard = _guard_params(rows)

    async def _extend_txn(txn: Txn) -> int:
        await txn.execute(
            f"UPDATE outbound_recipients o SET leased_until = %(until)s {_GUARDED}",
            {**guard, "until": until},
        )
        return txn.rowcount

    return await db.run("extend_outbound_leases", _extend_txn)


async def mark_in_doubt(db: Database, rows: Sequence[ClaimedRecipient], now: datetime, until: datetime) -> None:
    """Record, durably and before any message byte is sent, that these rows are about to be
    transmitted; also extends their lease to ``until``.

    All or nothing: when any row is no longer ours the transaction is rolled back, so a worker
    that lost part of its lease leaves no marker on rows it will not send to.

    Raises:
        LeaseLost: a row was no longer ours (lease expired and claimed again, or finished
            elsewhere): do not send.
    """
    if not rows:
        return
    guard = _guard_params(rows)
    note = f"{IN_DOUBT_PREFIX}message data sent at {now.isoformat()}; outcome not recorded"

    async def _mark_txn(txn: Txn) -> int:
        await txn.execute(
            f"UPDATE outbound_recipients o SET last_reply = %(note)s, leased_until = %(until)s {_GUARDED}",
            {**guard, "note": note, "until": until},
        )
        if txn.rowcount != len(rows):
            raise LeaseLost(f"lease lost before DATA ({txn.rowcount} of {len(rows)} rows still ours)")
        return txn.rowcount

    await db.run("mark_outbound_in_doubt", _mark_txn)


@dataclass(frozen=True)
class OutboundMessage:
    id: str
    mail_from: str
    composed: bytes | None


async def load_message(db: Database, message_id: str) -> OutboundMessage | None:
    """The envelope sender and composed bytes of an outbound message; None when it is gone."""
    row = await db.fetchone(
        "SELECT id, sender, agent_id, composed FROM messages WHERE id = %s AND direction = 'outbound'",
        (message_id,),
    )
    if row is None:
        return None
    composed = None if row["composed"] is None else bytes(row["composed"])
    return OutboundMessage(row["id"], row["sender"] or row["agent_id"], composed)


@dataclass(frozen=True)
class RecipientResult:
    """The new state of one claimed row. ``next_attempt_at`` only for ``deferred``.
    ``attempted`` False: no attempt was made (message gone), attempts stays as it is."""

    row: ClaimedRecipient
    status: str
    reply: str
    next_attempt_at: datetime | None = None
    attempted: bool = True


async def _record_txn(
    txn: Txn, message_id: str, results: Sequence[RecipientResult], now: datetime, provider_message_id: str
) -> tuple[int, str]:
    message = await txn.fetchone("SELECT id FROM messages WHERE id = %s FOR UPDATE", (message_id,))
    if message is None:
        return 0, ""
    changed = 0
    for result in results:
        if result.status not in ("deferred", *TERMINAL_STATUSES):
            raise ValueError(f"bad recipient status {result.status!r}")
        await txn.execute(
            "UPDATE outbound_recipients SET status = %(status)s, attempts = attempts + %(inc)s,"
            " last_reply = %(reply)s, updated_at = %(now)s, next_attempt_at = %(next)s, leased_until = NULL,"
            " lease_token = NULL"
            " WHERE id = %(id)s AND attempts = %(attempts)s AND lease_token = %(token)s"
            " AND status IN ('queued', 'deferred')",
            {
                "status": result.status,
                "inc": 1 if result.attempted else 0,
                "reply": result.reply,
                "now": now,
                "next": result.next_attempt_at if result.status == "deferred" else None,
                "id": result.row.id,
                "attempts": result.row.attempts,
                "token": result.row.lease_token,
            },
        )
        changed += txn.rowcount
    rows = await txn.fetchall("SELECT status FROM outbound_recipients WHERE message_id = %s", (message_id,))
    status = delivery_status(r["status"] for r in rows)
    await txn.execute(
        "UPDATE messages SET delivery_status = %(status)s,"
        " provider_message_id = CASE WHEN provider_message_id = '' THEN %(pid)s ELSE provider_message_id END,"
        " composed = CASE WHEN %(done)s THEN NULL ELSE composed END"
        " WHERE id = %(id)s",
        {"status": status, "pid": provider_message_id, "done": status != "queued", "id": message_id},
    )
    return changed, status


async def record_outcomes(
    db: Database,
    message_id: str,
    results: Sequence[RecipientResult],
    now: datetime,
    provider_message_id: str = "",
) -> tuple[int, str]:
    """Write one attempt's per-recipient results, recompute the message's ``delivery_status``,
    keep the first ``provider_message_id`` and drop the composed bytes once every recipient is
    terminal. Returns (rows changed, new delivery_status); rows whose lease was lost meanwhile
    are left alone."""
    return await db.run("record_outbound", _record_txn, message_id, results, now, provider_message_id)


# ------------------------------------------------------------------------------ the API's view

_RECORD_COLUMNS = (
    "id, agent_id, subject, type, conversation_id, to_addrs, cc_addrs, bcc_addrs, status, approval_expires_at,"
    " created_at, email_message_id, body_text, body_html, attachments, edited, reviewed_at, rejection_reason,"
    " method, smtp_message_id, provider_message_id, delivery_status"
)


def _record(row: dict[str, Any]) -> OutboundRecord:
    return OutboundRecord(**{name: row[name] for name in OutboundRecord.__dataclass_fields__})


async def list_pending(db: Database, user_id: str, agent_id: str | None = None) -> list[OutboundRecord]:
    """The user's held messages, soonest expiry first (at most 100); only ``agent_id``'s when given."""
    sql = (
        f"SELECT {_RECORD_COLUMNS} FROM messages WHERE user_id = %s AND direction = 'outbound'"
        " AND status = 'pending_approval'"
    )
    params: list[Any] = [user_id]
    if agent_id is not None:
        sql += " AND lower(agent_id) = lower(%s)"
        params.append(agent_id)
    rows = await db.fetchall(sql + " ORDER BY approval_expires_at ASC, id LIMIT 100", params)
    return [_record(r) for r in rows]


async def get_record(db: Database, user_id: str, message_id: str) -> OutboundRecord | None:
    """One of the user's agents' outbound messages (never e2a's own notify/sign-in mail)."""
    row = await db.fetchone(
        f"SELECT {_RECORD_COLUMNS} FROM messages WHERE id = %s AND user_id = %s AND direction = 'outbound'"
        # reviewer notifications and console sign-in mail are e2a's own mail, not the agents'
        " AND type NOT IN ('notify', 'signin')",
        (message_id, user_id),
    )
    return None if row is None else _record(row)


async def list_recipient_states(db: Database, message_id: str) -> list[OutboundRecipientState]:
    """Every recipient row of one outbound message, in insertion order."""
    rows = await db.fetchall(
        "SELECT address, kind, route, status, attempts, last_reply, updated_at FROM outbound_recipients"
        " WHERE message_id = %s ORDER BY id",
        (message_id,),
    )
    return [OutboundRecipientState(**r) for r in rows]


# ------------------------------------------------------------------------------ the send path


async def insert_message_txn(txn: Txn, message: NewOutboundMessage) -> None:
    """Write one outbound record (a hold or a released message) inside the send transaction."""
    row = asdict(message)
    for name in ("to_addrs", "cc_addrs", "bcc_addrs"):
        row[name] = json.dumps(list(row[name]))
    if message.attachments is not None:
        row["attachments"] = json.dumps(
            [{"filename": a.filename, "content_type": a.content_type, "data": a.data} for a in message.attachments]
        )
    columns = ", ".join(row)
    values = ", ".join(octets_sql(k) if k == "composed" else f"%({k})s" for k in row)
    row.update(octets_params("composed", message.composed))  # after the columns: not one of them
    await txn.execute(f"INSERT INTO messages (direction, {columns}) VALUES ('outbound', {values})", row)


async def insert_recipient_txn(
    txn: Txn, message_id: str, address: str, kind: str, route: str, now: datetime
) -> None:
    """One envelope recipient of a released message: ``sent`` when internal (its copy is stored in
    the same transaction), else ``queued`` and due at ``now`` for the relay worker."""
    await txn.execute(
        "INSERT INTO outbound_recipients (message_id, address, kind, route, status, queued_at,"
        " updated_at, next_attempt_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (message_id, address, kind, route, "sent" if route == "internal" else "queued", now, now,
         None if route == "internal" else now),
    )
