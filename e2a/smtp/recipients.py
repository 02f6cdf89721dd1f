"""RCPT TO resolution: which envelope addresses are agents e2a accepts mail for.

An address matches when its agent key (:func:`e2a.mailsyntax.addresses.agent_key`: local part
case-insensitive, domain as lowercase IDNA A-labels — the same key the API looks agents up by)
equals an agent's on a *verified* domain (custom or shared). Anything else is
``550 5.1.1``: e2a is never a relay.
"""

from __future__ import annotations

from e2a.mailsyntax.addresses import agent_key
from e2a.store import agents as agent_store
from e2a.store.database import Database


class AgentRecipients:
    """The SMTP server's RecipientLookup backed by the agents table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, address: str) -> str | None:
        key = agent_key(address)
        if key is None:
            return None
        return await agent_store.find_receiving_agent(self.db, key)
