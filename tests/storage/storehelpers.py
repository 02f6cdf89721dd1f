"""Rows the store contract tests build on (straight SQL: the stores under test must not be used
to set up what they are tested on)."""

from __future__ import annotations

from typing import Any

from e2a.store.database import Database
from tests.support.apiserver import insert_user_with_key


async def user_with_agent(
    db: Database,
    address: str = "Bot@agents.test",
    *,
    verified: bool = True,
    mode: str = "cloud",
    email: str = "owner@example.com",
) -> tuple[str, str]:
    """A user, the domain of ``address`` and the agent; returns (user_id, agent id)."""
    user_id, _key = await insert_user_with_key(db, email)
    domain = address.split("@")[1]

    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (domain, user_id, verified),
        )
        await txn.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (address, user_id, domain, mode, "https://hook.example/in" if mode == "cloud" else "",
             "active" if mode == "cloud" else "none"),
        )

    await db.run("test_user_with_agent", _txn)
    return user_id, address
