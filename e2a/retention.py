"""Retention sweep (mail.md §9): old messages, feedback and expired rate-limit windows.

Runs in every process; each DELETE is one statement, so concurrent sweeps just find less work.
A failing step is logged and the loop carries on — a LoopingCall whose function fails stops
for good, which would silently end retention.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from e2a.config import RetentionConfig
from e2a.store import ratelimits
from e2a.store.database import Database

log = Logger()

# (description, statement); %(days)s is retention.days. Held outbound mail is never purged.
SWEEPS = (
    (
        "inbound messages",
        "DELETE FROM messages WHERE direction = 'inbound' AND created_at < now() - make_interval(days => %(days)s)",
    ),
    (
        "outbound messages",
        "DELETE FROM messages WHERE direction = 'outbound' AND status <> 'pending_approval'"
        " AND created_at < now() - make_interval(days => %(days)s)",
    ),
    ("feedback", "DELETE FROM feedback WHERE created_at < now() - make_interval(days => %(days)s)"),
)


class RetentionService:
    def __init__(self, db: Database, config: RetentionConfig, clock: Any) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    async def sweep_once(self) -> None:
        for what, sql in SWEEPS:
            try:
                await self.db.execute(sql, {"days": self.config.days})
            except Exception:
                log.failure("retention sweep of {what} failed; retrying next sweep", what=what)
        try:
            await ratelimits.delete_expired(self.db, self.clock.seconds())
        except Exception:
            log.failure("removing expired rate-limit windows failed; retrying next sweep")

    def start(self) -> None:
        self._loop = task.LoopingCall(lambda: Deferred.fromCoroutine(self.sweep_once()))
        self._loop.clock = self.clock
        self._loop.start(self.config.sweep_interval, now=True)

    async def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
