"""Retention sweep (mail.md §9): old messages, feedback, expired rate-limit windows and
expired console sessions and sign-in links.

Runs in every process; each DELETE is one statement, so concurrent sweeps just find less work.
A failing step is logged and the loop carries on — a LoopingCall whose function fails stops
for good, which would silently end retention.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a.claimloop import OutageLog
from e2a.config import RetentionConfig
from e2a.store import feedback as feedback_store
from e2a.store import messages as message_store
from e2a.store import ratelimits
from e2a.store import sessions as session_store
from e2a.store.database import Database, DatabaseUnavailable

log = Logger()

# (description, purge(db, days)); days is retention.days. Held outbound mail is never purged.
SWEEPS: tuple[tuple[str, Callable[[Database, int], Awaitable[None]]], ...] = (
    ("inbound messages", message_store.purge_inbound_older_than),
    ("outbound messages", message_store.purge_outbound_older_than),
    ("feedback", feedback_store.purge_older_than),
)


async def _expired_console_sessions(db: Database, now: float) -> int:
    return await session_store.delete_expired(db, datetime.fromtimestamp(now, UTC))


# (description, delete(db, now)): rows that can no longer be used, whatever retention.days
# says; ``now`` is the injected clock's time.
EXPIRED: tuple[tuple[str, Callable[[Database, float], Awaitable[int]]], ...] = (
    ("rate-limit windows", ratelimits.delete_expired),
    ("console sessions and sign-in links", _expired_console_sessions),
)


class RetentionService:
    def __init__(self, db: Database, config: RetentionConfig, clock: Any) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self._loop: task.LoopingCall | None = None
        self._running: Deferred[None] | None = None
        self._stopping = False
        self._outage = OutageLog("retention sweep")

    async def sweep_once(self) -> None:
        """Every step once; a step that fails is logged and the next one runs, except while the
        database is unreachable: then the sweep stops, logged once per outage."""
        for what, purge in SWEEPS:
            if self._stopping:
                return
            try:
                await purge(self.db, self.config.days)
            except Exception:
                if not self._step_failed(Failure(), f"retention sweep of {what}"):
                    return
        for what, delete in EXPIRED:
            if self._stopping:
                return
            try:
                await delete(self.db, self.clock.seconds())
            except Exception:
                if not self._step_failed(Failure(), f"removing expired {what}"):
                    return
        self._outage.succeeded()

    def _step_failed(self, failure: Failure, what: str) -> bool:
        """Log a failed step; False when the sweep should stop (the database is unreachable)."""
        if failure.check(DatabaseUnavailable):
            self._outage.failed(failure)
            return False
        log.failure("{what} failed; retrying next sweep", failure, what=what)
        return True

    def start(self) -> None:
        self._stopping = False
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.config.sweep_interval, now=True)

    def _tick(self) -> Deferred[None]:
        self._running = Deferred.fromCoroutine(self.sweep_once())
        return self._running

    async def stop(self) -> None:
        """Stop the loop and wait for a sweep in progress to finish its statement: the database
        is stopped after us, and a step started on a closed pool would fail and log as a fault.
        A stopping sweep starts no further step."""
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running
        if running is not None and not running.called:
            await running
