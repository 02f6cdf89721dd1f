"""What the WebSocket side reads from the store: drain pages, one notification, whether a
connection's key and agent still allow it to stay open (the statements are in e2a/store/).
"""

from __future__ import annotations

from datetime import datetime

from e2a.delivery.websocket.rules import (
    REASON_AGENT_DELETED,
    REASON_KEY_REVOKED,
    REASON_MODE_CHANGED,
    Notification,
)
from e2a.store import accounts as account_store
from e2a.store import messages as message_store
from e2a.store.database import Database, Txn


async def unread_page(
    db: Database, agent_id: str, after: tuple[datetime, str] | None, page_size: int
) -> list[Notification]:
    """One drain page: the agent's unread inbound mail, oldest first (``created_at``, ``id``)."""
    return await message_store.unread_page(db, agent_id, after, page_size)


async def fetch_notification(db: Database, agent_id: str, message_id: str) -> Notification | None:
    return await message_store.fetch_summary(db, agent_id, message_id)


async def _grant_state_txn(txn: Txn, key_id: str, agent_id: str) -> str | None:
    """Why a connection may no longer stay open (a close reason), or ``None`` if it may."""
    state = await account_store.socket_grant_state_txn(txn, key_id, agent_id)
    if state.key_ok is None:
        return REASON_KEY_REVOKED  # key row gone: its user was deleted
    if state.agent_mode is None:
        return REASON_AGENT_DELETED
    if not state.key_ok:
        return REASON_KEY_REVOKED
    if state.agent_mode != "local":
        return REASON_MODE_CHANGED
    return None
