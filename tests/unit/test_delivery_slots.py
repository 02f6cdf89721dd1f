"""The slot and hand-off rules of webhook delivery (e2a.delivery.slots), as tables on a task.Clock.

Each row is a sequence of events applied to a fresh :class:`Slots` (max 5 in flight, 4 per
agent, lease 50 s) and the decision expected from the last one; the worker and the port only
carry these decisions out (tests/integration/test_fresh_jobs.py, test_delivery_hand_on.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from twisted.internet import task

from e2a.config import WebhooksConfig
from e2a.delivery.port import DeliveryPort, lease_seconds
from e2a.delivery.slots import Slots, gate_closed, held_agents, user_share
from e2a.store.deliveries import ClaimedJob

A, B, C = "a@acme.test", "b@acme.test", "c@acme.test"


@dataclass(frozen=True)
class Job:
    id: str
    agent_id: str


def _slots(max_in_flight: int = 5, start: bool = True) -> tuple[task.Clock, Slots]:
    clock = task.Clock()
    clock.advance(1_000_000)
    slots = Slots(clock, max_in_flight=max_in_flight, max_per_agent=4, lease_seconds=50.0)
    if start:
        slots.start()
    return clock, slots


def _apply(slots: Slots, events: list[tuple[Any, ...]]) -> None:
    for name, *args in events:
        getattr(slots, name)(*args)


# ---------------------------------------------------------------- reservations for fresh jobs


@pytest.mark.parametrize(
    ("events", "agent", "elsewhere", "granted"),
    [
        ([], A, 0, True),
        ([("reserve", A, 0)] * 3, A, 0, True),
        ([("reserve", A, 0)] * 4, A, 0, False),  # the local per-agent limit (4)
        ([("attempt_started", A)] * 4, A, 0, False),  # running attempts count like reservations
        ([], B, 3, True),  # 3 leased elsewhere + 0 pending < 4
        ([("reserve", B, 3)], B, 3, False),  # 3 elsewhere + 1 pending
        ([], B, 4, False),  # the database already has the agent at its limit
        ([("reserve", A, 0)] * 4 + [("reserve", B, 0)], C, 0, False),  # max_in_flight (5) reached
        ([("attempt_started", A)] * 3 + [("reserve", B, 0)] * 2, C, 0, False),  # attempts + reservations
        ([("reserve", A, 0)] * 4 + [("release", A)], A, 0, True),  # a released slot is free again
        ([("reserve", A, 0)] * 4 + [("commit", A)], A, 0, True),  # committed: the attempt re-counts it
        ([("stop",)], A, 0, False),  # never once stopping
    ],
)
def test_reserve_respects_every_limit(events, agent, elsewhere, granted):
    """reserve: the local per-agent count, the database's in-flight count plus uncommitted
    reservations, max_in_flight, and never once stopping."""
    clock, slots = _slots()
    _apply(slots, events)
    lease_until = slots.reserve(agent, elsewhere)
    if granted:
        assert lease_until == datetime.fromtimestamp(clock.seconds(), UTC) + timedelta(seconds=50)
    else:
        assert lease_until is None


def test_reserve_needs_a_started_worker():
    """Before start (and in a run_once) nothing is reserved: every job goes through the queue."""
    _clock, slots = _slots(start=False)
    slots.begin_once()
    assert slots.reserve(A, 0) is None


def test_release_and_commit_keep_the_bookkeeping_exact():
    """Every reservation ends in release or commit; afterwards nothing is counted."""
    _clock, slots = _slots()
    for agent in (A, A, B):
        assert slots.reserve(agent, 0) is not None
    assert (slots.reserved, slots.busy(A), slots.claim_limit()) == (3, 2, 2)
    slots.release(A)
    assert slots.commit(A) is True
    slots.attempt_started(A)
    slots.release(B)
    assert (slots.reserved, slots.busy(A), slots.in_flight) == (0, 1, 1)
    slots.attempt_finished(A)
    assert slots.idle


def test_commit_after_stop_says_give_back():
    """A fresh job that commits after stop began is not attempted (the caller gives its lease back)."""
    _clock, slots = _slots()
    assert slots.reserve(A, 0) is not None
    slots.stop()
    assert slots.commit(A) is False
    assert slots.idle


# ---------------------------------------------------------------- claims


@pytest.mark.parametrize(
    ("events", "claimed", "started", "given_back"),
    [
        ([], [A, A, B], [A, A, B], []),
        ([("reserve", A, 0)], [A] * 4, [A] * 3, [A]),  # a reservation the claim could not see
        ([("attempt_started", A)] * 4, [A, B], [B], [A]),
        ([], [A] * 5, [A] * 4, [A]),  # within one claim too
    ],
)
def test_claimed_jobs_beyond_an_agents_slots_are_given_back(events, claimed, started, given_back):
    """split_claimed starts what fits the agent's local slots and gives the rest back, marking
    the agent so its next freed slot wakes the claim loop."""
    _clock, slots = _slots(max_in_flight=64)
    _apply(slots, events)
    jobs = [Job(f"d{i}", agent) for i, agent in enumerate(claimed)]
    start, back = slots.split_claimed(jobs)
    assert [j.agent_id for j in start] == started
    assert [j.agent_id for j in back] == given_back
    assert slots.marked(A) == bool(given_back)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], 5),
        ([("attempt_started", A)] * 2, 3),
        ([("attempt_started", A), ("reserve", B, 0)], 3),
        ([("attempt_started", A)] * 4 + [("reserve", B, 0)], 0),
    ],
)
def test_claim_limit_counts_attempts_and_reservations(events, expected):
    """A claim asks for what max_in_flight leaves after attempts and reservations."""
    _clock, slots = _slots()
    _apply(slots, events)
    assert slots.claim_limit() == expected


@pytest.mark.parametrize(
    ("busy", "payload", "claims", "marked"),
    [
        (0, A, True, False),  # nobody busy: claim
        (2, A, True, True),  # a busy slot may hand on from an old snapshot: mark the agent
        (4, A, False, True),  # all slots busy: they hand on or wake; no claim
        (4, B, True, False),  # another agent
        (4, "", True, False),  # names no agent: claim (and bump the epoch)
    ],
)
def test_notify_claims_unless_every_slot_of_its_agent_is_busy(busy, payload, claims, marked):
    """A NOTIFY naming an agent whose local slots are all busy starts no claim."""
    _clock, slots = _slots(max_in_flight=64)
    for _ in range(busy):
        slots.attempt_started(A)
    assert slots.on_notify(payload) is claims
    assert slots.marked(A) is marked


# ---------------------------------------------------------------- hand-on and quiet release


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ([], True),
        ([("stop",)], False),  # never once stopping
        ([("attempt_started", A)] * 5, False),  # saturated: the claim's order decides
        ([("attempt_started", A)] * 4, True),
    ],
)
def test_may_hand_on_only_while_running_and_not_saturated(setup, expected):
    """A 2xx leases the agent's next job only while the worker runs and has room."""
    _clock, slots = _slots()
    _apply(slots, setup)
    assert slots.may_hand_on() is expected


def test_may_hand_on_inside_run_once_and_not_when_switched_off():
    """run_once may hand on without a start; the diagnostics switch turns hand-on off."""
    _clock, slots = _slots(start=False)
    assert not slots.may_hand_on()
    slots.begin_once()
    assert slots.may_hand_on()
    slots.hand_on = False
    assert not slots.may_hand_on()
    slots.end_once()


@pytest.mark.parametrize(
    ("meanwhile", "quiet", "wakes"),
    [
        ([], True, False),  # nothing happened: free quietly
        ([("on_notify", "")], False, True),  # an agent-less NOTIFY: a job may have committed
        ([("on_notify", A)], True, True),  # a NOTIFY named this agent while its slot was busy
        ([("on_notify", B)], True, False),  # another agent's NOTIFY does not concern this slot
        ([("reserve", B, 0)], False, True),  # a reservation filled the process meanwhile
        ([("split_claimed", [Job("x", A)] * 4)], True, True),  # a claimed job of A was given back
    ],
)
def test_hand_on_that_found_nothing_frees_quietly_only_when_nothing_happened(meanwhile, quiet, wakes):
    """The slot of a delivered attempt whose hand-on leased nothing frees without waking the
    claim loop only when no agent-less NOTIFY came, the process is not saturated and no NOTIFY
    or give-back marked the agent; the mark is consumed by that wake."""
    _clock, slots = _slots(max_in_flight=2)
    slots.attempt_started(A)  # this slot, still counted while the statement runs
    assert slots.may_hand_on()
    token = slots.hand_on_token()
    _apply(slots, meanwhile)
    assert slots.hand_on_found_nothing(token) is quiet
    slots.attempt_finished(A)
    assert slots.slot_freed(A, quiet) is wakes
    assert not slots.marked(A)


# ---------------------------------------------------------------- per-agent backpressure


@pytest.mark.parametrize(
    ("closed", "backlog", "expected"),
    [(False, 63, False), (False, 64, True), (True, 33, True), (True, 32, False), (False, 40, False)],
)
def test_gate_closes_at_high_water_and_opens_at_low_water(closed, backlog, expected):
    """The hysteresis of one agent's accept gate (64 / 32)."""
    assert gate_closed(closed, backlog, 64, 32) is expected


def test_held_agents_follow_their_own_backlog():
    """One agent's backlog never holds another."""
    assert held_agents({A}, {A: 40, B: 10}, 64, 32) == {A}
    assert held_agents(set(), {A: 10, B: 64}, 64, 32) == {B}


# ---------------------------------------------------------------- the port


class Runner:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.given_back: list[str] = []
        self.wakes = 0

    def run_fresh(self, job: ClaimedJob) -> None:
        self.ran.append(job.id)

    def give_back(self, job: ClaimedJob) -> None:
        self.given_back.append(job.id)

    def wake(self) -> None:
        self.wakes += 1


def test_port_reserves_only_for_a_bound_running_worker_and_routes_the_outcome():
    """The inbound side's three calls: reserve (None without a worker), release (wakes the
    claim loop), start (runs, or gives the lease back once the worker stops)."""
    clock = task.Clock()
    config = WebhooksConfig()
    port = DeliveryPort(config, clock, max_in_flight=8)
    assert port.slots.lease_seconds == lease_seconds(config) == 2 * config.timeout + 30
    assert port.reserve_fresh(A, 0) is None  # no worker bound
    assert not port.holds([A]) and port.wait([A]).called  # no gate: never waits
    runner = Runner()
    port.bind(runner)
    assert port.reserve_fresh(A, 0) is None  # bound but not started
    port.slots.start()
    assert port.reserve_fresh(A, 0) is not None and port.reserve_fresh(A, 0) is not None
    port.release_fresh(A)
    assert runner.wakes == 1
    port.start_fresh(ClaimedJob("d1", "m1", A, 0))
    assert runner.ran == ["d1"]
    assert port.reserve_fresh(A, 0) is not None
    port.slots.stop()
    port.start_fresh(ClaimedJob("d2", "m2", A, 0))
    assert runner.given_back == ["d2"] and port.slots.reserved == 0
    with pytest.raises(RuntimeError):
        port.bind(Runner())


# ---------------------------------------------------------------- the per-user share

U, V = "usr_u", "usr_v"
D, E = "d@acme.test", "e@other.test"


@dataclass(frozen=True)
class UserJob:
    id: str
    agent_id: str
    user_id: str | None


def _shared(max_in_flight: int = 12) -> Slots:
    """12 slots, 4 per agent: one user may hold 6."""
    _clock, slots = _slots(max_in_flight=max_in_flight)
    return slots


@pytest.mark.parametrize(
    ("max_in_flight", "max_per_agent", "share"),
    [(64, 4, 32), (8, 4, 4), (12, 4, 6), (5, 4, 4), (1, 4, 4), (64, 40, 40)],
)
def test_user_share_is_half_the_slots_but_at_least_one_agent(max_in_flight, max_per_agent, share):
    """user_share: max_in_flight // 2, never below the per-agent limit."""
    assert user_share(max_in_flight, max_per_agent) == share


@pytest.mark.parametrize(
    ("events", "claimed", "started", "given_back"),
    [
        # 3 agents of U claimed at once: 4 + 2 fit the share (6), the rest goes back.
        ([], [(A, U)] * 4 + [(B, U)] * 4, 6, [B, B]),
        # Running attempts of U's agents count: 5 busy, 1 more fits.
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)], [(C, U), (C, U)], 1, [C]),
        # Another user is not held back by U's share.
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2, [(C, U), (E, V)], 1, [C]),
        # Reservations count for their user (the accept passed it).
        ([("reserve", A, 0, U)] * 4 + [("reserve", B, 0, U)] * 2, [(C, U)], 0, [C]),
        # A row without an owner (agent deleted) only meets the per-agent limit.
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2, [(C, None)], 1, []),
        # A job of a known agent whose row lacks the owner still counts for it.
        ([("attempt_started", A, U)] * 3 + [("attempt_started", B, U)] * 3, [(A, None)], 0, [A]),
    ],
)
def test_claimed_jobs_beyond_a_users_share_are_given_back(events, claimed, started, given_back):
    """split_claimed gives back the jobs that would put a user over its share and marks
    their agents; other users' jobs start."""
    slots = _shared()
    _apply(slots, events)
    jobs = [UserJob(f"d{i}", agent, user) for i, (agent, user) in enumerate(claimed)]
    start, back = slots.split_claimed(jobs)
    assert len(start) == started
    assert [job.agent_id for job in back] == given_back
    assert all(slots.marked(agent) for agent in given_back)


@pytest.mark.parametrize(
    ("events", "agent", "user", "granted"),
    [
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)], C, U, True),  # 5 < 6
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2, C, U, False),  # at share
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2, E, V, True),  # other user
        ([("reserve", A, 0, U)] * 4 + [("reserve", B, 0, U)] * 2, C, U, False),  # reservations count
        ([("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2, C, None, True),  # owner unknown
        ([("attempt_started", A, U)] * 3 + [("attempt_started", B, U)] * 3, A, None, False),  # known agent
        (
            [("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2 + [("attempt_finished", B)],
            C, U, True,  # a finished attempt frees the user's slot
        ),
    ],
)
def test_reserve_respects_the_users_share(events, agent, user, granted):
    """reserve: no fresh slot for a user already holding its share of this process."""
    slots = _shared()
    _apply(slots, events)
    assert (slots.reserve(agent, 0, user) is not None) is granted


def test_full_users_names_only_users_at_their_share():
    """full_users: what the claim skips; a user drops out when one of its slots frees."""
    slots = _shared()
    _apply(slots, [("attempt_started", A, U)] * 4 + [("attempt_started", B, U)] * 2)
    _apply(slots, [("attempt_started", E, V)] * 4)
    assert slots.full_users() == [U]
    assert slots.user_busy(U) == 6 and slots.user_busy(V) == 4
    slots.attempt_finished(B)
    assert slots.full_users() == []


def test_hand_on_and_committed_reservation_keep_their_user():
    """The owner learned at claim or reservation survives the slot's brief free moment between
    attempt_finished and the next attempt_started (hand-on) or commit and start (fresh job)."""
    slots = _shared()
    _apply(slots, [("attempt_started", A, U)] * 4 + [("attempt_started", B, U)])
    assert slots.reserve(B, 1, U) is not None
    assert slots.commit(B)
    slots.attempt_started(B)  # the fresh job's row names no owner
    assert slots.full_users() == [U]
    slots.attempt_finished(B)
    slots.attempt_started(B)  # handed on, again without an owner in hand
    assert slots.user_busy(U) == 6


def test_owner_map_stays_bounded():
    """Owners of agents with nothing busy are forgotten once the map outgrows 4 × max_in_flight."""
    slots = _shared(max_in_flight=2)
    for i in range(50):
        agent = f"x{i}@acme.test"
        slots.attempt_started(agent, f"usr_{i}")
        slots.attempt_finished(agent)
    assert len(slots._user_of) <= 8
    assert slots.idle


def test_claim_skips_nobody_with_a_share_of_one_agent():
    """With the per-agent limit at least half the slots, a single agent still gets its full
    per-agent concurrency (the share never undercuts it)."""
    _clock, slots = _slots(max_in_flight=5)
    start, back = slots.split_claimed([UserJob(f"d{i}", D, U) for i in range(4)])
    assert len(start) == 4 and back == []
