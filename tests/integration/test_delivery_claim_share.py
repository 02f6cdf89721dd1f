"""The claim skips the jobs of users at their share of the process's slots (issue 15, point 4).

The rule itself is table-tested in tests/unit/test_delivery_slots.py; this pins the statement:
``claim_due(…, skip_users)`` leaves those users' due jobs unleased, still oldest first for the
others, and the claimed rows name the owner (``ClaimedJob.user_id``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest_twisted

from e2a.store import deliveries
from tests.integration.test_webhook_delivery import _agent, _message, _user


@pytest_twisted.ensureDeferred
async def test_claim_skips_users_at_their_share_when_named(db):
    """Jobs of a skipped user stay due and unleased; another user's job is claimed with its owner."""
    busy_user, _key, busy_secret = await _user(db, "busy@example.com")
    other_user, _key2, other_secret = await _user(db, "other@example.com")
    stuck = await _agent(db, busy_user, "http://127.0.0.1:9/hook", local="stuck")
    victim = await _agent(db, other_user, "http://127.0.0.1:9/hook", local="victim")
    for _ in range(3):
        await _message(db, busy_user, stuck, busy_secret)
    _mid, victim_delivery = await _message(db, other_user, victim, other_secret)

    jobs = await deliveries.claim_due(db, datetime.now(UTC), 1, 60.0, 4, [busy_user])
    assert [(j.id, j.user_id) for j in jobs] == [(victim_delivery, other_user)]

    rest = await deliveries.claim_due(db, datetime.now(UTC), 10, 60.0, 4)
    assert [(j.agent_id, j.user_id) for j in rest] == [(stuck, busy_user)] * 3
