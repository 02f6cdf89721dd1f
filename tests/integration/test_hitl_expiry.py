"""The HITL expiry worker (mail.md §8.3, §8.6) under an injected task.Clock, against real
PostgreSQL and the API on a real socket: every expiry row of the states table, the sweep
schedule, the batch limit, SKIP LOCKED, and a failing sweep that does not stop the loop."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest_twisted

from twisted.internet import defer, task

from e2a.api.review import hold_review
from e2a.outbound.expiry import ExpiryService
from e2a.outbound.hitl import HoldReview
from e2a.outbound.identity import MailIdentity
from e2a.outbound.send import SendService
from e2a.store import accounts, approvals
from e2a.store.domains import ensure_shared_domain
from tests.support.apiserver import TEST_MASTER_KEY

TTL = 30


class Setup:
    def __init__(self, server: Any, key: str, clock: task.Clock) -> None:
        self.server, self.key, self.clock, self.db = server, key, clock, server.db

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        return await self.server.request(method, path, key=self.key, json_body=body)

    async def agent(self, slug: str, **settings: Any) -> str:
        r = await self.call("POST", "/api/v1/agents", {"slug": slug, "agent_mode": "local"})
        assert r.code == 201, r.body
        if settings:
            r = await self.call("PUT", f"/api/v1/agents/{slug}@agents.test", settings)
            assert r.code == 200, r.body
        return f"{slug}@agents.test"

    async def hold(self, agent: str, to: tuple[str, ...] = ("beta@agents.test",)) -> str:
        r = await self.call("POST", "/api/v1/send", {"from": agent, "to": list(to), "subject": "s", "body": "b"})
        assert r.code == 202, r.body
        return r.json()["message_id"]

    async def row(self, message_id: str) -> dict[str, Any]:
        return await self.db.fetchone(
            "SELECT status, rejection_reason, body_text, body_html, attachments, reviewed_at FROM messages"
            " WHERE id = %s", (message_id,)
        )

    async def inbox(self, agent: str) -> list[dict[str, Any]]:
        r = await self.call("GET", f"/api/v1/agents/{agent}/messages?status=all")
        return r.json()["messages"]


async def _setup(api_server_factory, db) -> Setup:
    clock = task.Clock()
    clock.advance(time.time())
    await ensure_shared_domain(db, "agents.test")
    boot = await accounts.bootstrap(db, TEST_MASTER_KEY, "owner@example.com")  # internal copies need a secret
    key = boot.api_key_plaintext
    server = await api_server_factory(clock=clock)
    s = Setup(server, key, clock)
    await s.agent("beta")
    return s


async def _tick(expiry: ExpiryService, clock: task.Clock, seconds: float) -> None:
    """Advance the clock; when that fires a sweep, wait for it to finish."""
    before = expiry._running
    clock.advance(seconds)
    if expiry._running is not before and expiry._running is not None:
        await expiry._running


def _scrubbed(row: dict[str, Any]) -> bool:
    return (row["body_text"], row["body_html"], row["attachments"]) == (None, None, None) and row["reviewed_at"]


@pytest_twisted.ensureDeferred
async def test_worker_applies_each_expiry_row_of_the_states_table(api_server_factory, db):
    """reject → expired_rejected ttl_expired; approve → expired_approved and delivered; approve
    impossible → expired_rejected with the §8.3 reason (domain, route, validation); the action
    stored at hold time wins over a later settings change; bodies NULL after each."""
    s = await _setup(api_server_factory, db)
    rejecter = await s.agent("rej", hitl_enabled=True, hitl_ttl_seconds=TTL)
    approver = await s.agent("app", hitl_enabled=True, hitl_ttl_seconds=TTL, hitl_expiration_action="approve")
    changed = await s.agent("chg", hitl_enabled=True, hitl_ttl_seconds=TTL)
    s_rej, s_app, s_chg = await s.hold(rejecter), await s.hold(approver), await s.hold(changed)
    await s.agent("gamma")
    no_route = await s.hold(approver, ("gamma@agents.test",))
    assert (await s.call("DELETE", "/api/v1/agents/gamma@agents.test")).code == 200
    assert (await s.call("PUT", f"/api/v1/agents/{changed}", {"hitl_expiration_action": "approve"})).code == 200

    expiry = ExpiryService(hold_review(s.server.deps), 60, s.clock)
    expiry.start()
    await expiry._running  # the sweep at start: nothing is due yet
    assert {(await s.row(m))["status"] for m in (s_rej, s_app, s_chg, no_route)} == {"pending_approval"}
    await _tick(expiry, s.clock, TTL + 1)  # due, but the next sweep is at 60 s
    assert (await s.row(s_rej))["status"] == "pending_approval"
    await _tick(expiry, s.clock, 60 - TTL - 1)

    row = await s.row(s_rej)
    assert (row["status"], row["rejection_reason"]) == ("expired_rejected", "ttl_expired") and _scrubbed(row)
    row = await s.row(s_chg)
    assert (row["status"], row["rejection_reason"]) == ("expired_rejected", "ttl_expired")
    row = await s.row(s_app)
    assert row["status"] == "expired_approved" and _scrubbed(row)
    assert [m["subject"] for m in await s.inbox("beta@agents.test")] == ["s"]
    row = await s.row(no_route)
    assert (row["status"], row["rejection_reason"]) == (
        "expired_rejected", "auto-approve failed: outbound not configured") and _scrubbed(row)
    detail = (await s.call("GET", f"/api/v1/messages/{s_app}")).json()
    assert detail["status"] == "expired_approved" and detail["delivery_status"] == "sent" and "body_text" not in detail

    # domain unverified at expiry
    unverified = await s.hold(approver)
    await db.execute("UPDATE domains SET verified = FALSE WHERE domain = 'agents.test'")
    await _tick(expiry, s.clock, 60)
    row = await s.row(unverified)
    assert (row["status"], row["rejection_reason"]) == (
        "expired_rejected", "auto-approve failed: agent domain not verified") and _scrubbed(row)
    await db.execute("UPDATE domains SET verified = TRUE WHERE domain = 'agents.test'")

    # validation fails at expiry (here: the deployment's recipient cap went down)
    two = await s.hold(approver, ("beta@agents.test", "rej@agents.test"))
    cfg = s.server.config
    strict = dataclasses.replace(cfg, outbound=dataclasses.replace(cfg.outbound, max_recipients=1))
    send = SendService(
        db, MailIdentity.from_config(strict), strict.outbound, strict.rate_limits, s.server.deps.master_key,
        s.clock, s.clock, None,
    )
    review = HoldReview(db, send, s.clock)
    s.clock.advance(TTL)
    assert await review.expire_due() == 1
    row = await s.row(two)
    assert (row["status"], row["rejection_reason"]) == (
        "expired_rejected", "auto-approve failed: 2 recipients; at most 1 are allowed")
    assert await approvals.count_pending(db) == 0
    await expiry.stop()


@pytest_twisted.ensureDeferred
async def test_expired_hold_refuses_approve_but_accepts_reject_until_swept(api_server_factory, db):
    """At or after approval_expires_at approve is 409 expired; reject still works (§7.4)."""
    s = await _setup(api_server_factory, db)
    alpha = await s.agent("alpha", hitl_enabled=True, hitl_ttl_seconds=TTL)
    first, second = await s.hold(alpha), await s.hold(alpha)
    s.clock.advance(TTL - 1)
    r = await s.call("GET", f"/api/v1/messages/{first}")
    assert r.json()["status"] == "pending_approval"
    s.clock.advance(1)  # now == approval_expires_at: closed
    r = await s.call("POST", f"/api/v1/messages/{first}/approve")
    assert (r.code, r.json()["error"]["code"]) == (409, "expired")
    r = await s.call("POST", f"/api/v1/messages/{first}/reject", {"reason": "late"})
    assert r.code == 200 and (await s.row(first))["status"] == "rejected"
    assert await hold_review(s.server.deps).expire_due() == 1
    row = await s.row(second)
    assert row["status"] == "expired_rejected" and _scrubbed(row)
    r = await s.call("POST", f"/api/v1/messages/{second}/reject")
    assert (r.code, r.json()["error"]["code"]) == (409, "not_pending")


@pytest_twisted.ensureDeferred
async def test_sweep_takes_oldest_first_up_to_the_limit_and_skips_locked_rows(api_server_factory, db):
    """expire_due(limit) ends the oldest due holds first; a hold another transaction has locked
    is skipped (SKIP LOCKED), not waited for, and ended by a later sweep."""
    s = await _setup(api_server_factory, db)
    alpha = await s.agent("alpha", hitl_enabled=True, hitl_ttl_seconds=TTL)
    held = []
    for _ in range(4):
        held.append(await s.hold(alpha))
        s.clock.advance(1)
    s.clock.advance(TTL)
    review = hold_review(s.server.deps)

    locked, release = defer.Deferred(), defer.Deferred()

    async def hold_lock(txn):
        await txn.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (held[0],))
        locked.callback(None)
        await release

    holder = defer.ensureDeferred(db.run("test_lock", hold_lock))
    await locked
    try:
        assert await review.expire_due(limit=2) == 2
        statuses = [(await s.row(m))["status"] for m in held]
        assert statuses == ["pending_approval", "expired_rejected", "expired_rejected", "pending_approval"]
    finally:
        release.callback(None)
        await holder
    assert await review.expire_due(limit=100) == 2
    assert {(await s.row(m))["status"] for m in held} == {"expired_rejected"}


@pytest_twisted.ensureDeferred
async def test_failing_sweep_is_logged_and_the_loop_goes_on(api_server_factory, db):
    """A sweep that raises does not stop the LoopingCall; the next interval sweeps again."""
    s = await _setup(api_server_factory, db)
    alpha = await s.agent("alpha", hitl_enabled=True, hitl_ttl_seconds=TTL)
    mid = await s.hold(alpha)
    review = hold_review(s.server.deps)
    calls = []
    real = review.expire_due

    async def flaky(limit: int = 100) -> int:
        calls.append(limit)
        if len(calls) == 2:
            raise RuntimeError("database went away")
        return await real(limit)

    review.expire_due = flaky  # type: ignore[method-assign]
    expiry = ExpiryService(review, 60, s.clock)
    expiry.start()
    await expiry._running
    await _tick(expiry, s.clock, 60)  # due now, but this sweep fails
    assert (await s.row(mid))["status"] == "pending_approval"
    await _tick(expiry, s.clock, 60)
    assert (await s.row(mid))["status"] == "expired_rejected"
    assert len(calls) == 3 and expiry._loop.running
    await expiry.stop()


@pytest_twisted.ensureDeferred
async def test_every_terminal_state_refuses_approve_and_reject(api_server_factory, db):
    """sent, rejected, expired_approved and expired_rejected: approve and reject are both 409
    not_pending, and the row keeps its state."""
    s = await _setup(api_server_factory, db)
    rej = await s.agent("rej", hitl_enabled=True, hitl_ttl_seconds=TTL)
    app = await s.agent("app", hitl_enabled=True, hitl_ttl_seconds=TTL, hitl_expiration_action="approve")
    sent, rejected = await s.hold(rej), await s.hold(rej)
    assert (await s.call("POST", f"/api/v1/messages/{sent}/approve")).code == 200
    assert (await s.call("POST", f"/api/v1/messages/{rejected}/reject")).code == 200
    expired_rejected, expired_approved = await s.hold(rej), await s.hold(app)
    s.clock.advance(TTL)
    assert await hold_review(s.server.deps).expire_due() == 2
    ended = {sent: "sent", rejected: "rejected", expired_rejected: "expired_rejected",
             expired_approved: "expired_approved"}
    for mid, status in ended.items():
        for action in ("approve", "reject"):
            r = await s.call("POST", f"/api/v1/messages/{mid}/{action}")
            assert (r.code, r.json()["error"]["code"]) == (409, "not_pending"), (status, action)
        row = await s.row(mid)
        assert row["status"] == status and _scrubbed(row)
    assert await approvals.count_pending(db) == 0
