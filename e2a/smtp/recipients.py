"""RCPT TO resolution: which envelope addresses are agents e2a accepts mail for.

An address matches when its agent key (:func:`e2a.mailsyntax.addresses.agent_key`: local part
case-insensitive, domain as lowercase IDNA A-labels — the same key the API looks agents up by)
equals an agent's on a *verified* domain (custom or shared). Anything else is
``550 5.1.1``: e2a is never a relay.

Agents found are remembered for a few seconds (``RCPT_CACHE_SECONDS``): the lookup was one of
the three database round trips of every accepted message, and mail to one agent usually comes
in runs. Only found agents are remembered, so an agent created a moment ago receives at once.
Forgetting is driven by the agents' revocation events, which every process hears
(``CHANNEL_REVOKE``: ``agent`` on deletion, ``user`` on account deletion; a domain can only be
deleted once it has no agents, and a verified domain never becomes unverified); everything is
forgotten when the LISTEN connection comes back, since events may have been missed while it
was down. The cache is only a pre-check: the accept transaction reads the agent again, and mail
whose every recipient has gone by then is refused there (:mod:`e2a.inbound`).
"""

from __future__ import annotations

from typing import Any

from e2a.mailsyntax.addresses import agent_key
from e2a.store import agents as agent_store
from e2a.store.database import Database

#: How long a found agent is remembered. It bounds how long a deleted agent can still pass RCPT
#: when its deletion event was missed (LISTEN connection down).
RCPT_CACHE_SECONDS = 10.0
#: At most this many agents are remembered per process; beyond, the oldest entries go first.
RCPT_CACHE_ENTRIES = 10_000


class AgentRecipients:
    """The SMTP server's RecipientLookup backed by the agents table.

    ``clock`` (``IReactorTime``): with it, found agents are remembered (module docstring);
    without it, every RCPT is looked up.
    """

    def __init__(
        self,
        db: Database,
        clock: Any | None = None,
        *,
        ttl: float = RCPT_CACHE_SECONDS,
        max_entries: int = RCPT_CACHE_ENTRIES,
    ) -> None:
        self.db = db
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max(1, max_entries)
        self._found: dict[str, tuple[str, float]] = {}  # agent key → (agent id, expiry)
        # Counts revocations: a lookup that started before one may have read a deleted agent.
        self._generation = 0

    async def __call__(self, address: str) -> str | None:
        key = agent_key(address)
        if key is None:
            return None
        if self._clock is None:
            return await agent_store.find_receiving_agent(self.db, key)
        hit = self._found.get(key)
        if hit is not None:
            if hit[1] > self._clock.seconds():
                return hit[0]
            del self._found[key]
        generation = self._generation
        found = await agent_store.find_receiving_agent(self.db, key)
        # A revocation heard while the lookup ran may be about this agent: do not remember it.
        if found is not None and generation == self._generation:
            self._remember(key, found)
        return found

    def _remember(self, key: str, agent_id: str) -> None:
        assert self._clock is not None
        while len(self._found) >= self._max_entries:
            del self._found[next(iter(self._found))]
        self._found[key] = (agent_id, self._clock.seconds() + self._ttl)

    def on_revoke(self, payload: str) -> None:
        """A ``CHANNEL_REVOKE`` event: forget a deleted agent, or everything when an account
        was deleted (its agents are not named)."""
        kind, _, ident = payload.partition("\t")
        if kind == "agent":
            self._generation += 1
            for key in [k for k, (agent_id, _) in self._found.items() if agent_id == ident]:
                del self._found[key]
        elif kind == "user":
            self.forget_all()

    def forget_all(self) -> None:
        """Forget every remembered agent (an account deleted; the LISTEN connection is back)."""
        self._generation += 1
        self._found.clear()
