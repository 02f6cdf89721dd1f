"""Backpressure from the webhook queue onto SMTP accept.

WHY: SMTP can accept faster than webhooks drain. Without a brake the due backlog (and with it
the time from commit to delivery) grows without bound: a 20,000-message soak at full speed
reached a 30 s median (docs/performance.md). Holding the sender *before* the 250 moves that
wait back to the sender, whose retry logic already copes with slow servers, and keeps the
queue — hence commit→delivered latency — near ``high_water / drain rate``.

How it works:

* The estimate is the number of webhook jobs that are due now and not leased (pending,
  ``next_attempt_at <= now``), read from the database with one ``LIMIT``-bounded count on
  the ``deliveries_due_idx`` partial index (:func:`e2a.store.deliveries.count_due`), so every
  process sees the same backlog. The :class:`~e2a.delivery.worker.DeliveryService` refreshes
  it from its wake-ups (NOTIFY, attempt finished, 1 s safety poll), at most once per
  ``refresh_interval``: not one query per message.
* The gate has hysteresis (:func:`gate_closed`): it closes at ``high_water`` and reopens
  only at ``low_water``, so accepts are released in bursts instead of one per refresh.
* :meth:`Backpressure.wait` returns at once while the gate is open; otherwise it waits until
  the gate opens or ``max_wait`` passes — then the message is accepted anyway. Backpressure
  never turns into a 451: ``max_wait`` stays well under ``smtp.store_timeout`` (30 s).
* An estimate older than ``stale_after`` (the worker stopped, or the count keeps failing)
  counts as open: a broken estimate must never slow mail down.

Only webhook jobs count (they exist only for cloud agents), and :class:`~e2a.inbound.InboundPipeline`
waits only for messages with at least one cloud-agent recipient; mail for local agents goes
to WebSockets and never waits.

The gate is global, not per agent: one cloud agent with a slow webhook and a large due
backlog holds every cloud-bound sender for up to ``max_wait`` per message. That is the
price of a cheap, cross-process estimate; ``max_wait`` bounds it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "MAX_WAIT",
    "REFRESH_INTERVAL",
    "STALE_AFTER",
    "Backpressure",
    "gate_closed",
]

log = Logger()

#: Due, unleased webhook jobs at which accepting cloud-bound mail starts to wait. At the
#: measured ~300 webhooks/s of one process this is ~0.2 s of queue.
HIGH_WATER = 64
#: The gate reopens once the backlog is down to this.
LOW_WATER = 32
#: Longest one accept waits (seconds) before it goes ahead anyway; well under the default
#: ``smtp.store_timeout`` of 30 s, which still has to cover verification and the commit.
MAX_WAIT = 5.0
#: Least time (seconds) between two backlog counts.
REFRESH_INTERVAL = 0.05
#: An estimate older than this (seconds) is ignored (gate open). The worker polls every 1 s.
STALE_AFTER = 5.0
#: At most one warning per this many seconds about accepts released by ``max_wait``.
EXPIRY_LOG_INTERVAL = 60.0


def gate_closed(closed: bool, backlog: int, high_water: int, low_water: int) -> bool:
    """The hysteresis rule: close at ``backlog >= high_water``, open at ``backlog <= low_water``,
    otherwise keep the current state."""
    if backlog >= high_water:
        return True
    if backlog <= low_water:
        return False
    return closed


class Backpressure:
    """The gate between the webhook backlog and SMTP accept (see the module docstring).

    Args:
        clock: ``seconds()`` and ``callLater`` (the reactor, or a ``task.Clock`` in tests).
        high_water, low_water: the hysteresis thresholds (due, unleased jobs).
        max_wait: longest a single :meth:`wait` lasts, seconds.
        refresh_interval: least time between two counts (see :meth:`refresh_due`).
        stale_after: an estimate older than this is ignored.
    """

    def __init__(
        self,
        clock: Any,
        *,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        max_wait: float = MAX_WAIT,
        refresh_interval: float = REFRESH_INTERVAL,
        stale_after: float = STALE_AFTER,
    ) -> None:
        if not 0 <= low_water < high_water:
            raise ValueError("backpressure needs 0 <= low_water < high_water")
        if max_wait < 0:
            raise ValueError("backpressure max_wait must be >= 0")
        self._clock = clock
        self.high_water = high_water
        self.low_water = low_water
        self.max_wait = max_wait
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.backlog = 0
        self._closed = False
        self._updated_at: float | None = None
        self._refreshing = False
        self._waiters: dict[defer.Deferred[float], tuple[Any, float]] = {}
        # Diagnostics: accepts that waited, and those released by max_wait rather than a drain.
        self.waited = 0
        self.expired = 0
        self._warned_at: float | None = None

    # ------------------------------------------------------------------ the estimate

    @property
    def count_limit(self) -> int:
        """The ``LIMIT`` of the count: enough to see the high-water mark, no more."""
        return 2 * self.high_water

    def refresh_due(self) -> bool:
        """True when a count should run now (none running, ``refresh_interval`` elapsed).
        The caller then calls :meth:`begin_refresh` and finally :meth:`update` or
        :meth:`refresh_failed`."""
        if self._refreshing:
            return False
        return self._updated_at is None or self._clock.seconds() - self._updated_at >= self.refresh_interval

    def begin_refresh(self) -> None:
        self._refreshing = True

    def refresh_failed(self) -> None:
        """A count failed: keep the old estimate (it goes stale after ``stale_after``)."""
        self._refreshing = False

    def update(self, backlog: int) -> None:
        """Feed a fresh count; opening the gate releases every waiter."""
        self._refreshing = False
        self._updated_at = self._clock.seconds()
        self.backlog = backlog
        was_closed = self._closed
        self._closed = gate_closed(self._closed, backlog, self.high_water, self.low_water)
        # No log line per transition: under sustained load the gate flips several times a
        # second (that is its job); only max-wait expiries are worth a (rate-limited) warning.
        if was_closed and not self._closed:
            self._release_all()

    def open(self) -> None:
        """Forget the estimate and release every waiter (the worker is stopping)."""
        self._closed = False
        self._updated_at = None
        self._release_all()

    # ------------------------------------------------------------------ the gate

    @property
    def holding(self) -> bool:
        """True when :meth:`wait` would wait: the gate is closed and the estimate is fresh."""
        if not self._closed or self._updated_at is None:
            return False
        return self._clock.seconds() - self._updated_at <= self.stale_after

    def wait(self) -> defer.Deferred[float]:
        """Fires with the seconds waited: at once while open, else when the gate opens or after
        ``max_wait``. Never fails; cancelling it (SMTP timeout or disconnect) just withdraws."""
        if not self.holding or self.max_wait == 0:
            return defer.succeed(0.0)
        self.waited += 1
        start = self._clock.seconds()

        def cancel(d: defer.Deferred[float]) -> None:
            entry = self._waiters.pop(d, None)
            if entry is not None and entry[0].active():
                entry[0].cancel()

        d: defer.Deferred[float] = defer.Deferred(cancel)

        def expire() -> None:
            if self._waiters.pop(d, None) is not None:
                self.expired += 1
                now = self._clock.seconds()
                if self._warned_at is None or now - self._warned_at >= EXPIRY_LOG_INTERVAL:
                    self._warned_at = now
                    log.warn(
                        "webhook backlog {n} stays above {low}: accepted after waiting {wait} s"
                        " ({expired} such accepts so far)",
                        n=self.backlog, low=self.low_water, wait=self.max_wait, expired=self.expired,
                    )
                d.callback(now - start)

        self._waiters[d] = (self._clock.callLater(self.max_wait, expire), start)
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _release_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        now = self._clock.seconds()
        for d, (call, start) in waiters.items():
            if call.active():
                call.cancel()
            d.callback(now - start)
