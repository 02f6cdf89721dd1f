"""Reviewer notification mail in the outbound queue (mail.md §8.7).

A notification is queued exactly like released mail: one ``messages`` row (direction
``outbound``, type ``notify``, envelope sender ``hitl-noreply@M``, the DKIM-signed bytes in
``composed``) plus one ``outbound_recipients`` row per reviewer, so the relay worker, its
retries, leases and in-doubt markers need nothing new. The row belongs to the held message's
agent and user, so deleting the agent or the user removes queued notifications with it, and
retention deletes it like any sent message. It is never shown by the outbound message API
(type ``notify`` is filtered there) because it is e2a's mail to the owner, not the agent's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from e2a.store.database import Database, Txn

__all__ = ["NOTIFY_TYPE", "insert_notification_txn", "internal_addresses", "savepoint_txn"]

NOTIFY_TYPE = "notify"


async def internal_addresses(db: Database, addresses: Sequence[str]) -> set[str]:
    """The lowercased ``addresses`` that are agents on this deployment (mail.md §7.3 route
    ``internal``)."""
    if not addresses:
        return set()
    rows = await db.fetchall(
        "SELECT lower(id) AS key FROM agents WHERE lower(id) = ANY(%s)", ([a.lower() for a in addresses],)
    )
    return {r["key"] for r in rows}


async def insert_notification_txn(
    txn: Txn,
    *,
    notification_id: str,
    held_message_id: str,
    agent_id: str,
    user_id: str,
    sender: str,
    subject: str,
    to: Sequence[str],
    routes: dict[str, str],
    smtp_message_id: str,
    composed: bytes | None,
    now: datetime,
) -> None:
    """The queued notification (``composed`` = the signed bytes, None when every reviewer is
    internal) and its recipient rows, plus an ``approvals`` row ``notify`` on the held
    message so the audit trail shows who was told."""
    smtp = any(r == "smtp" for r in routes.values())
    await txn.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, type, status, sender, subject, to_addrs,"
        " cc_addrs, bcc_addrs, smtp_message_id, composed, method, delivery_status, created_at)"
        " VALUES (%s, %s, %s, 'outbound', %s, 'sent', %s, %s, %s, '[]', '[]', %s, %s, %s, %s, %s)",
        (
            notification_id, agent_id, user_id, NOTIFY_TYPE, sender, subject, json.dumps(list(to)),
            smtp_message_id, composed if smtp else None, "smtp" if smtp else "internal",
            "queued" if smtp else "sent", now,
        ),
    )
    for address in to:
        route = routes[address]
        await txn.execute(
            "INSERT INTO outbound_recipients (message_id, address, kind, route, status, queued_at, updated_at,"
            " next_attempt_at) VALUES (%s, %s, 'to', %s, %s, %s, %s, %s)",
            (notification_id, address, route, "sent" if route == "internal" else "queued", now, now,
             None if route == "internal" else now),
        )
    await txn.execute(
        "INSERT INTO approvals (message_id, action, actor, detail) VALUES (%s, 'notify', 'api', %s)",
        (held_message_id, f"{notification_id} to {len(to)} reviewer(s)"),
    )


class savepoint_txn:  # noqa: N801 - used like a function: ``async with savepoint_txn(txn, name):``
    """``SAVEPOINT``/``ROLLBACK TO`` around optional work inside a larger transaction: a
    failure inside rolls back only that work, and the exception still propagates to the
    caller, who decides whether to swallow it (a notification must never fail its hold)."""

    def __init__(self, txn: Txn, name: str) -> None:
        self.txn = txn
        self.name = name

    async def __aenter__(self) -> None:
        await self.txn.execute(f"SAVEPOINT {self.name}")

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        if exc_type is None:
            await self.txn.execute(f"RELEASE SAVEPOINT {self.name}")
        else:
            await self.txn.execute(f"ROLLBACK TO SAVEPOINT {self.name}")
        return False
