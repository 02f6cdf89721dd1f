"""The HITL expiry worker (mail.md §8.6): ends holds whose approval window has closed.

Runs at start and every ``hitl.sweep_interval`` seconds in every process; sweeps of several
processes share the work through ``FOR UPDATE SKIP LOCKED`` and the conditional updates of
:mod:`e2a.store.approvals`, so each hold still makes exactly one transition. A sweep takes up
to 100 holds; when it finds a full batch it runs again at once rather than waiting a whole
interval, so a backlog drains without ever holding more than 100 rows at a time.

A failing sweep is logged and the loop carries on: a LoopingCall whose function fails stops
for good, which would silently leave every later hold pending for ever.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a.claimloop import OutageLog
from e2a.outbound.hitl import SWEEP_LIMIT, HoldReview

log = Logger()

#: Full batches in a row before a sweep yields to the next interval (bounds one sweep's work).
MAX_BATCHES_PER_SWEEP = 10


class ExpiryService:
    def __init__(self, review: HoldReview, interval: float, clock: Any, limit: int = SWEEP_LIMIT) -> None:
        self.review = review
        self.interval = interval
        self.clock = clock
        self.limit = limit
        self._loop: task.LoopingCall | None = None
        self._running: Deferred[Any] | None = None
        self._outage = OutageLog("HITL expiry sweep")

    async def sweep_once(self) -> int:
        """Run sweeps until one finds less than a full batch; returns the holds ended."""
        total = 0
        for _ in range(MAX_BATCHES_PER_SWEEP):
            try:
                n = await self.review.expire_due(self.limit)
            except Exception:
                self._outage.failed(Failure())
                break
            self._outage.succeeded()
            total += n
            if n < self.limit:
                break
        if total:
            log.info("HITL expiry: {n} held message(s) ended", n=total)
        return total

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def _tick(self) -> Deferred[Any]:
        d = Deferred.fromCoroutine(self.sweep_once())
        self._running = d
        return d

    async def stop(self) -> None:
        """Stop the loop and wait for a sweep in progress (its transactions need the database,
        which is stopped after us)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running
        if running is not None and not running.called:
            await running
