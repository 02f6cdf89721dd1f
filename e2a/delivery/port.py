"""The one way from the inbound pipeline into webhook delivery.

Why a port: the accept path needs three things from delivery — whether to wait for an agent's
backlog (per-agent backpressure), a slot for a job it is about to commit (a fresh job), and a
way to hand the committed job over — and nothing else. Before, the pipeline held the worker
itself (attached after both were built) and the gate separately. Now the composition root
builds one :class:`DeliveryPort` first and gives it to both sides::

    backpressure = Backpressure(reactor)
    port = DeliveryPort(config.webhooks, reactor, backpressure=backpressure)
    inbound = InboundPipeline(..., delivery=port)
    worker = DeliveryService(db, events, dns, config.webhooks, production, master_key, reactor, port=port)

Until a worker has started (and after it stops) the port reserves nothing: every job goes
through the queue, exactly as without a worker. The rules themselves are in
:mod:`e2a.delivery.slots`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from twisted.internet import defer

from e2a.config import WebhooksConfig
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.slots import Slots
from e2a.store.deliveries import ClaimedJob

__all__ = ["LEASE_MARGIN", "DeliveryPort", "InboundDelivery", "lease_seconds"]

#: Lease = webhooks.timeout (headers) + timeout (body read) + this margin; the spec's
#: "timeout + 30 s" with room for the bounded body read.
LEASE_MARGIN = 30.0


def lease_seconds(config: WebhooksConfig) -> float:
    """The lease of a claimed or fresh job: ``2 × webhooks.timeout + 30 s``."""
    return 2 * float(config.timeout) + LEASE_MARGIN


class InboundDelivery(Protocol):
    """What :class:`e2a.inbound.InboundPipeline` calls (a :class:`DeliveryPort`, or a test double)."""

    #: ``webhooks.max_concurrency_per_agent``: the accept asks PostgreSQL for a fresh job's
    #: lease within it (e2a.store.deliveries.FreshLease).
    max_per_agent: int

    def holds(self, agents: Iterable[str]) -> bool: ...

    def wait(self, agents: Iterable[str]) -> defer.Deferred[float]: ...

    def reserve_fresh(
        self, agent_id: str, in_flight_everywhere: int, user_id: str | None = None
    ) -> datetime | None: ...

    def release_fresh(self, agent_id: str) -> None: ...

    def start_fresh(self, job: ClaimedJob) -> None: ...


class FreshJobRunner(Protocol):
    """The worker side (:class:`e2a.delivery.worker.DeliveryService` binds itself)."""

    def run_fresh(self, job: ClaimedJob) -> None: ...

    def give_back(self, job: ClaimedJob) -> None: ...

    def wake(self) -> None: ...


class DeliveryPort:
    """Inbound → delivery (see the module docstring).

    Args:
        config: the ``webhooks`` section (per-agent limit, lease).
        clock: ``seconds()`` for lease expiries (the reactor, or a ``task.Clock``).
        max_in_flight: attempts in flight in this process.
        backpressure: the per-agent accept gate, or None (never wait).
    """

    def __init__(
        self,
        config: WebhooksConfig,
        clock: Any,
        *,
        max_in_flight: int = 64,
        backpressure: Backpressure | None = None,
    ) -> None:
        self.slots = Slots(
            clock,
            max_in_flight=max_in_flight,
            max_per_agent=config.max_concurrency_per_agent,
            lease_seconds=lease_seconds(config),
        )
        self.backpressure = backpressure
        self.max_per_agent = config.max_concurrency_per_agent
        self._runner: FreshJobRunner | None = None

    def bind(self, runner: FreshJobRunner) -> None:
        """Called once by the worker's constructor."""
        if self._runner is not None and self._runner is not runner:
            raise RuntimeError("a DeliveryPort serves one worker")
        self._runner = runner

    # ------------------------------------------------------------------ backpressure

    def holds(self, agents: Iterable[str]) -> bool:
        """True when :meth:`wait` for these recipient agents would wait."""
        return self.backpressure is not None and self.backpressure.holds(agents)

    def wait(self, agents: Iterable[str]) -> defer.Deferred[float]:
        """Fires (seconds waited) once the recipients' gates open or after the gate's max wait."""
        if self.backpressure is None:
            return defer.succeed(0.0)
        return self.backpressure.wait(agents)

    # ------------------------------------------------------------------ fresh jobs

    def reserve_fresh(
        self, agent_id: str, in_flight_everywhere: int, user_id: str | None = None
    ) -> datetime | None:
        """A slot for a job the accept is about to commit: the lease expiry to write into the
        row, or None (queue it). ``user_id``: the agent's owner (the per-user share). Every
        reservation ends in :meth:`start_fresh` or :meth:`release_fresh`."""
        if self._runner is None:
            return None
        return self.slots.reserve(agent_id, in_flight_everywhere, user_id)

    def release_fresh(self, agent_id: str) -> None:
        """The accept did not commit (or is retried), or committed the job without the lease
        (another process filled the agent's slots first): the slot goes back and the claim
        loop wakes."""
        self.slots.release(agent_id)
        if self._runner is not None:
            self._runner.wake()

    def start_fresh(self, job: ClaimedJob) -> None:
        """The accept committed the row and PostgreSQL granted its lease: attempt it in the
        reserved slot, or, once the worker is stopping, give the lease back so the next start
        claims it at once."""
        assert self._runner is not None, "start_fresh without a reservation"
        if self.slots.commit(job.agent_id):
            self._runner.run_fresh(job)
        else:
            self._runner.give_back(job)
