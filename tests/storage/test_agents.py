"""Agent store contract on PostgreSQL: lookups by agent key, RCPT resolution, internal routing."""

from __future__ import annotations

import pytest_twisted

from e2a.mailsyntax.addresses import agent_key
from e2a.store import agents as agent_store
from e2a.store.models import Agent
from tests.storage.storehelpers import user_with_agent


@pytest_twisted.ensureDeferred
async def test_find_receiving_agent_returns_exact_id_on_verified_domain(db):
    """RCPT TO resolves an agent key to the stored id (its case kept) on a verified domain."""
    await user_with_agent(db, "Bot@agents.test")
    assert await agent_store.find_receiving_agent(db, agent_key("BOT@Agents.Test.")) == "Bot@agents.test"
    assert await agent_store.find_receiving_agent(db, "nobody@agents.test") is None


@pytest_twisted.ensureDeferred
async def test_find_receiving_agent_refuses_unverified_domain(db):
    """An agent on an unverified domain receives nothing (550 at RCPT)."""
    await user_with_agent(db, "bot@pending.test", verified=False)
    assert await agent_store.find_receiving_agent(db, "bot@pending.test") is None


@pytest_twisted.ensureDeferred
async def test_find_agent_is_case_insensitive_and_scoped_to_the_user(db):
    """find_agent and get_agent match case-insensitively, only among the user's agents."""
    user_id, address = await user_with_agent(db, "Bot@agents.test")
    other, _ = await user_with_agent(db, "x@other.test", email="other@example.com")
    found = await agent_store.find_agent(db, user_id, "bot@AGENTS.test")
    assert isinstance(found, Agent) and found.id == address and found.domain_verified
    assert found.agent_mode == "cloud" and found.webhook_status == "active"
    assert await agent_store.get_agent(db, user_id, "BOT@agents.test") == found
    assert await agent_store.find_agent(db, other, "bot@agents.test") is None


@pytest_twisted.ensureDeferred
async def test_fetch_agent_txn_finds_any_users_agent_inside_a_transaction(db):
    """Internal routing reads the recipient agent of any user in the sender's transaction."""
    await user_with_agent(db, "Bot@agents.test")
    found = await db.run("t", agent_store.fetch_agent_txn, None, "bot@agents.test")
    assert found is not None and found.id == "Bot@agents.test"
    assert await db.run("t", agent_store.fetch_agent_txn, None, "gone@agents.test") is None


@pytest_twisted.ensureDeferred
async def test_existing_agent_keys_returns_lowercased_matches_only(db):
    """Routing: which recipients are agents here, as lowercased keys; none for no recipients."""
    await user_with_agent(db, "Bot@agents.test")
    assert await agent_store.existing_agent_keys(db, ["BOT@agents.test", "x@elsewhere.test"]) == {
        "bot@agents.test"
    }
    assert await agent_store.existing_agent_keys(db, []) == set()
