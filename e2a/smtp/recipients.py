"""RCPT TO resolution: which envelope addresses are agents e2a accepts mail for.

An address matches when its domain (lowercased, IDNA) and local part (case-insensitive)
equal an agent's address on a *verified* domain (custom or shared). Anything else is
``550 5.1.1``: e2a is never a relay.
"""

from __future__ import annotations

import idna

from e2a.store.database import Database, Prepared


def normalise_rcpt(address: str) -> str | None:
    """Lowercase local part and IDNA A-label domain, or None when the domain is unusable."""
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        return None
    try:
        domain = idna.encode(domain.rstrip("."), uts46=True).decode("ascii") if not domain.isascii() else domain
    except idna.IDNAError:
        return None
    return f"{local}@{domain}".lower()


# One statement per RCPT, planned once per pooled connection.
_LOOKUP = Prepared(
    "e2a_rcpt_lookup",
    "SELECT a.id FROM agents a JOIN domains d ON d.domain = a.domain WHERE lower(a.id) = %(key)s AND d.verified",
)


class AgentRecipients:
    """The SMTP server's RecipientLookup backed by the agents table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, address: str) -> str | None:
        key = normalise_rcpt(address)
        if key is None:
            return None
        row = await self.db.fetchone_prepared(_LOOKUP, {"key": key})
        return None if row is None else row["id"]
