"""Which webhook job runs next: the slot and hand-off rules of one process, in one place.

Pure bookkeeping and decisions, no I/O and no Deferreds: the worker
(:class:`e2a.delivery.worker.DeliveryService`) does the statements and the attempts and asks a
:class:`Slots` what to do; the inbound pipeline reaches it only through the port
(:class:`e2a.delivery.port.DeliveryPort`). The rules (docs/decisions.md, "Webhooks"):

* **Slots.** At most ``max_in_flight`` attempts in this process and
  ``max_per_agent`` (``webhooks.max_concurrency_per_agent``) per agent. A claim asks for
  :meth:`Slots.claim_limit` jobs; the database counts every process's leases per agent.
* **Reservations for fresh jobs.** An accept that commits a job for an agent with a free slot
  here reserves it first (:meth:`Slots.reserve`, counting the agent's leases in the database plus
  the reservations not yet committed); the row is inserted already leased and attempted right
  after the commit. Every reservation ends in :meth:`Slots.commit` or :meth:`Slots.release`.
* **Claim skipping.** A claim cannot see a reservation whose accept is still committing, so
  claimed jobs that would put an agent over its limit here are given back
  (:meth:`Slots.split_claimed`) and the agent is marked. A NOTIFY naming an agent whose slots
  are all busy claims nothing (:meth:`Slots.on_notify`): each busy slot hands on or wakes.
* **Hand-on after a 2xx.** The statement that records a delivery leases the agent's next due
  job for the same slot, unless stopping or saturated (:meth:`Slots.may_hand_on`).
* **Quiet release.** A slot whose hand-on found nothing frees without waking the claim loop only
  when no agent-less NOTIFY came while the statement ran, the process is not saturated
  (:meth:`Slots.hand_on_found_nothing`) and its agent is not marked (:meth:`Slots.slot_freed`).
* **A bounded share per user.** No user (the owner of the agents) holds more than
  ``max_per_user`` of this process's slots (default :func:`user_share`: half of them, at least
  ``max_per_agent``), so one tenant with many never-answering agents cannot take every slot
  for ``webhooks.timeout`` per attempt. The claim skips users at their share
  (:meth:`Slots.full_users`), :meth:`Slots.split_claimed` gives back over-share jobs and
  :meth:`Slots.reserve` refuses a fresh slot over it. A hand-on keeps its user's count.
* **Per-agent backpressure.** The hysteresis of each agent's accept gate
  (:func:`gate_closed`, :func:`held_agents`; the gate itself is
  :class:`e2a.delivery.backpressure.Backpressure`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

__all__ = ["Slots", "gate_closed", "held_agents", "user_share"]


class _Job(Protocol):
    @property
    def agent_id(self) -> str: ...


J = TypeVar("J", bound=_Job)


def user_share(max_in_flight: int, max_per_agent: int) -> int:
    """The most slots of one process one user may hold: half of them, but never less than one
    agent's limit (a user with one agent keeps its full per-agent concurrency)."""
    return max(max_per_agent, max_in_flight // 2)


def _user_of_job(job: Any) -> str | None:
    """The owner of a job's agent, when the job row says (None: no per-user share applies)."""
    return getattr(job, "user_id", None)


def gate_closed(closed: bool, backlog: int, high_water: int, low_water: int) -> bool:
    """The hysteresis rule: close at ``backlog >= high_water``, open at ``backlog <= low_water``,
    otherwise keep the current state."""
    if backlog >= high_water:
        return True
    if backlog <= low_water:
        return False
    return closed


def held_agents(held: set[str], backlogs: Mapping[str, int], high_water: int, low_water: int) -> set[str]:
    """The per-agent rule: :func:`gate_closed` for every agent that is held or has a backlog
    (an agent absent from ``backlogs`` has none)."""
    return {
        agent
        for agent in held | set(backlogs)
        if gate_closed(agent in held, backlogs.get(agent, 0), high_water, low_water)
    }


def _decrement(counts: dict[str, int], key: str) -> None:
    """One less for ``key``; the entry goes when it reaches zero (the dicts stay small)."""
    count = counts.get(key, 0)
    if count <= 1:
        counts.pop(key, None)
    else:
        counts[key] = count - 1


class Slots:
    """The slot table of one process's webhook worker (see the module docstring).

    Args:
        clock: ``seconds()`` (the reactor, or a ``task.Clock``); only for lease expiries.
        max_in_flight: attempts in flight in this process (reservations count).
        max_per_agent: attempts of one agent (``webhooks.max_concurrency_per_agent``).
        lease_seconds: the lease a claimed or fresh job gets.
        max_per_user: slots one user's agents may hold here (None: :func:`user_share`).
    """

    def __init__(
        self,
        clock: Any,
        *,
        max_in_flight: int,
        max_per_agent: int,
        lease_seconds: float,
        max_per_user: int | None = None,
    ) -> None:
        self._clock = clock
        self.max_in_flight = max_in_flight
        self.max_per_agent = max_per_agent
        self.max_per_user = user_share(max_in_flight, max_per_agent) if max_per_user is None else max_per_user
        self.lease_seconds = lease_seconds
        #: Diagnostics and tests: False makes every 2xx only record (no hand-on).
        self.hand_on = True
        self._running = False
        # Set by stop(): no more hand-ons even inside a run_once (which may run un-started).
        self._stopping = False
        # run_once() calls in progress: they may hand slots on while the worker is not started.
        self._once = 0
        self._in_flight = 0
        # Busy slots per agent: attempts running plus reservations not yet committed.
        self._per_agent: dict[str, int] = {}
        # The owner of each agent seen here (from claimed rows and reservations); an agent keeps
        # its entry while free so a hand-on or a committed reservation keeps counting for its
        # user; entries of free agents are pruned when the map grows (see _remember_user).
        self._user_of: dict[str, str] = {}
        # Slots reserved for fresh jobs whose accept transaction has not committed yet.
        self._reserved: dict[str, int] = {}
        # Agents that may have a due job no busy slot of theirs is coming for (a NOTIFY's claim
        # was skipped, or a claimed job was given back): their next slot to free without a
        # hand-on wakes the claim loop.
        self._maybe_waiting: set[str] = set()
        # Bumped by every NOTIFY that names no agent: a hand-on that found nothing may free its
        # slot quietly only if none came while its statement ran.
        self._epoch = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._running = True
        self._stopping = False

    def stop(self) -> None:
        self._running = False
        self._stopping = True

    def begin_once(self) -> None:
        """A run_once() starts: it may hand slots on although the worker is not started."""
        self._once += 1

    def end_once(self) -> None:
        self._once -= 1

    @property
    def running(self) -> bool:
        return self._running

    @property
    def accepting(self) -> bool:
        """Whether new attempts may start here (started and not stopping)."""
        return self._running and not self._stopping

    # ------------------------------------------------------------------ what is busy

    @property
    def in_flight(self) -> int:
        """Attempts running in this process (reservations not included)."""
        return self._in_flight

    @property
    def reserved(self) -> int:
        """Slots reserved for fresh jobs whose accept has not committed yet."""
        return sum(self._reserved.values())

    def reservations(self) -> dict[str, int]:
        """Those reservations per agent: a claim leaves them free (its count in the database
        cannot see them), so it leases no job that :meth:`split_claimed` would give back for
        them, and no accept of this process finds its agent full because of such a job."""
        return dict(self._reserved)

    def busy(self, agent_id: str) -> int:
        """Busy slots of ``agent_id`` here (attempts plus reservations)."""
        return self._per_agent.get(agent_id, 0)

    def user_busy(self, user_id: str) -> int:
        """Busy slots of all of ``user_id``'s agents here (attempts plus reservations)."""
        return sum(n for agent, n in self._per_agent.items() if self._user_of.get(agent) == user_id)

    def full_users(self) -> list[str]:
        """Users at their share here: a claim skips their jobs (sorted, for a stable statement)."""
        busy: dict[str, int] = {}
        for agent, n in self._per_agent.items():
            user = self._user_of.get(agent)
            if user is not None:
                busy[user] = busy.get(user, 0) + n
        return sorted(user for user, n in busy.items() if n >= self.max_per_user)

    def _remember_user(self, agent_id: str, user_id: str | None) -> None:
        if user_id is None:
            return
        if agent_id not in self._user_of and len(self._user_of) >= 4 * self.max_in_flight:
            # Bounded: forget the owners of agents with nothing busy here (re-learned from
            # their next claimed row or reservation).
            self._user_of = {a: u for a, u in self._user_of.items() if a in self._per_agent}
        self._user_of[agent_id] = user_id

    def marked(self, agent_id: str) -> bool:
        """Whether the next slot of ``agent_id`` to free must wake the claim loop."""
        return agent_id in self._maybe_waiting

    @property
    def idle(self) -> bool:
        """Nothing running, reserved or marked: the bookkeeping is back to empty."""
        return not (self._in_flight or self._per_agent or self._reserved or self._maybe_waiting)

    def _saturated(self) -> bool:
        return self._in_flight + self.reserved >= self.max_in_flight

    # ------------------------------------------------------------------ claims

    def claim_limit(self) -> int:
        """How many jobs a claim may lease now (<= 0: none)."""
        return self.max_in_flight - self._in_flight - self.reserved

    def split_claimed(self, jobs: Iterable[J]) -> tuple[list[J], list[J]]:
        """The claimed jobs to start now, and those to give back (unlease at once).

        The claim counts leases in the database, so it cannot see a slot reserved here for a
        fresh job whose accept has not committed yet: starting every claimed job could put more
        than ``max_per_agent`` attempts of one agent in flight here. A job given back marks its
        agent, so the next of its slots to free wakes the claim loop.

        The per-user share is applied the same way: a job whose user (``job.user_id``, from the
        claimed row) already holds ``max_per_user`` slots here, counting the jobs started
        before it in this batch, is given back too.
        """
        start: list[J] = []
        give_back: list[J] = []
        planned: dict[str, int] = {}
        planned_user: dict[str, int] = {}
        for job in jobs:
            user = _user_of_job(job) or self._user_of.get(job.agent_id)
            over_agent = self.busy(job.agent_id) + planned.get(job.agent_id, 0) >= self.max_per_agent
            over_user = user is not None and (
                self.user_busy(user) + planned_user.get(user, 0) >= self.max_per_user
            )
            if over_agent or over_user:
                self._maybe_waiting.add(job.agent_id)
                give_back.append(job)
                continue
            planned[job.agent_id] = planned.get(job.agent_id, 0) + 1
            if user is not None:
                planned_user[user] = planned_user.get(user, 0) + 1
                self._remember_user(job.agent_id, user)
            start.append(job)
        return start, give_back

    def on_notify(self, agent_id: str) -> bool:
        """A delivery NOTIFY (``agent_id`` empty when it names no single agent); returns whether
        to claim.

        When every slot this process allows that agent is busy, a claim could not start its job
        anyway: each busy slot ends in a hand-on or frees and wakes the claim loop. Another
        process's busy slots do not count here (its hand-ons pick the job up, and a claim from
        here finds the agent at its limit in the database).
        """
        if not agent_id:
            self._epoch += 1
            return True
        busy = self.busy(agent_id)
        if busy > 0 and self._running:
            # A slot of this agent may be running a hand-on whose snapshot predates this job.
            self._maybe_waiting.add(agent_id)
        return busy < self.max_per_agent

    # ------------------------------------------------------------------ attempts and hand-on

    def attempt_started(self, agent_id: str, user_id: str | None = None) -> None:
        """``user_id``: the owner when the job row names it (else the one already known)."""
        self._remember_user(agent_id, user_id)
        self._in_flight += 1
        self._per_agent[agent_id] = self.busy(agent_id) + 1

    def attempt_finished(self, agent_id: str) -> None:
        self._in_flight -= 1
        _decrement(self._per_agent, agent_id)

    def may_hand_on(self) -> bool:
        """Whether a delivered attempt may lease its agent's next job for its slot: not once
        stopping, only while started or in a run_once, and not while saturated (then the
        claim's oldest-first order across agents decides who gets the next free slot)."""
        return (
            self.hand_on
            and not self._stopping
            and (self._running or self._once > 0)
            and not self._saturated()
        )

    def hand_on_token(self) -> int:
        """Taken before the record-and-lease statement is sent; see :meth:`hand_on_found_nothing`."""
        return self._epoch

    def hand_on_found_nothing(self, token: int) -> bool:
        """The statement leased nothing: whether the slot may free without a wake-up (no
        agent-less NOTIFY since ``token`` — a job may have committed after the statement's
        snapshot — and the process is not saturated now)."""
        return token == self._epoch and self.may_hand_on()

    def slot_freed(self, agent_id: str, quiet: bool) -> bool:
        """A slot freed without a hand-on (``quiet``: :meth:`hand_on_found_nothing` said so);
        returns whether to wake the claim loop. A marked agent always wakes (once)."""
        if quiet and agent_id not in self._maybe_waiting:
            return False
        self._maybe_waiting.discard(agent_id)
        return True

    # ------------------------------------------------------------------ fresh jobs

    def lease_until(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC) + timedelta(seconds=self.lease_seconds)

    def reserve(self, agent_id: str, in_flight_everywhere: int, user_id: str | None = None) -> datetime | None:
        """Reserve a slot for a job an accept is about to commit; returns the lease expiry to
        write into the row, or None (the job goes through the queue).

        ``in_flight_everywhere`` is the agent's leased attempts in the database (every
        process); with the reservations not yet committed here, the per-agent limit holds as
        for a claim. ``user_id`` (the agent's owner): no reservation once that user holds its
        share of this process's slots.
        """
        if not self.accepting:
            return None
        user_id = user_id or self._user_of.get(agent_id)
        if user_id is not None and self.user_busy(user_id) >= self.max_per_user:
            return None
        pending = self._reserved.get(agent_id, 0)
        if self.busy(agent_id) >= self.max_per_agent or in_flight_everywhere + pending >= self.max_per_agent:
            return None
        if self._saturated():
            return None
        self._remember_user(agent_id, user_id)
        self._reserved[agent_id] = pending + 1
        self._per_agent[agent_id] = self.busy(agent_id) + 1
        return self.lease_until()

    def release(self, agent_id: str) -> None:
        """The accept did not commit (or is retried): the reservation goes; the caller wakes the
        claim loop (the reservation may have made the agent look busy or filled the process)."""
        _decrement(self._reserved, agent_id)
        _decrement(self._per_agent, agent_id)
        self._maybe_waiting.discard(agent_id)

    def commit(self, agent_id: str) -> bool:
        """The accept committed the leased row: the reservation goes; returns whether to attempt
        it now (False after stop began: the caller gives the lease back)."""
        _decrement(self._reserved, agent_id)
        _decrement(self._per_agent, agent_id)
        return self.accepting
