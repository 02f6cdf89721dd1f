"""The webhook worker keeps draining a backlog by itself: every freed slot wakes it, and a
delivered attempt hands its slot on to the agent's next due job.

Regression test for a stall found by the end-to-end bench: when several attempts of one agent
finished together, only the first woke the worker; its claim still saw the others' leases, so
the chain died and the backlog moved only on the 1 s safety poll. Runs the real
DeliveryService on a task.Clock with an in-memory queue (claims and record-and-lease
statements see a snapshot taken when the statement starts, commits of concurrent attempts are
staggered, as in PostgreSQL). Run twice: without the hand-on (a 2xx only records, so only the
wake-ups of freed slots drain the backlog, the original regression) and with it leasing the
agent's next job (the claim loop then runs only at the start and at the end)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from twisted.internet import defer, task

from e2a.config import WebhooksConfig
from e2a.delivery import worker
from e2a.delivery.webhook import AttemptResult
from e2a.store.deliveries import ClaimedJob


@pytest.mark.parametrize("hand_on", [False, True])
def test_backlog_drains_without_safety_poll(monkeypatch, hand_on):
    """40 due jobs for one agent (4 at a time) all finish within 0.9 s of fake time."""
    clock = task.Clock()
    jobs = {f"d{i}": {"leased": False, "done": False} for i in range(40)}
    stagger = itertools.cycle([0.001, 0.002, 0.003, 0.004])
    claims: list[int] = []
    posting = [0]
    most_posting = [0]

    def busy(exclude: str | None = None) -> int:
        return sum(1 for jid, j in jobs.items() if j["leased"] and not j["done"] and jid != exclude)

    def lease(n: int) -> list[ClaimedJob]:
        out = []
        for jid, j in jobs.items():
            if len(out) >= n:
                break
            if not j["leased"] and not j["done"]:
                j["leased"] = True
                out.append(ClaimedJob(jid, "m" + jid, "a", 0))
        return out

    async def claim_due(
        db: Any, now: Any, limit: int, lease_s: float, per_agent: int, skip_users: Any = (), reserved: Any = None
    ) -> list[ClaimedJob]:
        claims.append(limit)
        in_flight = busy() + sum((reserved or {}).values())  # the statement's snapshot
        await task.deferLater(clock, 0.002, lambda: None)
        return lease(min(limit, per_agent - in_flight))

    async def record_delivered_and_claim_next(
        db: Any, job: ClaimedJob, code: int, url: str, now: Any, lease_s: float, per_agent: int
    ) -> tuple[bool, ClaimedJob | None]:
        in_flight = busy(exclude=job.id)  # the statement's snapshot, the finishing job left out
        await task.deferLater(clock, next(stagger), lambda: None)
        jobs[job.id]["done"] = True
        if in_flight >= per_agent:
            return True, None
        nxt = lease(1)
        return True, (nxt[0] if nxt else None)

    async def record_delivered(db: Any, job: ClaimedJob, code: int, url: str, now: Any) -> bool:
        await task.deferLater(clock, next(stagger), lambda: None)
        jobs[job.id]["done"] = True
        return True

    class FakeClient:
        async def post(self, url: str, body: bytes, headers: Any) -> AttemptResult:
            posting[0] += 1
            most_posting[0] = max(most_posting[0], posting[0])
            await task.deferLater(clock, 0.005, lambda: None)
            posting[0] -= 1
            return AttemptResult(200)

        async def close(self) -> None:
            pass

    monkeypatch.setattr(worker.deliveries, "claim_due", claim_due)
    monkeypatch.setattr(worker.deliveries, "record_delivered_and_claim_next", record_delivered_and_claim_next)
    monkeypatch.setattr(worker.deliveries, "record_delivered", record_delivered)

    async def load_attempt(db: Any, job: ClaimedJob, *args: Any) -> Any:
        # Every field an attempt reads; the request itself is not built (build_request below).
        return SimpleNamespace(
            agent_mode="cloud", webhook_status="active", webhook_url="u", secrets=[b"s"],
            message_id=job.message_id, conversation_id="c", display_from="", to_addrs=[], cc_addrs=[],
            recipient=job.agent_id, raw_message=b"", auth_headers={}, received_at=None,
        )

    monkeypatch.setattr(worker.deliveries, "load_attempt", load_attempt)
    monkeypatch.setattr(worker, "build_request", lambda *a, **k: SimpleNamespace(body=b"", headers=[]))
    svc = worker.DeliveryService(None, None, None, WebhooksConfig(), False, b"k" * 32, clock, clock, client=FakeClient())
    svc.slots.hand_on = hand_on
    defer.Deferred.fromCoroutine(svc.start())
    for _ in range(900):  # 0.9 s: the 1 s safety poll never fires
        clock.advance(0.001)
    delivered = sum(j["done"] for j in jobs.values())
    idle = svc.slots.idle
    stopped = defer.Deferred.fromCoroutine(svc.stop())
    clock.advance(5)
    assert stopped.called
    assert delivered == 40
    assert most_posting[0] == 4
    assert idle
    if hand_on:
        # One claim filled the 4 slots; the rest only ran once slots stopped being handed on.
        assert len(claims) <= 5
    else:
        assert len(claims) >= 10
