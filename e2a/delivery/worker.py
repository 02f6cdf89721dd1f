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
agent that has a free slot here (:meth:`DeliveryService.reserve_fresh`, counting the agent's
leases in every process), the job row is inserted already leased to this process and attempted
right after the commit (:meth:`DeliveryService.start_fresh`) — no NOTIFY, no claim. A slot
whose delivered attempt found nothing more of its agent to hand on frees itself without a
wake-up (nothing waits for it), unless a NOTIFY for that agent was skipped meanwhile.

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

from e2a import maillog
from e2a.claimloop import ClaimLoop
from e2a.config import WebhooksConfig
from e2a.delivery import backoff
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.webhook import AttemptResult, WebhookClient, WebhookMessage, build_request
from e2a.metrics import metrics_of
from e2a.store import deliveries
from e2a.store.accounts import SecretCache
from e2a.store.database import Database
from e2a.store.deliveries import AttemptContext, ClaimedJob
from e2a.store.events import CHANNEL_DELIVERY

__all__ = ["LEASE_MARGIN", "DeliveryService"]

log = Logger()

#: Lease = webhooks.timeout (headers) + timeout (body read) + this margin; the spec's
#: "timeout + 30 s" with room for the bounded body read.
LEASE_MARGIN = 30.0

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
    ) -> None:
        self._db = db
        self._events = events
        self._config = config
        self._master_key = master_key
        # AES-GCM openings of the signing secrets, keyed by (secret id, ciphertext); which
        # secrets sign is still read from SQL by every claim, so rotation is respected.
        self._secrets = SecretCache()
        self._clock = clock or reactor
        self._poll_interval = poll_interval
        self._max_in_flight = max_in_flight
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
        self._lease_seconds = 2 * float(config.timeout) + LEASE_MARGIN
        self._loop: task.LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._running = False
        # Set by stop(): no more hand-ons even inside a run_once (which may run un-started).
        self._stopping = False
        # run_once() calls in progress: they may hand slots on while the service is not started.
        self._once = 0
        self._claims = ClaimLoop(self._claim_and_start, lambda: self._running, "webhook delivery")
        self._in_flight: dict[str, defer.Deferred[None]] = {}
        self._per_agent: dict[str, int] = {}
        # Agents that may have a due job no busy slot of theirs is coming for: a NOTIFY's claim
        # was skipped because all their slots were busy, or a claimed job was given back. The
        # next of their slots to free without a hand-on wakes the claim loop (the job may have
        # committed after that slot's hand-on statement read the queue).
        self._maybe_waiting: set[str] = set()
        # Bumped by every NOTIFY that names no agent (redeliveries, re-enabled webhooks, mail to
        # several agents): a slot whose hand-on found nothing may only free quietly if none came
        # while its statement ran (the job may have committed after the statement's snapshot).
        # A NOTIFY naming an agent marks that agent in _maybe_waiting instead.
        self._epoch = 0
        # Slots reserved for fresh jobs whose accept transaction has not committed yet
        # (reserve_fresh); they count in _per_agent and against max_in_flight.
        self._reserved: dict[str, int] = {}
        self._backpressure = backpressure

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to NOTIFY, start the poll loop and poll once right away."""
        self._running = True
        self._stopping = False
        if self._events is not None:
            self._unsubscribe = self._events.subscribe(CHANNEL_DELIVERY, self._on_notify)
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
        self._running = False
        self._stopping = True
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
        if self._own_client:
            await self.client.close()

    # ------------------------------------------------------------------ polling

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _on_notify(self, payload: str) -> None:
        """NOTIFY on the delivery channel: new or re-enabled jobs; the payload names the agent
        when the sender knew it was exactly one.

        When every slot this process allows that agent is busy, a claim could not start its
        job anyway: each busy slot ends in a hand-on (2xx: it leases the agent's next due job
        itself) or frees the slot and wakes the claim loop (any other outcome). Skipping that
        claim saves a statement per message while an agent's webhook is kept busy; the poll
        still runs every ``poll_interval``. Another process's busy slots do not count here:
        its own hand-ons pick the job up, and a claim from this process finds the agent at its
        limit in the database.
        """
        if not payload:
            self._epoch += 1
            self.wake()
            return
        busy = self._per_agent.get(payload, 0)
        if busy > 0 and self._running:
            # A slot of this agent may be running a hand-on whose snapshot predates this job:
            # the next of its slots to free without a hand-on must wake the claim loop.
            self._maybe_waiting.add(payload)
        if busy >= self._config.max_concurrency_per_agent:
            if self._running:
                self._maybe_refresh_backlog()
            return
        self.wake()

    def wake(self) -> None:
        """Claim and start due jobs soon; coalesces while a poll is running. Never raises."""
        if not self._running:
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
            log.failure("counting the webhook backlog failed")
            return
        bp.update(backlogs)

    async def _claim_and_start(self) -> tuple[int, int]:
        limit = self._max_in_flight - len(self._in_flight) - sum(self._reserved.values())
        if limit <= 0:
            return 0, 0
        jobs = await deliveries.claim_due(
            self._db, self._now(), limit, self._lease_seconds, self._config.max_concurrency_per_agent
        )
        started = [self._start_attempt(job) for job in self._within_limits(jobs)]
        return len(started), limit

    def _within_limits(self, jobs: list[ClaimedJob]) -> list[ClaimedJob]:
        """The claimed jobs this process may start now; the others are given back.

        The claim counts leases in the database, so it cannot see a slot reserved here for a
        fresh job whose accept has not committed yet (or one reserved while the claim ran):
        starting every claimed job could put more than ``max_concurrency_per_agent`` attempts
        of one agent in flight in this process. Such a job is unleased again at once and its
        agent marked, so the next of its slots to free wakes the claim loop.
        """
        limit = self._config.max_concurrency_per_agent
        out: list[ClaimedJob] = []
        planned: dict[str, int] = {}
        for job in jobs:
            busy = self._per_agent.get(job.agent_id, 0) + planned.get(job.agent_id, 0)
            if busy >= limit:
                self._maybe_waiting.add(job.agent_id)
                defer.Deferred.fromCoroutine(self._give_back(job))
                continue
            planned[job.agent_id] = planned.get(job.agent_id, 0) + 1
            out.append(job)
        return out

    async def _give_back(self, job: ClaimedJob) -> None:
        try:
            await deliveries.release_lease(self._db, job)
        except Exception:
            log.failure("giving back webhook job {delivery_id} failed (its lease will expire)", delivery_id=job.id)

    def _may_hand_on(self) -> bool:
        """Whether a delivered attempt may lease its agent's next job for its slot.

        Not once stopping (no new claims), only while the service runs or a run_once is in
        progress, and not while this process is saturated: then the claim loop's oldest-first
        order across agents must decide who gets the next free slot.
        """
        return (
            not self._stopping
            and (self._running or self._once > 0)
            and len(self._in_flight) + sum(self._reserved.values()) < self._max_in_flight
        )

    # ------------------------------------------------------------------ fresh jobs from accept

    def reserve_fresh(self, agent_id: str, in_flight_everywhere: int) -> datetime | None:
        """Reserve a slot for a job the inbound pipeline is about to commit; returns the lease
        expiry to write into the new row, or None (the job then goes through the queue).

        Why: a message accepted while its agent's webhook has a free slot can be attempted by
        this process straight after the commit — the row is inserted already leased, so no
        NOTIFY, wake-up and claim statement stand between the 250 and the POST, and no other
        process can take it. ``in_flight_everywhere`` is the agent's leased attempts in the
        database (every process), read by the accept's context statement: together with the
        reservations not yet committed here, the per-agent limit holds as for a claim. Every
        reservation must end in :meth:`start_fresh` (committed) or :meth:`release_fresh`.
        """
        if not self._running or self._stopping:
            return None
        limit = self._config.max_concurrency_per_agent
        pending = self._reserved.get(agent_id, 0)
        if self._per_agent.get(agent_id, 0) >= limit or in_flight_everywhere + pending >= limit:
            return None
        if len(self._in_flight) + sum(self._reserved.values()) >= self._max_in_flight:
            return None
        self._reserved[agent_id] = pending + 1
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
        return self._now() + timedelta(seconds=self._lease_seconds)

    def release_fresh(self, agent_id: str) -> None:
        """The accept transaction did not commit (or is being retried): give the slot back.

        The reservation may have made its agent look busy (a NOTIFY skipped) or filled the
        process (claims held back), so the claim loop is woken; this only happens when an
        accept fails or is retried.
        """
        self._unreserve(agent_id)
        self._drop_agent_slot(agent_id)
        self._maybe_waiting.discard(agent_id)
        self.wake()

    def start_fresh(self, job: ClaimedJob) -> None:
        """The accept transaction committed the leased row: attempt it in the reserved slot.

        After :meth:`stop` began the job is left to its lease (another process, or this one
        after a restart, retries it once the lease runs out): an attempt must not start on a
        worker that is shutting down.
        """
        self._unreserve(job.agent_id)
        self._drop_agent_slot(job.agent_id)
        if not self._running or self._stopping:
            # Committed after stop() began (a session that outlived the SMTP shutdown grace):
            # give the lease back so the next start (or another process) claims it at once.
            log.info("fresh webhook job {delivery_id} given back at shutdown", delivery_id=job.id)
            defer.Deferred.fromCoroutine(self._give_back(job))
            return
        self._start_attempt(job)

    def _unreserve(self, agent_id: str) -> None:
        _decrement(self._reserved, agent_id)

    def _drop_agent_slot(self, agent_id: str) -> None:
        _decrement(self._per_agent, agent_id)

    def _start_attempt(self, job: ClaimedJob) -> defer.Deferred[int]:
        """Start ``job`` in a slot; fires with how many attempts the slot ran before it was
        freed (this one plus the jobs it was handed on to). Never fails."""
        slot_done: defer.Deferred[int] = defer.Deferred()
        self._run_in_slot(job, slot_done, 0)
        return slot_done

    def _run_in_slot(self, job: ClaimedJob, slot_done: defer.Deferred[int], ran_before: int) -> None:
        self._per_agent[job.agent_id] = self._per_agent.get(job.agent_id, 0) + 1
        d = defer.Deferred.fromCoroutine(self._attempt(job))
        self._in_flight[job.id] = d

        def finished(result: Any) -> None:
            self._in_flight.pop(job.id, None)
            self._drop_agent_slot(job.agent_id)
            if isinstance(result, ClaimedJob):
                # Handed on: the record statement leased this agent's next job for this very
                # slot. The per-agent and per-process counts are unchanged, so nothing new is
                # claimable because of this finish: no wake-up needed.
                self._run_in_slot(result, slot_done, ran_before + 1)
                return
            if result is _AGENT_IDLE and job.agent_id not in self._maybe_waiting:
                # The hand-on statement found no due job of this agent, the process was not
                # saturated and no NOTIFY or claim came while it ran (_record checks): nothing
                # waits for this slot. Without this, every message delivered while the webhook
                # keeps up cost a claim pass.
                slot_done.callback(ran_before + 1)
                return
            self._maybe_waiting.discard(job.agent_id)
            # A slot freed: jobs held back by a concurrency limit may be claimable now. Wake on
            # every freed slot (wake() coalesces): waking only when this agent was at its limit
            # let a backlog stall until the next safety poll once several attempts ended together.
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
        self._once += 1
        try:
            limit = self._max_in_flight - len(self._in_flight) - sum(self._reserved.values())
            jobs = await deliveries.claim_due(
                self._db, self._now(), limit, self._lease_seconds, self._config.max_concurrency_per_agent
            )
            slots = [self._start_attempt(job) for job in self._within_limits(jobs)]
            results = await defer.gatherResults(slots) if slots else []
            return sum(results)
        finally:
            self._once -= 1

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
                if self._may_hand_on():
                    epoch = self._epoch
                    _matched, next_job = await deliveries.record_delivered_and_claim_next(
                        self._db, job, result.status, url, now,
                        self._lease_seconds, self._config.max_concurrency_per_agent,
                    )
                    if next_job is not None:
                        return next_job
                    # Nothing of this agent was due in the statement's snapshot. The slot may
                    # free quietly only if no agent-less NOTIFY came meanwhile (a job may have
                    # committed after the snapshot; NOTIFYs naming this agent mark it in
                    # _maybe_waiting) and the process is not saturated now (this slot still
                    # counts; a claim or reservation may have filled it meanwhile).
                    if epoch == self._epoch and self._may_hand_on():
                        return _AGENT_IDLE
                    return None
                await deliveries.record_delivered(self._db, job, result.status, url, now)
                return None
            if outcome == backoff.GONE:
                await deliveries.record_gone(self._db, job, url, now)
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
            await deliveries.record_failed(self._db, job, result.status, result.error, now, attempted=True, url=url)
            logged("failed")
            log.warn("webhook {message_id} failed after {attempt} attempts ({error})",
                     message_id=job.message_id, attempt=job.attempt, error=result.error)
            return None
        await deliveries.record_retry(
            self._db, job, result.status, result.error, url, now, now + timedelta(seconds=delay)
        )
        logged("retry", delay)
        return None


def _decrement(counts: dict[str, int], key: str) -> None:
    """One less for ``key``; the entry goes when it reaches zero (the dicts stay small)."""
    count = counts.get(key, 0)
    if count <= 1:
        counts.pop(key, None)
    else:
        counts[key] = count - 1


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
