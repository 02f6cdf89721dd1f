"""Backpressure from the webhook queue onto SMTP accept, per recipient agent.

WHY: SMTP can accept faster than webhooks drain. Without a brake the due backlog (and with it
the time from commit to delivery) grows without bound: a 20,000-message soak at full speed
reached a 30 s median (docs/performance.md). Holding the sender *before* the 250 moves that
wait back to the sender, whose retry logic already copes with slow servers, and keeps the
queue — hence commit→delivered latency — near ``high_water / drain rate``.

How it works:

* The estimate is, per agent, the number of its webhook jobs that are due now and not leased
  (pending, ``next_attempt_at <= now``), read from the database with one query that scans at
  most ``scan_limit`` rows of the ``deliveries_due_idx`` partial index and groups them by agent
  (:func:`e2a.store.deliveries.due_by_agent`), so every process sees the same backlogs. The
  :class:`~e2a.delivery.worker.DeliveryService` refreshes it from its wake-ups (NOTIFY,
  attempt finished, 1 s safety poll), at most once per ``refresh_interval``: not one query
  per message.
* Each agent has its own gate with hysteresis (:func:`gate_closed`): it closes at
  ``high_water`` due jobs of that agent and reopens only at ``low_water``, so accepts are
  released in bursts instead of one per refresh.
* :meth:`Backpressure.wait` returns at once while the gates of the message's recipients are
  open; otherwise it waits until they open or ``max_wait`` passes — then the message is
  accepted anyway. Backpressure never turns into a 451: ``max_wait`` stays well under
  ``smtp.store_timeout`` (30 s).
* An estimate older than ``stale_after`` (the worker stopped, or the count keeps failing)
  counts as open: a broken estimate must never slow mail down.

Per agent, not global (issue 15.4): a global gate let one tenant whose webhook never answers
(plus 150 mails to it) hold every other tenant's cloud-bound mail for ``max_wait`` each. Now a
stuck receiver only slows mail addressed to itself. Only webhook jobs count (they exist only
for cloud agents), so mail for local agents never waits. The scan limit keeps the count cheap;
when the due backlog is larger than the scan, agents outside it are undercounted — the gate
then errs on the open side, never on the side of slowing mail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

# The hysteresis rules live with the other "which job runs next" rules (re-exported here).
from e2a.delivery.slots import gate_closed, held_agents

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "MAX_WAIT",
    "REFRESH_INTERVAL",
    "SCAN_LIMIT",
    "STALE_AFTER",
    "Backpressure",
    "gate_closed",
    "held_agents",
]

log = Logger()

#: Due, unleased webhook jobs of one agent at which accepting mail for that agent starts to
#: wait. At the measured ~300 webhooks/s of one process this is ~0.2 s of queue.
HIGH_WATER = 64
#: The agent's gate reopens once its backlog is down to this.
LOW_WATER = 32
#: Most due rows one count reads (the cost bound of a refresh).
SCAN_LIMIT = 16 * HIGH_WATER
#: Longest one accept waits (seconds) before it goes ahead anyway; well under the default
#: ``smtp.store_timeout`` of 30 s, which still has to cover verification and the commit.
MAX_WAIT = 5.0
#: Least time (seconds) between two backlog counts.
REFRESH_INTERVAL = 0.05
#: An estimate older than this (seconds) is ignored (gate open). The worker polls every 1 s.
STALE_AFTER = 5.0
#: At most one warning per this many seconds about accepts released by ``max_wait``.
EXPIRY_LOG_INTERVAL = 60.0


def _keys(agents: Iterable[str]) -> frozenset[str]:
    return frozenset(a.lower() for a in agents)


class Backpressure:
    """The gates between each agent's webhook backlog and SMTP accept (see the module docstring).

    Args:
        clock: ``seconds()`` and ``callLater`` (the reactor, or a ``task.Clock`` in tests).
        high_water, low_water: the hysteresis thresholds (due, unleased jobs of one agent).
        max_wait: longest a single :meth:`wait` lasts, seconds.
        refresh_interval: least time between two counts (see :meth:`refresh_due`).
        stale_after: an estimate older than this is ignored.
        scan_limit: most due rows one count reads.
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
        scan_limit: int = SCAN_LIMIT,
    ) -> None:
        if not 0 <= low_water < high_water:
            raise ValueError("backpressure needs 0 <= low_water < high_water")
        if max_wait < 0:
            raise ValueError("backpressure max_wait must be >= 0")
        if scan_limit < high_water:
            raise ValueError("backpressure scan_limit must be >= high_water")
        self._clock = clock
        self.high_water = high_water
        self.low_water = low_water
        self.max_wait = max_wait
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.scan_limit = scan_limit
        self.backlogs: dict[str, int] = {}  # lower-cased agent id -> due jobs (> low_water only)
        self.held: set[str] = set()  # lower-cased agent ids whose gate is closed
        self._updated_at: float | None = None
        self._refreshing = False
        self._waiters: dict[defer.Deferred[float], tuple[Any, float, frozenset[str]]] = {}
        # Diagnostics: accepts that waited, and those released by max_wait rather than a drain.
        self.waited = 0
        self.expired = 0
        self._warned_at: float | None = None
        self._update_waiters: list[defer.Deferred[None]] = []

    # ------------------------------------------------------------------ the estimate

    @property
    def backlog(self) -> int:
        """The largest counted backlog of one agent (diagnostics)."""
        return max(self.backlogs.values(), default=0)

    @property
    def min_count(self) -> int:
        """Agents with fewer due jobs than this are all open: the count need not report them."""
        return self.low_water + 1

    def refresh_due(self) -> bool:
        """True when a count should run now (none running, ``refresh_interval`` elapsed).
        The caller then calls :meth:`begin_refresh` and finally :meth:`update` or
        :meth:`refresh_failed`."""
        if self._refreshing:
            return False
        return self._updated_at is None or self._clock.seconds() - self._updated_at >= self.refresh_interval

    def begin_refresh(self) -> None:
        self._refreshing = True

    @property
    def refreshing(self) -> bool:
        """A count is running."""
        return self._refreshing

    @property
    def updated_at(self) -> float | None:
        """Clock time of the last count (None: no estimate)."""
        return self._updated_at

    def next_update(self) -> defer.Deferred[None]:
        """Fires when the next count ends (:meth:`update` or :meth:`refresh_failed`): lets
        tests and tools wait for a refresh without polling."""
        d: defer.Deferred[None] = defer.Deferred()
        self._update_waiters.append(d)
        return d

    def _counted(self) -> None:
        waiters, self._update_waiters = self._update_waiters, []
        for d in waiters:
            d.callback(None)

    def refresh_failed(self) -> None:
        """A count failed: keep the old estimate (it goes stale after ``stale_after``)."""
        self._refreshing = False
        self._counted()

    def update(self, backlogs: Mapping[str, int]) -> None:
        """Feed a fresh count (agent id -> due jobs; absent agents have none); an agent whose
        gate opens releases every waiter that waited only for open agents."""
        self._refreshing = False
        self._updated_at = self._clock.seconds()
        self.backlogs = {a.lower(): n for a, n in backlogs.items()}
        before = self.held
        self.held = held_agents(before, self.backlogs, self.high_water, self.low_water)
        # No log line per transition: under sustained load a gate flips several times a
        # second (that is its job); only max-wait expiries are worth a (rate-limited) warning.
        if before - self.held:
            self._release(lambda agents: not (agents & self.held))
        self._counted()

    def open(self) -> None:
        """Forget the estimate and release every waiter (the worker is stopping)."""
        self.held = set()
        self.backlogs = {}
        self._updated_at = None
        self._release(lambda agents: True)

    # ------------------------------------------------------------------ the gates

    def _fresh(self) -> bool:
        return self._updated_at is not None and self._clock.seconds() - self._updated_at <= self.stale_after

    @property
    def holding(self) -> bool:
        """True when some agent's gate is closed and the estimate is fresh (a cheap pre-check)."""
        return bool(self.held) and self._fresh()

    def holds(self, agents: Iterable[str]) -> bool:
        """True when :meth:`wait` for these recipients would wait."""
        return self.holding and not self.held.isdisjoint(_keys(agents))

    def wait(self, agents: Iterable[str]) -> defer.Deferred[float]:
        """Fires with the seconds waited: at once while the gates of ``agents`` are open, else
        when they open or after ``max_wait``. Never fails; cancelling it (SMTP timeout or
        disconnect) just withdraws."""
        keys = _keys(agents)
        if not self.holds(keys) or self.max_wait == 0:
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
                        "webhook backlog of {agents} stays above {low}: accepted after waiting {wait} s"
                        " ({expired} such accepts so far)",
                        agents=sorted(keys & self.held), low=self.low_water, wait=self.max_wait,
                        expired=self.expired,
                    )
                d.callback(now - start)

        self._waiters[d] = (self._clock.callLater(self.max_wait, expire), start, keys)
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _release(self, ready: Any) -> None:
        now = self._clock.seconds()
        for d, (call, start, agents) in list(self._waiters.items()):
            if not ready(agents):
                continue
            del self._waiters[d]
            if call.active():
                call.cancel()
            d.callback(now - start)
