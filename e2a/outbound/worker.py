"""OutboundService: drains the SMTP relay queue (mail.md §7.8).

Mirrors :class:`e2a.delivery.worker.DeliveryService`: wakes on NOTIFY ``e2a_outbound`` (new
messages released), on a LoopingCall on the injected clock (retries coming due, leases of
crashed processes running out, NOTIFYs missed while LISTEN was down) and once at start. Each
wake-up claims due recipients grouped by message in one statement (SKIP LOCKED + lease) and
starts one SMTP attempt per message without waiting for it.

Correctness lives in the rows: attempts, next due time, lease and the in-doubt marker. A live
session renews its lease (SMTP attempts can legitimately take many minutes: 300 s per command,
600 s for the final dot), so another process never starts the same recipients while this one is
still talking; a dead process's lease runs out after ``lease_seconds`` and its rows are retried.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a import maillog
from e2a.claimloop import ClaimLoop, OutageLog
from e2a.config import OutboundConfig, WebhooksConfig
from e2a.metrics import E2AMetrics, metrics_of
from e2a.outbound import relay as relay_mod
from e2a.outbound.relay import RecipientOutcome, Relay, RouteConfig
from e2a.store import outbound as store
from e2a.store.database import Database
from e2a.store.events import CHANNEL_OUTBOUND
from e2a.store.outbound import ClaimedRecipient, RecipientResult

__all__ = ["OutboundService", "RetryConfig"]

log = Logger()

#: A lease outlives a stalled step (600 s final dot) with margin; live sessions renew it.
DEFAULT_LEASE_SECONDS = 900.0


@dataclass(frozen=True)
class RetryConfig:
    """The retry knobs: the webhook schedule and jitter (mail.md §7.8) plus the queue age cap."""

    schedule: tuple[int, ...] = WebhooksConfig().retry_schedule
    jitter: float = WebhooksConfig().jitter
    max_queue_age: float = OutboundConfig().max_queue_age

    @classmethod
    def from_sections(cls, webhooks: WebhooksConfig, outbound: OutboundConfig) -> RetryConfig:
        return cls(tuple(webhooks.retry_schedule), webhooks.jitter, outbound.max_queue_age)


class OutboundService:
    """The relay worker of one e2a process.

    Args:
        db: the database (queue and messages).
        events: the :class:`~e2a.store.events.EventListener`, or None (poll only).
        dns: the :class:`~e2a.mailauth.dns.DnsClient` (MX and host lookups).
        route: :class:`~e2a.outbound.relay.RouteConfig` (``outbound_smtp``, ``outbound``, HELO
            name, production).
        retry: :class:`RetryConfig` (``webhooks.retry_schedule``/``jitter``,
            ``outbound.max_queue_age``).
        reactor: connects.
        clock: schedules polls, timeouts and retries (default ``reactor``).
        poll_interval: seconds between safety-net polls.
        max_in_flight: messages with an SMTP session open in this process.
        lease_seconds: claim lease; renewed every third of it while a session is live.
        rng: uniform [0, 1) source for the retry jitter and MX shuffling.
        relay: a ready :class:`Relay` (tests); by default one is built.
    """

    def __init__(
        self,
        db: Database,
        events: Any,
        dns: Any,
        route: RouteConfig,
        retry: RetryConfig,
        reactor: Any,
        clock: Any = None,
        *,
        poll_interval: float = 5.0,
        max_in_flight: int = 16,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        stop_timeout: float = 30.0,
        rng: Callable[[], float] = random.random,
        relay: Relay | None = None,
        metrics: E2AMetrics | None = None,
    ) -> None:
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self._db = db
        self._events = events
        self._clock = clock or reactor
        self._poll_interval = poll_interval
        self._max_in_flight = max_in_flight
        self._lease_seconds = lease_seconds
        self._stop_timeout = stop_timeout
        self._rng = rng
        self.retry = retry
        self.relay = relay or Relay(reactor, self._clock, dns, route, rand=rng)
        self._loop: task.LoopingCall | None = None
        self._renew_loop: task.LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._running = False
        self._claims = ClaimLoop(self._claim_and_start, lambda: self._running, "outbound queue")
        self._renew_outage = OutageLog("renewing outbound leases")
        self._in_flight: dict[str, defer.Deferred[None]] = {}
        self._leased: dict[str, list[ClaimedRecipient]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to NOTIFY, start the poll and lease-renewal loops, poll once right away."""
        self._running = True
        if self._events is not None:
            self._unsubscribe = self._events.subscribe(CHANNEL_OUTBOUND, lambda _payload: self.wake())
            self._events.on_reconnect(self.wake)
        self._loop = task.LoopingCall(self.wake)
        self._loop.clock = self._clock
        self._loop.start(self._poll_interval, now=True)  # wake() never raises
        self._renew_loop = task.LoopingCall(self._renew_leases)
        self._renew_loop.clock = self._clock
        self._renew_loop.start(self._lease_seconds / 3, now=False)

    async def stop(self) -> None:
        """Stop claiming; give live sessions ``stop_timeout`` seconds, then cut them.

        A cut session's rows keep their lease and are retried after it (by another process or
        after restart); if it was cut after the data was written they carry the in-doubt marker.
        """
        self._running = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for loop in (self._loop, self._renew_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._loop = self._renew_loop = None
        await self._claims.wait_idle()
        pending = list(self._in_flight.values())
        if pending:
            deadline = self._clock.callLater(self._stop_timeout, lambda: [d.cancel() for d in pending])
            await defer.DeferredList(pending, consumeErrors=True)
            if deadline.active():
                deadline.cancel()

    # ------------------------------------------------------------------ polling

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def wake(self) -> None:
        """Claim and start due messages soon; coalesces while a poll runs. Never raises."""
        self._claims.wake()

    async def _claim_and_start(self) -> tuple[int, int]:
        limit = self._max_in_flight - len(self._in_flight)
        if limit <= 0:
            return 0, 0
        groups = await store.claim_due(self._db, self._now(), limit, self._lease_seconds)
        for message_id, rows in groups.items():
            self._start_attempt(message_id, rows)
        return len(groups), limit

    def _start_attempt(self, message_id: str, rows: list[ClaimedRecipient]) -> defer.Deferred[None]:
        self._leased[message_id] = rows
        d = defer.Deferred.fromCoroutine(self._attempt(message_id, rows))
        self._in_flight[message_id] = d

        def finished(_: Any) -> None:
            self._in_flight.pop(message_id, None)
            self._leased.pop(message_id, None)
            if self._running and len(self._in_flight) + 1 >= self._max_in_flight:
                self.wake()

        d.addBoth(finished)
        return d

    async def run_once(self) -> int:
        """Claim due messages once and wait for their attempts; returns how many ran (tests, tools)."""
        limit = self._max_in_flight - len(self._in_flight)
        groups = await store.claim_due(self._db, self._now(), limit, self._lease_seconds)
        started = [self._start_attempt(mid, rows) for mid, rows in groups.items()]
        if started:
            await defer.DeferredList(started, consumeErrors=True)
        return len(groups)

    def _renew_leases(self) -> defer.Deferred[None]:
        async def renew() -> None:
            rows = [r for group in self._leased.values() for r in group]
            if not rows:
                return
            try:
                kept = await store.extend_leases(
                    self._db, rows, self._now() + timedelta(seconds=self._lease_seconds)
                )
            except Exception:
                self._renew_outage.failed(Failure())
                return
            self._renew_outage.succeeded()
            if kept < len(rows):
                # Another claim owns them now; this SMTP session's writes are refused by the
                # lease-token guard and mark_in_doubt stops it before any data is sent.
                log.warn("{lost} of {total} outbound leases were lost before renewal",
                         lost=len(rows) - kept, total=len(rows))

        return defer.Deferred.fromCoroutine(renew())

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, message_id: str, rows: list[ClaimedRecipient]) -> None:
        try:
            await self._attempt_unguarded(message_id, rows)
        except defer.CancelledError:
            log.info("relay attempt for {message_id} abandoned at shutdown", message_id=message_id)
        except Exception:
            # The lease expires and the rows are retried.
            log.failure("relay attempt for {message_id} failed unexpectedly", message_id=message_id)

    async def _attempt_unguarded(self, message_id: str, rows: list[ClaimedRecipient]) -> None:
        doubtful = [r.address for r in rows if r.in_doubt]
        if doubtful:
            log.warn(
                "relay of {message_id} to {recipients} resumes after an attempt that sent the data"
                " but never recorded the outcome: the far end may already have it (possible duplicate,"
                " same Message-ID)",
                message_id=message_id, recipients=doubtful,
            )
        message = await store.load_message(self._db, message_id)
        if message is None or message.composed is None:
            now = self._now()
            results = [RecipientResult(r, "failed", "message content gone", attempted=False) for r in rows]
            await store.record_outcomes(self._db, message_id, results, now)
            return

        async def before_data(accepted: list[str]) -> None:
            # Raises LeaseLost when another claim owns any of the rows now: the relay then
            # drops the connection without sending a byte of the message.
            marked = [r for r in rows if r.address in set(accepted)]
            now = self._now()
            try:
                await store.mark_in_doubt(self._db, marked, now, now + timedelta(seconds=self._lease_seconds))
            except store.LeaseLost:
                log.warn("relay of {message_id}: lease lost before DATA; not sending", message_id=message_id)
                raise

        outcomes = await self.relay.deliver(
            message.composed, message.mail_from, [r.address for r in rows], before_data=before_data
        )
        await self._record(message_id, rows, outcomes)

    async def _record(
        self, message_id: str, rows: list[ClaimedRecipient], outcomes: dict[str, RecipientOutcome]
    ) -> None:
        now = self._now()
        results: list[RecipientResult] = []
        provider_id = ""
        for row in rows:
            outcome = outcomes.get(row.address) or RecipientOutcome("deferred", "no outcome")
            if outcome.status == "deferred":
                reply = store.IN_DOUBT_PREFIX + outcome.reply if outcome.in_doubt else outcome.reply
                when = relay_mod.next_attempt_at(
                    row.attempt, row.queued_at, now, self.retry.schedule, self.retry.jitter,
                    self._rng(), self.retry.max_queue_age,
                )
                if when is None:
                    results.append(RecipientResult(row, "failed", reply))
                else:
                    results.append(RecipientResult(row, "deferred", reply, when))
            else:
                results.append(RecipientResult(row, outcome.status, outcome.reply))
                provider_id = provider_id or outcome.provider_message_id
        changed, status = await store.record_outcomes(self._db, message_id, results, now, provider_id)
        if changed < len(results):
            log.warn(
                "relay of {message_id}: {lost} recipient outcome(s) not recorded (lease lost to another claim)",
                message_id=message_id, lost=len(results) - changed,
            )
        for r in results:  # one line per recipient outcome (docs/logging.md)
            metrics_of(self).outbound_recipient("smtp", r.status)
            maillog.outbound_recipient(
                message_id=message_id, recipient=r.row.address, status=r.status, attempt=r.row.attempt,
                reply=r.reply, next_attempt_at=r.next_attempt_at,
            )
        log.debug("relay of {message_id}: message now {status}", message_id=message_id, status=status)
