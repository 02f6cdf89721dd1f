"""The webhook worker keeps draining a backlog by itself: every finished attempt wakes it.

Regression test for a stall found by the end-to-end bench: when several attempts of one agent
finished together, only the first woke the worker; its claim still saw the others' leases, so
the chain died and the backlog moved only on the 1 s safety poll. Runs the real
DeliveryService on a task.Clock with an in-memory queue (claims see a snapshot taken when the
statement starts, commits of concurrent attempts are staggered, as in PostgreSQL)."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer, task

from e2a.config import WebhooksConfig
from e2a.delivery import worker
from e2a.delivery.webhook import AttemptResult
from e2a.store.deliveries import ClaimedJob


def test_backlog_drains_without_safety_poll(monkeypatch):
    """40 due jobs for one agent (4 at a time) all finish within 0.9 s of fake time."""
    clock = task.Clock()
    jobs = {f"d{i}": {"leased": False, "done": False} for i in range(40)}
    stagger = itertools.cycle([0.001, 0.002, 0.003, 0.004])

    async def claim_due(db: Any, now: Any, limit: int, lease: float, per_agent: int) -> list[ClaimedJob]:
        busy = sum(1 for j in jobs.values() if j["leased"] and not j["done"])
        await task.deferLater(clock, 0.002, lambda: None)
        out = []
        for jid, j in jobs.items():
            if len(out) >= min(limit, per_agent - busy):
                break
            if not j["leased"] and not j["done"]:
                j["leased"] = True
                out.append(ClaimedJob(jid, "m" + jid, "a", 0))
        return out

    async def record_delivered(db: Any, job: ClaimedJob, *args: Any) -> bool:
        await task.deferLater(clock, next(stagger), lambda: None)
        jobs[job.id]["done"] = True
        return True

    class FakeClient:
        async def post(self, url: str, body: bytes, headers: Any) -> AttemptResult:
            await task.deferLater(clock, 0.005, lambda: None)
            return AttemptResult(200)

        async def close(self) -> None:
            pass

    monkeypatch.setattr(worker.deliveries, "claim_due", claim_due)
    monkeypatch.setattr(worker.deliveries, "record_delivered", record_delivered)
    svc = worker.DeliveryService(None, None, None, WebhooksConfig(), False, b"k" * 32, clock, clock, client=FakeClient())

    async def attempt(job: ClaimedJob) -> None:
        await svc._record(job, "u", await svc.client.post("u", b"", []))

    svc._attempt_unguarded = attempt
    defer.Deferred.fromCoroutine(svc.start())
    for _ in range(900):  # 0.9 s: the 1 s safety poll never fires
        clock.advance(0.001)
    delivered = sum(j["done"] for j in jobs.values())
    svc._running = False
    svc._loop.stop()
    clock.advance(5)
    assert delivered == 40
