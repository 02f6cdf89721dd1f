"""Helpers for HITL tests: a service with agents whose mail is held, and row-level checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from e2a.store import accounts
from tests.integration.test_send_internal import Client


@dataclass
class Deployment:
    service: Any
    boot: Any
    api: Client

    @property
    def db(self) -> Any:
        return self.service.db

    async def hold(self, body: dict[str, Any] | None = None, *, agent: str = "alpha@agents.test") -> str:
        """A held send from ``agent`` (default: to beta, internal); returns the message id."""
        payload = {"from": agent, "to": ["beta@agents.test"], "subject": "Plan", "body": "Shall we?"}
        payload.update(body or {})
        r = await self.api.call("POST", "/api/v1/send", payload)
        assert r.code == 202, r.body
        return r.json()["message_id"]

    async def row(self, message_id: str) -> dict[str, Any]:
        row = await self.db.fetchone(
            "SELECT status, body_text, body_html, attachments, edited, reviewed_at, rejection_reason, to_addrs,"
            " cc_addrs, bcc_addrs, subject, smtp_message_id, method, delivery_status FROM messages WHERE id = %s",
            (message_id,),
        )
        assert row is not None
        return row

    async def assert_scrubbed(self, message_id: str, status: str) -> dict[str, Any]:
        """The row is in ``status`` and its held bodies/attachments are NULL in PostgreSQL."""
        row = await self.row(message_id)
        assert row["status"] == status
        assert (row["body_text"], row["body_html"], row["attachments"]) == (None, None, None)
        assert row["reviewed_at"] is not None
        return row

    async def transitions(self, message_id: str) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT action FROM approvals WHERE message_id = %s AND action <> 'hold' ORDER BY id", (message_id,)
        )
        return [r["action"] for r in rows]


async def deployment(factory: Any, *, agents: tuple[str, ...] = ("alpha", "beta"), held_agents: tuple[str, ...] = ("alpha",),
                     **config: Any) -> Deployment:
    """A whole e2a service with local agents ``agents`` on agents.test; ``held_agents`` hold mail."""
    service = await factory(**config)
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    api = Client(service, boot.api_key_plaintext)
    for slug in agents:
        r = await api.call("POST", "/api/v1/agents", {"slug": slug, "agent_mode": "local", "name": slug.title()})
        assert r.code == 201, r.body
    for slug in held_agents:
        r = await api.call("PUT", f"/api/v1/agents/{slug}@agents.test", {"hitl_enabled": True})
        assert r.code == 200, r.body
    return Deployment(service, boot, api)
