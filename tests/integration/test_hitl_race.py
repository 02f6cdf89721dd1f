"""Exactly one transition per hold (mail.md §8.3): real concurrent approve and reject requests
against two e2a services ("processes") on one PostgreSQL database, racing both services'
expiry workers, repeated 50 times."""

from __future__ import annotations

import collections

import pytest_twisted

from twisted.internet import defer

from e2a.config import HitlConfig, RateLimitConfig
from tests.integration.test_send_internal import Client
from tests.support.hitl import deployment

ROUNDS = 50
REQUESTS = 20  # approve/reject calls per round, spread over both services
TERMINAL = {"sent", "rejected", "expired_approved", "expired_rejected"}


@pytest_twisted.ensureDeferred
async def test_racing_reviewers_and_workers_make_exactly_one_transition(e2a_service_factory):
    """Per round: one hold, 20 concurrent HTTP approve/reject calls over two services plus both
    services' expiry sweeps. Exactly one wins; every other request is 409 (`not_pending`, or
    `expired` for approvals after the window); one audit row; the row is terminal and scrubbed;
    an approved hold is delivered exactly once."""
    config = {"hitl": HitlConfig(sweep_interval=3600), "rate_limits": RateLimitConfig(send_per_minute=1000)}
    d = await deployment(e2a_service_factory, agents=("alpha", "beta", "omega"), held_agents=("alpha", "omega"), **config)
    other = await e2a_service_factory(**config)
    r = await d.api.call("PUT", "/api/v1/agents/omega@agents.test", {"hitl_expiration_action": "approve"})
    assert r.code == 200
    key = d.api.key
    clients = [d.api, Client(other, key)]
    reviews = [d.service.hold_review, other.hold_review]
    outcomes: collections.Counter[str] = collections.Counter()
    delivered = 0

    for n in range(ROUNDS):
        # Patterns (n % 4): 0 all approve, open window; 1 approve/reject, the window closes
        # during the race; 2 approve/reject, already due; 3 all approve, already due (only a
        # worker can win). Both expiration actions (alpha: reject, omega: approve) see each.
        pattern = n % 4
        mid = await d.hold(agent="omega@agents.test" if (n // 4) % 2 else "alpha@agents.test")
        if pattern in (2, 3):
            await d.db.execute("UPDATE messages SET approval_expires_at = now() - interval '1 second'"
                               " WHERE id = %s", (mid,))
        elif pattern == 1:
            await d.db.execute("UPDATE messages SET approval_expires_at = now() + interval '20 milliseconds'"
                               " WHERE id = %s", (mid,))
        calls = []
        for i in range(REQUESTS):
            action = "approve" if pattern in (0, 3) or i % 2 == 0 else "reject"
            calls.append(defer.ensureDeferred(clients[(i // 2) % 2].call("POST", f"/api/v1/messages/{mid}/{action}")))
            if i in (5, 15):
                calls.append(defer.ensureDeferred(reviews[i // 10].expire_due()))
        results = await defer.gatherResults(calls, consumeErrors=True)

        http = [r for r in results if not isinstance(r, int)]
        workers = [r for r in results if isinstance(r, int)]
        wins = [r for r in http if r.code == 200]
        assert len(wins) + sum(workers) == 1, (n, [r.code for r in http], workers)
        for r in http:
            if r.code != 200:
                assert r.code == 409, (n, r.code, r.body)
                assert r.json()["error"]["code"] in ("not_pending", "expired"), r.body
        row = await d.assert_scrubbed(mid, (await d.row(mid))["status"])
        assert row["status"] in TERMINAL
        [transition] = await d.transitions(mid)
        outcomes[transition] += 1
        if row["status"] in ("sent", "expired_approved"):
            delivered += 1
        if wins:
            assert wins[0].json()["status"] == {"approve": "sent", "reject": "rejected"}[transition]

    inbox = (await d.api.call("GET", "/api/v1/agents/beta@agents.test/messages?status=all&page_size=100")).json()["messages"]
    assert len(inbox) == delivered
    # the races really had every kind of winner
    assert set(outcomes) == {"approve", "reject", "expire_approve", "expire_reject"}, outcomes
