"""The RCPT lookup remembers found agents briefly (e2a.smtp.recipients): what it remembers,
for how long, and what makes it forget. The database is a stand-in that counts lookups; the
same behaviour against PostgreSQL and LISTEN is in tests/integration/test_rcpt_cache.py."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, task

from e2a.smtp.recipients import AgentRecipients

TTL = 10.0


class _Agents:
    """``fetchone_prepared`` of the RCPT statement over a dict of agent key → agent id;
    ``gate``: when set, each lookup waits for it (a lookup in flight)."""

    def __init__(self, agents: dict[str, str]) -> None:
        self.agents = agents
        self.lookups: list[str] = []
        self.gate: defer.Deferred[None] | None = None

    async def fetchone_prepared(self, _statement: Any, params: dict[str, str]) -> dict[str, str] | None:
        self.lookups.append(params["key"])
        if self.gate is not None:
            await self.gate
        found = self.agents.get(params["key"])
        return None if found is None else {"id": found}


def _lookup(agents: dict[str, str] | None = None, **kwargs: Any) -> tuple[AgentRecipients, _Agents, task.Clock]:
    db = _Agents(agents if agents is not None else {"bot@acme.test": "Bot@acme.test"})
    clock = task.Clock()
    return AgentRecipients(db, clock, ttl=TTL, **kwargs), db, clock  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_found_agent_is_remembered_until_its_time_runs_out():
    rcpt, db, clock = _lookup()
    assert await rcpt("bot@acme.test") == "Bot@acme.test"
    clock.advance(TTL - 0.001)
    assert await rcpt("BOT@ACME.TEST") == "Bot@acme.test"  # the same agent key
    assert db.lookups == ["bot@acme.test"]
    clock.advance(0.001)
    assert await rcpt("bot@acme.test") == "Bot@acme.test"
    assert db.lookups == ["bot@acme.test", "bot@acme.test"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_recipient_is_never_remembered():
    """An agent created a moment after a 550 receives its next mail at once."""
    rcpt, db, _clock = _lookup({})
    assert await rcpt("new@acme.test") is None
    db.agents["new@acme.test"] = "new@acme.test"
    assert await rcpt("new@acme.test") == "new@acme.test"
    assert db.lookups == ["new@acme.test", "new@acme.test"]


@pytest_twisted.ensureDeferred
async def test_an_address_that_is_no_agent_key_is_refused_without_a_lookup():
    rcpt, db, _clock = _lookup()
    assert await rcpt("not an address") is None
    assert db.lookups == []


@pytest.mark.parametrize(
    ("payload", "forgotten"),
    [
        ("agent\tBot@acme.test", {"bot@acme.test"}),  # the deleted agent only
        ("agent\tsomeone@else.test", set()),
        ("user\tusr_1", {"bot@acme.test", "other@acme.test"}),  # an account: all of them
        ("key\tkey_1", set()),  # a revoked API key changes nothing for mail
        ("agentmode\tBot@acme.test", set()),
    ],
)
@pytest_twisted.ensureDeferred
async def test_revocation_events_forget_what_they_name(payload, forgotten):
    rcpt, db, _clock = _lookup({"bot@acme.test": "Bot@acme.test", "other@acme.test": "other@acme.test"})
    for key in ("bot@acme.test", "other@acme.test"):
        await rcpt(key)
    db.lookups.clear()
    rcpt.on_revoke(payload)
    for key in ("bot@acme.test", "other@acme.test"):
        await rcpt(key)
    assert set(db.lookups) == forgotten


@pytest_twisted.ensureDeferred
async def test_forget_all_when_the_listen_connection_is_back():
    rcpt, db, _clock = _lookup()
    await rcpt("bot@acme.test")
    rcpt.forget_all()
    await rcpt("bot@acme.test")
    assert len(db.lookups) == 2


@pytest_twisted.ensureDeferred
async def test_a_lookup_in_flight_during_a_revocation_is_not_remembered():
    """The lookup may have read the agent just before its deletion committed; the deletion's
    event arrived while the answer was on its way: remembering it would outlive the event."""
    rcpt, db, _clock = _lookup()
    db.gate = defer.Deferred()
    answer = defer.ensureDeferred(rcpt("bot@acme.test"))
    rcpt.on_revoke("agent\tBot@acme.test")
    db.gate.callback(None)
    db.gate = None
    assert await answer == "Bot@acme.test"
    await rcpt("bot@acme.test")
    assert len(db.lookups) == 2


@pytest_twisted.ensureDeferred
async def test_the_oldest_entries_go_first_when_full():
    agents = {f"a{i}@acme.test": f"a{i}@acme.test" for i in range(3)}
    rcpt, db, _clock = _lookup(agents, max_entries=2)
    for i in range(3):
        await rcpt(f"a{i}@acme.test")
    db.lookups.clear()
    await rcpt("a2@acme.test")
    await rcpt("a1@acme.test")
    await rcpt("a0@acme.test")
    assert db.lookups == ["a0@acme.test"]


@pytest_twisted.ensureDeferred
async def test_without_a_clock_every_rcpt_is_looked_up():
    db = _Agents({"bot@acme.test": "Bot@acme.test"})
    rcpt = AgentRecipients(db)  # type: ignore[arg-type]
    await rcpt("bot@acme.test")
    await rcpt("bot@acme.test")
    assert len(db.lookups) == 2
