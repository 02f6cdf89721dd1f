"""Who is calling: the authenticated :class:`Principal` behind an API key (api.md §0.1–0.2).

The HTTP API (e2a.api.auth) turns a Bearer key into a Principal; the WebSocket endpoint
(e2a.delivery) checks the same Principal's scope. Kept here so delivery never imports the API.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2a.errors import Forbidden


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
