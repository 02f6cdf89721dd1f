"""Read-only summaries the web console shows and the API has no endpoint for: per-agent
counts, the per-day chart, the held queue across a user's agents, an agent's outbound mail.

Every query is scoped by ``user_id`` (or by an agent id the caller already resolved through
:func:`e2a.store.agents.get_agent` for that user), so one user can never read another's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from e2a.store.database import Database
from e2a.store.notifications import NOTIFY_TYPE

__all__ = ["AgentStats", "DayCount", "HeldRow", "OutboundRow", "agent_stats", "daily_counts", "held_queue",
           "list_outbound", "recent_inbox"]


@dataclass(frozen=True)
class AgentStats:
    unread: int
    held: int
    last_status: str  # latest delivery's status, "" when none
    last_error: str
    last_attempt_at: datetime | None


async def agent_stats(db: Database, user_id: str) -> dict[str, AgentStats]:
    """agent id → its counts and webhook health, for every agent of ``user_id``."""
    rows = await db.fetchall(
        "SELECT a.id,"
        " (SELECT count(*) FROM messages m WHERE m.agent_id = a.id AND m.direction = 'inbound'"
        "   AND m.status = 'unread') AS unread,"
        " (SELECT count(*) FROM messages m WHERE m.agent_id = a.id AND m.direction = 'outbound'"
        "   AND m.status = 'pending_approval') AS held,"
        " last.status AS last_status, last.last_error, last.last_attempt_at"
        " FROM agents a"
        " LEFT JOIN LATERAL (SELECT status, last_error, last_attempt_at FROM deliveries d WHERE d.agent_id = a.id"
        "   ORDER BY created_at DESC, id DESC LIMIT 1) last ON TRUE"
        " WHERE a.user_id = %s",
        (user_id,),
    )
    return {
        r["id"]: AgentStats(int(r["unread"]), int(r["held"]), r["last_status"] or "", r["last_error"] or "",
                            r["last_attempt_at"])
        for r in rows
    }


@dataclass(frozen=True)
class DayCount:
    day: date
    received: int
    delivered: int


async def daily_counts(db: Database, user_id: str, today: date, days: int = 14) -> list[DayCount]:
    """Inbound messages received and webhook deliveries delivered per UTC day, the ``days``
    days ending with ``today`` (zero-filled, oldest first)."""
    first = today - timedelta(days=days - 1)
    start = datetime(first.year, first.month, first.day)
    received = await db.fetchall(
        # per agent, so each agent's (agent_id, created_at) index bounds the scan to 14 days
        "SELECT (m.created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS n FROM agents a"
        " JOIN messages m ON m.agent_id = a.id"
        " WHERE a.user_id = %s AND m.direction = 'inbound' AND m.created_at >= %s::timestamp AT TIME ZONE 'UTC'"
        " GROUP BY 1",
        (user_id, start),
    )
    delivered = await db.fetchall(
        "SELECT (d.delivered_at AT TIME ZONE 'UTC')::date AS day, count(*) AS n FROM deliveries d"
        " JOIN agents a ON a.id = d.agent_id"
        " WHERE a.user_id = %s AND d.status = 'delivered' AND d.delivered_at >= %s::timestamp AT TIME ZONE 'UTC'"
        " GROUP BY 1",
        (user_id, start),
    )
    rec = {r["day"]: int(r["n"]) for r in received}
    dlv = {r["day"]: int(r["n"]) for r in delivered}
    out = []
    for i in range(days):
        d = first + timedelta(days=i)
        out.append(DayCount(d, rec.get(d, 0), dlv.get(d, 0)))
    return out


@dataclass(frozen=True)
class HeldRow:
    id: str
    agent_id: str
    subject: str
    to: list[str]
    approval_expires_at: datetime | None
    created_at: datetime


async def held_queue(db: Database, user_id: str, limit: int = 200) -> list[HeldRow]:
    """The user's messages pending approval, across agents, oldest deadline first."""
    rows = await db.fetchall(
        "SELECT id, agent_id, subject, to_addrs, approval_expires_at, created_at FROM messages"
        " WHERE user_id = %s AND direction = 'outbound' AND status = 'pending_approval'"
        " ORDER BY approval_expires_at NULLS LAST, created_at, id LIMIT %s",
        (user_id, limit),
    )
    return [HeldRow(r["id"], r["agent_id"], r["subject"], list(r["to_addrs"] or []), r["approval_expires_at"],
                    r["created_at"]) for r in rows]


@dataclass(frozen=True)
class OutboundRow:
    id: str
    type: str
    status: str
    delivery_status: str
    subject: str
    to: list[str]
    edited: bool
    rejection_reason: str
    created_at: datetime


async def list_outbound(db: Database, agent_id: str, limit: int = 50) -> list[OutboundRow]:
    """An agent's latest outbound messages (sent, held, rejected), newest first; reviewer
    notifications are e2a's mail to the owner, not the agent's, and are left out (as in the API)."""
    rows: list[dict[str, Any]] = await db.fetchall(
        "SELECT id, type, status, delivery_status, subject, to_addrs, edited, rejection_reason, created_at"
        " FROM messages WHERE agent_id = %s AND direction = 'outbound' AND type <> %s"
        " ORDER BY created_at DESC, id DESC LIMIT %s",
        (agent_id, NOTIFY_TYPE, limit),
    )
    return [OutboundRow(r["id"], r["type"], r["status"], r["delivery_status"], r["subject"],
                        list(r["to_addrs"] or []), bool(r["edited"]), r["rejection_reason"], r["created_at"])
            for r in rows]


async def recent_inbox(db: Database, agent_id: str, limit: int = 100) -> list[Any]:
    """An agent's newest inbound messages, newest first, without their bytes (the API's inbox
    pages oldest first; a person looks at what came last)."""
    from e2a.store.messages import INBOUND_LIST_COLUMNS, inbound_message

    rows = await db.fetchall(
        f"SELECT {INBOUND_LIST_COLUMNS} FROM messages"
        " WHERE agent_id = %s AND direction = 'inbound' ORDER BY created_at DESC, id DESC LIMIT %s",
        (agent_id, limit),
    )
    return [inbound_message(r) for r in rows]
