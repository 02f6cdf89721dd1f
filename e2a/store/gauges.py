"""The queue-depth readings behind the ``/metrics`` gauges (api.md §3.3).

Why here and at scrape time: the depths are facts of the shared database, not of one process,
so every process reads the same numbers and ``processes: N`` cannot double-count them. Each
statement is a ``count(*)`` served by a partial index (``deliveries_due_idx``,
``outbound_recipients_due_idx``, ``messages_pending_idx``), cheap at scrape intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2a.store.approvals import count_pending
from e2a.store.database import Database

__all__ = ["QueueDepths", "queue_depths"]


@dataclass(frozen=True)
class QueueDepths:
    webhook_pending: int = 0
    webhook_paused: int = 0
    outbound: int = 0
    hitl_pending: int = 0


async def queue_depths(db: Database) -> QueueDepths:
    """Webhook jobs by status (pending, paused), relay recipients not yet terminal, and holds."""
    rows = await db.fetchall(
        "SELECT status, count(*) AS n FROM deliveries WHERE status IN ('pending', 'paused') GROUP BY status"
    )
    by_status = {r["status"]: int(r["n"]) for r in rows}
    outbound = await db.fetchone(
        "SELECT count(*) AS n FROM outbound_recipients WHERE route = 'smtp' AND status IN ('queued', 'deferred')"
    )
    return QueueDepths(
        webhook_pending=by_status.get("pending", 0),
        webhook_paused=by_status.get("paused", 0),
        outbound=int(outbound["n"]) if outbound else 0,
        hitl_pending=await count_pending(db),
    )
