"""Bearer API keys → :class:`Principal` (api.md §0.1–0.2).

Keys are looked up by their SHA-256 (the plaintext is never stored), so the lookup itself is
not timing-sensitive: an attacker learns nothing from how long a hash index probe takes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.web.server import Request

from e2a.api.http import header_str
from e2a.errors import Forbidden, Unauthorized
from e2a.ids import API_KEY_RE
from e2a.store.database import Database, Txn

# last_used_at is coalesced: written at most once per minute per key.
LAST_USED_GRANULARITY_SECONDS = 60


@dataclass(frozen=True)
class Principal:
    user_id: str
    user_email: str
    key_id: str
    scope: str  # "user" | "agent"
    agent_id: str | None  # set for agent-scoped keys

    @property
    def is_user_scoped(self) -> bool:
        return self.scope == "user"

    def require_user_scope(self) -> None:
        """403 insufficient_scope, decided before any lookup so it reveals nothing."""
        if not self.is_user_scoped:
            raise Forbidden("this endpoint needs a user-scoped key", code="insufficient_scope")

    def may_see_agent(self, agent_id: str) -> bool:
        return self.is_user_scoped or (self.agent_id or "").lower() == agent_id.lower()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def extract_key(authorization: str | None) -> str | None:
    """The key from an Authorization header value: ``Bearer <key>`` (scheme case-insensitive)
    or, for compatibility, the bare key. ``None`` when the header is absent."""
    if authorization is None:
        return None
    value = authorization.strip()
    parts = value.split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip()
    return value


async def _find_key_txn(txn: Txn, key_hash: str) -> dict[str, Any] | None:
    row = await txn.fetchone(
        "SELECT k.id, k.user_id, k.scope, k.agent_id, u.email,"
        " (k.last_used_at IS NULL OR k.last_used_at < now() - make_interval(secs => %s)) AS stale"
        " FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.key_hash = %s AND k.revoked_at IS NULL",
        (LAST_USED_GRANULARITY_SECONDS, key_hash),
    )
    if row is None:
        return None
    if row["scope"] == "agent" and row["agent_id"] is None:
        return None  # its agent was deleted: the key is dead
    if row["stale"]:
        await txn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s", (row["id"],))
    return row


async def authenticate_key(db: Database, key: str | None) -> Principal:
    """Raise 401 for a missing, malformed, unknown or revoked key; never fall back."""
    if key is None:
        raise Unauthorized("authentication required")
    if not API_KEY_RE.match(key):
        raise Unauthorized()
    row = await db.run("authenticate", _find_key_txn, hash_key(key))
    if row is None:
        raise Unauthorized()
    return Principal(row["user_id"], row["email"], row["id"], row["scope"], row["agent_id"])


async def authenticate(request: Request, db: Database) -> Principal:
    header = header_str(request, "authorization")
    return await authenticate_key(db, extract_key(header))


async def optional_principal(request: Request, db: Database) -> Principal | None:
    """For endpoints where a key is optional (feedback): an invalid key is ignored."""
    try:
        return await authenticate(request, db)
    except Unauthorized:
        return None
