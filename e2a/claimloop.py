"""Coalescing wake-ups around a queue claim: the loop both durable workers (webhooks, relay) use.

``wake()`` may be called from anywhere — a NOTIFY, a finished attempt, a LoopingCall tick — as
often as it likes: while a claim is running, further wake-ups only ask for one more pass. A pass
that filled its batch runs again at once, since more jobs are likely due. The loop never raises
(a LoopingCall whose function fails stops for good); failures are logged and the next wake-up
tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a.store.database import DatabaseUnavailable

log = Logger()

# claim_and_start() → (jobs claimed and started, batch limit it asked for)
ClaimFn = Callable[[], Awaitable[tuple[int, int]]]


class OutageLog:
    """The log of a task that runs every second or so, while the database is unreachable: one
    warning when it starts failing for that reason and one line when it works again, instead
    of a traceback per run (about 44 lines a second for e2a's periodic tasks together). Any
    other failure is logged in full each time."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._failed = 0

    def failed(self, failure: Failure) -> None:
        if not failure.check(DatabaseUnavailable):
            log.failure("{what} failed", failure, what=self._what)
            return
        if not self._failed:
            log.warn("{what} failed: {error}; retrying, and logged again once it works",
                     what=self._what, error=failure.getErrorMessage())
        self._failed += 1

    def succeeded(self) -> None:
        if self._failed:
            log.info("{what} works again, after {count} failed attempts", what=self._what, count=self._failed)
            self._failed = 0


class ClaimLoop:
    def __init__(self, claim_and_start: ClaimFn, is_running: Callable[[], bool], what: str) -> None:
        self._claim_and_start = claim_and_start
        self._is_running = is_running
        self._what = what
        self._outage = OutageLog(f"{what} poll")
        self._polling = False
        self._again = False
        self._done: defer.Deferred[None] | None = None

    def wake(self) -> None:
        """Claim and start due jobs soon; coalesces while a pass runs. Never raises."""
        if not self._is_running():
            return
        if self._polling:
            self._again = True
            return
        self._done = defer.Deferred.fromCoroutine(self._loop())

    @property
    def busy(self) -> bool:
        """A claim pass is running (or about to run again)."""
        return self._polling

    async def wait_idle(self) -> None:
        """Fires when the pass in progress (if any) has finished (used when stopping)."""
        if self._done is not None:
            await self._done

    async def _loop(self) -> None:
        self._polling = True
        try:
            while self._is_running():
                self._again = False
                try:
                    claimed, limit = await self._claim_and_start()
                except Exception:
                    self._outage.failed(Failure())
                    return
                self._outage.succeeded()
                if not (self._again or (limit > 0 and claimed == limit)):
                    return
        finally:
            self._polling = False
