"""Usage events (``usage.tracking``, mail.md §9): one row per stored inbound copy and per
released outbound message, listed by the export and counted by the account deletion
(e2a.store.accounts). Never read for enforcement: usage is not a quota.

Why inside the caller's transaction: the event commits with the copy or release it counts, so a
retried or rolled-back transaction records nothing and a committed one exactly one row. The
agent's owner and domain are read by the same INSERT (one statement, no extra round trip).
"""

from __future__ import annotations

import secrets

from e2a.store.database import Txn

__all__ = ["DIRECTIONS", "EVENT_TYPES", "record_txn"]

#: ``direction`` → ``event_type`` of the two events there are.
EVENT_TYPES = {"inbound": "message_received", "outbound": "message_sent"}
DIRECTIONS = frozenset(EVENT_TYPES)


async def record_txn(txn: Txn, agent_id: str, direction: str) -> None:
    """One usage event for ``agent_id`` (looked up case-insensitively; none if it is gone)."""
    await txn.execute(
        "INSERT INTO usage_events (id, user_id, agent_id, domain, direction, event_type)"
        " SELECT %s, user_id, id, domain, %s, %s FROM agents WHERE lower(id) = lower(%s)",
        ("ue_" + secrets.token_hex(16), direction, EVENT_TYPES[direction], agent_id),
    )
