"""DeliveryService: drains the webhook queue (mail.md §4).

Wakes up on NOTIFY ``e2a_delivery`` (new jobs, redeliveries), on a LoopingCall on the injected
clock (retries coming due, leases of crashed processes running out, NOTIFYs missed while the
LISTEN connection was down) and once right away at start. Each wake-up claims due jobs in one
statement (SKIP LOCKED + lease) and starts one attempt per job without waiting for it, so a
slow receiver never holds up the claim loop. Concurrency is bounded per process
(``max_in_flight``) and per agent (``webhooks.max_concurrency_per_agent``, counted by the
claim query from the leases in the database).

A slot is handed on: when an attempt is delivered (2xx), the statement that records it also
leases the same agent's next due job (``deliveries.record_delivered_and_claim_next``) and the
attempt's slot passes straight to that job. A busy agent's backlog then costs one round trip
per delivery (record + lease) instead of two (record, then a claim pass), and the per-agent
and per-process counts never change across the hand-on. Only a slot that is not handed on
wakes the claim loop (it may free room for other agents' jobs or held-back ones). While the
process is saturated (``max_in_flight``) nothing is handed on, so the claim's oldest-first
order across agents decides who gets a freed slot, and a few busy agents cannot keep the
others waiting.

Fresh jobs skip the queue's wake-up path: when the inbound pipeline accepts mail for a cloud
agent that has a free slot here (through the port, :class:`e2a.delivery.port.DeliveryPort`,
counting the agent's leases in every process), the job row is inserted asking for a lease to
this process, which PostgreSQL grants under the agent's lock, and a granted job is attempted
right after the commit — no NOTIFY, no claim. A slot whose delivered
attempt found nothing more of its agent to hand on frees itself without a wake-up (nothing
waits for it), unless a NOTIFY for that agent was skipped meanwhile.

Every "which job runs next" decision is taken by :class:`e2a.delivery.slots.Slots`
(``self.slots``); this module does the statements, the attempts and the wake-ups.

Correctness never depends on process memory: the attempt count, the next due time and the
lease live in the row; a process that dies mid-attempt leaves a lease that expires after
``timeout + 30 s``, and the job is retried (at-least-once, same ``webhook-id``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a import maillog
from e2a.claimloop import ClaimLoop, OutageLog
from e2a.config import WebhooksConfig
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.port import LEASE_MARGIN, DeliveryPort
from e2a.delivery.webhook import AttemptResult, WebhookClient, WebhookMessage, build_request
from e2a.metrics import E2AMetrics, metrics_of
from e2a.policy import backoff
from e2a.store import deliveries
from e2a.store.accounts import SecretCache
from e2a.store.database import Database
from e2a.store.deliveries import AttemptContext, ClaimedJob
from e2a.store.events import CHANNEL_DELIVERY

__all__ = ["LEASE_MARGIN", "DeliveryService"]

log = Logger()

#: What a delivered attempt returns when its hand-on found no due job of its agent: the slot
#: frees without waking the claim loop (nothing of that agent is waiting, and other agents'
#: jobs never wait for this agent's slot).
_AGENT_IDLE = object()


class DeliveryService:
    """The webhook worker of one e2a process.

    Args:
        db: the database (queue and messages).
        events: the :class:`~e2a.store.events.EventListener` (``subscribe``/``on_reconnect``),
            or None (poll only).
        dns: the :class:`~e2a.mailauth.dns.DnsClient` webhook hosts are resolved with.
        config: the ``webhooks`` section.
        production: https only.
        master_key: opens the stored signing secrets.
        reactor: owns the HTTP connection pool and connects.
        clock: schedules polls, timeouts and retries (default ``reactor``).
        poll_interval: seconds between safety-net polls.
        max_in_flight: attempts in flight in this process.
        rng: uniform [0, 1) source for the retry jitter.
        client: a ready :class:`WebhookClient` (tests); by default one is built and owned.
        backpressure: the SMTP accept gate this worker feeds with the due backlog, counted
            from the database on wake-ups (at most once per its ``refresh_interval``).
        port: the inbound → delivery port this worker serves (its slots, its backpressure);
            by default one is built from ``config``, ``max_in_flight`` and ``backpressure``.
    """

    def __init__(
        self,
        db: Database,
        events: Any,
        dns: Any,
        config: WebhooksConfig,
        production: bool,
        master_key: bytes,
        reactor: Any,
        clock: Any = None,
        *,
        poll_interval: float = 1.0,
        max_in_flight: int = 64,
        rng: Callable[[], float] = random.random,
        client: WebhookClient | None = None,
        backpressure: Backpressure | None = None,
        port: DeliveryPort | None = None,
        metrics: E2AMetrics | None = None,
    ) -> None:
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self._db = db
        self._events = events
        self._config = config
        self._master_key = master_key
        # AES-GCM openings of the signing secrets, keyed by (secret id, ciphertext); which
        # secrets sign is still read from SQL by every claim, so rotation is respected.
        self._secrets = SecretCache()
        self._clock = clock or reactor
        self._poll_interval = poll_interval
        if port is None:
            port = DeliveryPort(config, self._clock, max_in_flight=max_in_flight, backpressure=backpressure)
        elif backpressure is not None and backpressure is not port.backpressure:
            raise ValueError("pass the backpressure gate to the DeliveryPort")
        self.port = port
        #: The slot and hand-off rules (public: tests and diagnostics read them).
        self.slots = port.slots
        port.bind(self)
        self._rng = rng
        self._own_client = client is None
        self.client = client or WebhookClient(
            reactor,
            dns,
            timeout=config.timeout,
            production=production,
            allow_private=config.allow_private,
            clock=self._clock,
            max_per_host=config.max_concurrency_per_agent,
        )
        self._lease_seconds = self.slots.lease_seconds
        self._loop: task.LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._claims = ClaimLoop(self._claim_and_start, lambda: self.slots.running, "webhook delivery")
        self._backlog_outage = OutageLog("counting the webhook backlog")
        # The attempts in flight (cancelled at the stop deadline) and the give-backs not yet
        # answered; the counts that decide anything are in self.slots.
        self._in_flight: dict[str, defer.Deferred[Any]] = {}
        self._background: set[defer.Deferred[None]] = set()
        self._backpressure = port.backpressure

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to NOTIFY, start the poll loop and poll once right away."""
        self.slots.start()
        if self._events is not None:
            self._unsubscribe = self._events.subscribe(CHANNEL_DELIVERY, self.on_notify)
            self._events.on_reconnect(self.wake)
        self._loop = task.LoopingCall(self.wake)
        self._loop.clock = self._clock
        # wake() never raises (it catches and logs), so the loop cannot die on an error.
        self._loop.start(self._poll_interval, now=True)

    async def stop(self) -> None:
        """Stop claiming, then wait for in-flight attempts.

        Attempts are bounded by ``webhooks.timeout`` (request) plus the same for the body
        read; whatever is still running after that is cancelled and abandoned to its lease
        (another process, or this one after a restart, retries it). No slot is handed on once
        stopping, but a record-and-lease statement already sent may still return a leased
        job: it is started (rather than left to its lease) and waited for like the others,
        within the same deadline.
        """
        self.slots.stop()
        if self._backpressure is not None:
            self._backpressure.open()  # nobody refreshes the estimate any more
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        await self._claims.wait_idle()
        if self._in_flight:
            # Cancels what is in flight when the deadline passes (a handed-on attempt included).
            deadline = self._clock.callLater(
                2 * float(self._config.timeout) + 1,
                lambda: [d.cancel() for d in list(self._in_flight.values())],
            )
            while self._in_flight:
                await defer.DeferredList(list(self._in_flight.values()), consumeErrors=True)
            if deadline.active():
                deadline.cancel()
        if self._background:
            await defer.DeferredList(list(self._background), consumeErrors=True)
        if self._own_client:
            await self.client.close()

    async def wait_idle(self) -> None:
        """Wait until no claim runs, no attempt is in flight and every give-back is answered
        (without stopping). For tests and tools: waits on Deferreds, never polls."""
        while True:
            await self._claims.wait_idle()
            if self._in_flight:
                await defer.DeferredList(list(self._in_flight.values()), consumeErrors=True)
            elif self._background:
                await defer.DeferredList(list(self._background), consumeErrors=True)
            elif not self._claims.busy:
                return

    # ------------------------------------------------------------------ polling

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def on_notify(self, payload: str) -> None:
        """NOTIFY on the delivery channel: new or re-enabled jobs; the payload names the agent
        when the sender knew it was exactly one. Claims unless every slot this process allows
        that agent is busy (:meth:`e2a.delivery.slots.Slots.on_notify`); the poll still runs
        every ``poll_interval``."""
        if self.slots.on_notify(payload):
            self.wake()
        elif self.slots.running:
            self._maybe_refresh_backlog()

    def wake(self) -> None:
        """Claim and start due jobs soon; coalesces while a poll is running. Never raises."""
        if not self.slots.running:
            return
        self._maybe_refresh_backlog()
        self._claims.wake()

    def _maybe_refresh_backlog(self) -> None:
        if self._backpressure is not None and self._backpressure.refresh_due():
            self._backpressure.begin_refresh()
            defer.Deferred.fromCoroutine(self._refresh_backlog())

    async def _refresh_backlog(self) -> None:
        """Count the due backlog for the backpressure gate; never raises. Runs beside the
        claim loop (its own pooled connection), so the count never delays a claim."""
        bp = self._backpressure
        assert bp is not None
        try:
            backlogs = await deliveries.due_by_agent(self._db, self._now(), bp.scan_limit, bp.min_count)
        except Exception:
            bp.refresh_failed()
            self._backlog_outage.failed(Failure())
            return
        self._backlog_outage.succeeded()
        bp.update(backlogs)

    async def _claim_and_start(self) -> tuple[int, int]:
        limit = self.slots.claim_limit()
        if limit <= 0:
            return 0, 0
        jobs = await deliveries.claim_due(
            self._db, self._now(), limit, self._lease_seconds, self._config.max_concurrency_per_agent,
            self.slots.full_users(), self.slots.reservations(),
        )
        started = [self._start_attempt(job) for job in self._within_limits(jobs)]
        return len(started), limit

    def _within_limits(self, jobs: list[ClaimedJob]) -> list[ClaimedJob]:
        """The claimed jobs this process may start now; the others are given back
        (:meth:`e2a.delivery.slots.Slots.split_claimed`)."""
        start, give_back = self.slots.split_claimed(jobs)
        for job in give_back:
            self.give_back(job)
        return start

    def give_back(self, job: ClaimedJob) -> None:
        """Clear the lease of a job this process will not attempt, so a claim takes it at once."""
        d = defer.Deferred.fromCoroutine(self._give_back(job))
        self._background.add(d)
        d.addBoth(lambda _: self._background.discard(d))

    async def _give_back(self, job: ClaimedJob) -> None:
        try:
            await deliveries.release_lease(self._db, job)
        except Exception:
            log.failure("giving back webhook job {delivery_id} failed (its lease will expire)", delivery_id=job.id)

    # ------------------------------------------------------------------ fresh jobs from accept

    def run_fresh(self, job: ClaimedJob) -> None:
        """The port's accept committed ``job`` leased to this process: attempt it now."""
        self._start_attempt(job)

    def _start_attempt(self, job: ClaimedJob) -> defer.Deferred[int]:
        """Start ``job`` in a slot; fires with how many attempts the slot ran before it was
        freed (this one plus the jobs it was handed on to). Never fails."""
        slot_done: defer.Deferred[int] = defer.Deferred()
        self._run_in_slot(job, slot_done, 0)
        return slot_done

    def _run_in_slot(self, job: ClaimedJob, slot_done: defer.Deferred[int], ran_before: int) -> None:
        self.slots.attempt_started(job.agent_id, job.user_id)
        d = defer.Deferred.fromCoroutine(self._attempt(job))
        self._in_flight[job.id] = d

        def finished(result: Any) -> None:
            self._in_flight.pop(job.id, None)
            self.slots.attempt_finished(job.agent_id)
            if isinstance(result, ClaimedJob):
                # Handed on: the record statement leased this agent's next job for this very
                # slot. The counts are unchanged, so nothing new is claimable: no wake-up.
                self._run_in_slot(result, slot_done, ran_before + 1)
                return
            # A slot freed: jobs held back by a concurrency limit may be claimable now. Wake on
            # every freed slot (wake() coalesces) unless the hand-on found nothing and nothing
            # happened meanwhile (Slots.slot_freed): without that, every message delivered
            # while the webhook keeps up cost a claim pass.
            if self.slots.slot_freed(job.agent_id, quiet=result is _AGENT_IDLE):
                self.wake()
            slot_done.callback(ran_before + 1)

        d.addBoth(finished)

    async def run_once(self) -> int:
        """Claim due jobs once, then wait until every slot it filled is free again; returns
        how many attempts ran.

        A slot stays busy while its attempts are delivered and handed on to the same agent's
        next due job, so this waits for the claimed attempts AND the chain of attempts each
        handed its slot on to (a backlog of one agent is drained by one call, within the
        per-agent limit). Allowed on a service that was never started (hand-ons included).
        For tests and tools: the service itself never waits on attempts while claiming.
        """
        self.slots.begin_once()
        try:
            limit = self.slots.claim_limit()
            jobs = await deliveries.claim_due(
                self._db, self._now(), limit, self._lease_seconds, self._config.max_concurrency_per_agent,
                self.slots.full_users(), self.slots.reservations(),
            )
            slots = [self._start_attempt(job) for job in self._within_limits(jobs)]
            results = await defer.gatherResults(slots) if slots else []
            return sum(results)
        finally:
            self.slots.end_once()

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, job: ClaimedJob) -> Any:
        """Run one attempt; returns the job its slot was handed on to, ``_AGENT_IDLE`` when the
        hand-on found nothing due for the agent, else None. Never raises."""
        try:
            return await self._attempt_unguarded(job)
        except defer.CancelledError:
            log.info("webhook attempt {delivery_id} abandoned at shutdown", delivery_id=job.id)
        except Exception:
            # The lease expires and the job is retried; nothing else to do here.
            log.failure("webhook attempt {delivery_id} failed unexpectedly", delivery_id=job.id)
        return None

    async def _attempt_unguarded(self, job: ClaimedJob) -> Any:
        ctx = await deliveries.load_attempt(self._db, job, self._master_key, self._secrets)
        if ctx is None:
            await deliveries.record_failed(self._db, job, None, "message or agent gone", self._now(), attempted=False)
            return None
        if ctx.agent_mode != "cloud":
            await deliveries.record_failed(self._db, job, None, "agent is in local mode", self._now(), attempted=False)
            return None
        if ctx.webhook_status == "disabled":
            await deliveries.record_paused(self._db, job)
            return None
        if not ctx.webhook_url:
            await deliveries.record_failed(self._db, job, None, "no webhook URL", self._now(), attempted=False)
            return None
        if not ctx.secrets:
            await deliveries.record_failed(self._db, job, None, "no signing secret", self._now(), attempted=False)
            return None

        try:
            request = build_request(
                _webhook_message(ctx), delivery_id=job.id, attempt=job.attempt, secrets=ctx.secrets, now=self._now()
            )
        except ValueError:
            # A stored header set that cannot be re-signed will never become signable.
            await deliveries.record_failed(
                self._db, job, None, "stored auth headers cannot be signed", self._now(), attempted=False
            )
            return None
        started = self._clock.seconds()
        result = await self.client.post(ctx.webhook_url, request.body, request.headers)
        return await self._record(job, ctx.webhook_url, result, (self._clock.seconds() - started) * 1000)

    async def _record(self, job: ClaimedJob, url: str, result: AttemptResult, ms: float = 0.0) -> Any:
        """Write the attempt's outcome; returns the job the slot is handed on to or
        ``_AGENT_IDLE`` (2xx with a hand-on tried), else None. Logs one line per attempt
        (e2a.maillog.webhook_attempt)."""
        metrics_of(self).webhook_attempt(result)
        now = self._now()

        def logged(outcome: str, next_retry_s: float | None = None) -> None:
            maillog.webhook_attempt(
                delivery_id=job.id, message_id=job.message_id, agent=job.agent_id, attempt=job.attempt,
                status=result.status, outcome=outcome, ms=ms, next_retry_s=next_retry_s, error=result.error,
            )

        if result.status is not None:
            outcome = backoff.classify_status(result.status)
            if outcome == backoff.DELIVERED:
                # One info line per delivered webhook (docs/logging.md): operators asked to see
                # mail flow; it costs one log event per message in the reactor thread.
                logged("delivered")
                if self.slots.may_hand_on():
                    token = self.slots.hand_on_token()
                    matched, next_job = await deliveries.record_delivered_and_claim_next(
                        self._db, job, result.status, url, now,
                        self._lease_seconds, self._config.max_concurrency_per_agent,
                    )
                    _written(job, matched)
                    if next_job is not None:
                        return next_job
                    # Nothing of this agent was due in the statement's snapshot: the slot may
                    # free quietly only if nothing happened meanwhile (Slots.hand_on_found_nothing).
                    if self.slots.hand_on_found_nothing(token):
                        return _AGENT_IDLE
                    return None
                _written(job, await deliveries.record_delivered(self._db, job, result.status, url, now))
                return None
            if outcome == backoff.GONE:
                _written(job, await deliveries.record_gone(self._db, job, url, now))
                logged("disabled")
                log.warn("webhook of {agent_id} answered 410: disabled", agent_id=job.agent_id)
                return None
        delay = backoff.next_delay(
            job.attempt,
            self._config.retry_schedule,
            self._config.jitter,
            self._rng(),
            status=result.status,
            retry_after=result.retry_after,
            retry_after_cap=self._config.retry_after_cap,
            now=now,
        )
        if delay is None:
            _written(
                job,
                await deliveries.record_failed(
                    self._db, job, result.status, result.error, now, attempted=True, url=url
                ),
            )
            logged("failed")
            log.warn("webhook {message_id} failed after {attempt} attempts ({error})",
                     message_id=job.message_id, attempt=job.attempt, error=result.error)
            return None
        _written(
            job,
            await deliveries.record_retry(
                self._db, job, result.status, result.error, url, now, now + timedelta(seconds=delay)
            ),
        )
        logged("retry", delay)
        return None


def _written(job: ClaimedJob, matched: bool) -> None:
    """Say so when an attempt's outcome was not written because its lease was no longer the
    row's: the attempt outlived its lease and the job was leased again (another attempt, here
    or elsewhere, owns the row now), or the row was failed meanwhile (agent switched to local
    mode, deleted). The receiver may see the message twice; that is the at-least-once case
    its ``webhook-id`` lets it deduplicate (docs/webhooks.md)."""
    if not matched:
        log.warn(
            "webhook attempt {delivery_id} (attempt {attempt}) outlived its lease: outcome not recorded",
            delivery_id=job.id, attempt=job.attempt,
        )


def _webhook_message(ctx: AttemptContext) -> WebhookMessage:
    return WebhookMessage(
        message_id=ctx.message_id,
        conversation_id=ctx.conversation_id,
        display_from=ctx.display_from,
        to=ctx.to_addrs,
        cc=ctx.cc_addrs,
        recipient=ctx.recipient,
        raw=ctx.raw_message,
        auth_headers=ctx.auth_headers,
        received_at=ctx.received_at,
    )
