"""Bearer API keys → :class:`Principal` (api.md §0.1–0.2).

Keys are looked up by their SHA-256 (the plaintext is never stored), so the lookup itself is
not timing-sensitive: an attacker learns nothing from how long a hash index probe takes.
"""

from __future__ import annotations

import hashlib

from twisted.web.server import Request

from e2a.api.http import header_str
from e2a.errors import Unauthorized
from e2a.ids import API_KEY_RE
from e2a.policy.principal import Principal
from e2a.store import accounts as account_store
from e2a.store.database import Database


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


async def authenticate_key(db: Database, key: str | None) -> Principal:
    """Raise 401 for a missing, malformed, unknown or revoked key; never fall back."""
    if key is None:
        raise Unauthorized("authentication required")
    if not API_KEY_RE.match(key):
        raise Unauthorized()
    owner = await account_store.find_live_key(db, hash_key(key))
    if owner is None:
        raise Unauthorized()
    return Principal(owner.user_id, owner.user_email, owner.key_id, owner.scope, owner.agent_id)


async def authenticate(request: Request, db: Database) -> Principal:
    header = header_str(request, "authorization")
    return await authenticate_key(db, extract_key(header))


async def optional_principal(request: Request, db: Database) -> Principal | None:
    """For endpoints where a key is optional (feedback): an invalid key is ignored."""
    try:
        return await authenticate(request, db)
    except Unauthorized:
        return None
