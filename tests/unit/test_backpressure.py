"""The backpressure gate: the hysteresis rule, the max wait and the worker feeding it, on a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest

from twisted.internet import defer, task

from e2a.config import WebhooksConfig
from e2a.delivery import worker
from e2a.delivery.backpressure import MAX_WAIT, Backpressure, gate_closed, held_agents

A = "stuck@acme.test"
B = "other@acme.test"


@pytest.mark.parametrize(
    ("closed", "backlog", "expected"),
    [
        (False, 0, False),
        (False, 50, False),  # between the marks: stays open
        (False, 99, False),
        (False, 100, True),  # reaches high water: closes
        (False, 500, True),
        (True, 500, True),
        (True, 99, True),  # between the marks: stays closed
        (True, 51, True),
        (True, 50, False),  # down to low water: opens
        (True, 0, False),
    ],
)
def test_gate_closed_applies_hysteresis_between_marks(closed, backlog, expected):
    """Close at high water (100), reopen only at low water (50), keep the state in between."""
    assert gate_closed(closed, backlog, 100, 50) is expected


def test_constructor_rejects_marks_in_wrong_order():
    """low_water must be below high_water."""
    with pytest.raises(ValueError):
        Backpressure(task.Clock(), high_water=10, low_water=10)


def _gate(**kw: Any) -> tuple[task.Clock, Backpressure]:
    clock = task.Clock()
    clock.advance(1000)
    return clock, Backpressure(clock, high_water=100, low_water=50, max_wait=5.0, **kw)


def test_wait_returns_at_once_while_open():
    """Below high water nothing waits, and nobody is counted as waiting."""
    _clock, bp = _gate()
    bp.update({A: 99})
    d = bp.wait([A])
    assert d.called and d.result == 0.0
    assert bp.waited == 0


def test_wait_holds_until_backlog_reaches_low_water():
    """Closed at 100; a drop to 70 keeps holding; 50 releases every waiter with its wait time."""
    clock, bp = _gate()
    bp.update({A: 150})
    assert bp.holding
    first = bp.wait([A])
    clock.advance(1.0)
    second = bp.wait([A])
    bp.update({A: 70})
    clock.advance(1.0)
    assert not first.called and not second.called and bp.waiting == 2
    bp.update({A: 50})
    assert first.result == pytest.approx(2.0) and second.result == pytest.approx(1.0)
    assert bp.waiting == 0 and bp.expired == 0 and not clock.getDelayedCalls()


def test_wait_gives_up_after_max_wait_and_accepts_anyway():
    """A backlog that never drains holds each accept for max_wait, then lets it through."""
    clock, bp = _gate(stale_after=60.0)
    bp.update({A: 1000})
    d = bp.wait([A])
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert d.result == pytest.approx(5.0)
    assert bp.expired == 1 and bp.waiting == 0
    assert bp.holding  # the gate itself stays closed: the next accept waits again
    assert not bp.wait([A]).called


def test_cancelled_wait_withdraws_without_error():
    """An SMTP timeout or disconnect cancels the wait: no timer left, no failure logged later."""
    clock, bp = _gate()
    bp.update({A: 1000})
    d = bp.wait([A])
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    assert bp.waiting == 0 and not clock.getDelayedCalls()
    bp.update({A: 0})  # releasing after the cancel must not fire d twice


def test_stale_estimate_does_not_hold():
    """An estimate nobody refreshed for stale_after seconds counts as open."""
    clock, bp = _gate(stale_after=5.0)
    bp.update({A: 1000})
    clock.advance(5.1)
    assert not bp.holding
    assert bp.wait([A]).called


def test_open_releases_waiters_and_forgets_the_estimate():
    """Stopping the worker opens the gate: waiters go ahead, new accepts do not wait."""
    _clock, bp = _gate()
    bp.update({A: 1000})
    d = bp.wait([A])
    bp.open()
    assert d.called and not bp.holding


def test_refresh_is_rate_limited_and_single_flight():
    """One count in flight at a time, and at most one per refresh_interval."""
    clock, bp = _gate(refresh_interval=0.05)
    assert bp.refresh_due()
    bp.begin_refresh()
    assert not bp.refresh_due()
    bp.update({A: 10})
    assert not bp.refresh_due()
    clock.advance(0.06)
    assert bp.refresh_due()
    bp.begin_refresh()
    bp.refresh_failed()
    assert bp.refresh_due()  # a failed count may be retried on the next wake-up


def test_default_max_wait_stays_well_under_store_timeout():
    """Backpressure must never become a 451: the wait leaves most of smtp.store_timeout."""
    from e2a.config import SmtpConfig

    assert MAX_WAIT <= SmtpConfig().store_timeout / 4


def test_worker_wakeups_feed_the_gate(monkeypatch):
    """DeliveryService counts the due backlog on wake-ups (rate-limited) and closes/opens the gate."""
    clock = task.Clock()
    clock.advance(1000)
    backlog = [150]
    counts: list[int] = []

    async def due_by_agent(db: Any, now: Any, scan: int, min_count: int) -> dict[str, int]:
        counts.append(scan)
        n = min(backlog[0], scan)
        return {A: n} if n >= min_count else {}

    async def claim_due(*args: Any) -> list[Any]:
        return []

    monkeypatch.setattr(worker.deliveries, "due_by_agent", due_by_agent)
    monkeypatch.setattr(worker.deliveries, "claim_due", claim_due)

    class NoClient:
        async def close(self) -> None:
            pass

    bp = Backpressure(clock, high_water=100, low_water=50, refresh_interval=0.05)
    svc = worker.DeliveryService(
        None, None, None, WebhooksConfig(), False, b"k" * 32, clock, clock, client=NoClient(), backpressure=bp
    )
    defer.ensureDeferred(svc.start())
    assert counts == [bp.scan_limit] and bp.holding
    waiter = bp.wait([A])
    svc.wake()
    svc.wake()  # within refresh_interval: no second count
    assert len(counts) == 1
    backlog[0] = 40
    clock.advance(0.06)
    svc.wake()
    assert len(counts) == 2 and waiter.called and not bp.holding
    d = defer.ensureDeferred(svc.stop())
    assert d.called


@pytest.mark.parametrize(
    ("held", "backlogs", "expected"),
    [
        (set(), {}, set()),
        (set(), {A: 100}, {A}),  # one agent reaches high water: only its gate closes
        (set(), {A: 100, B: 99}, {A}),
        ({A}, {A: 70, B: 100}, {A, B}),  # between the marks: A stays closed
        ({A, B}, {B: 100}, {B}),  # A absent from the count: no backlog, its gate opens
        ({A}, {A: 50}, set()),  # down to low water
    ],
)
def test_held_agents_applies_hysteresis_per_agent(held, backlogs, expected):
    """Each agent's gate follows its own backlog (high 100, low 50), never another agent's."""
    assert held_agents(held, backlogs, 100, 50) == expected


def test_stuck_agent_holds_only_its_own_mail():
    """Issue 15.4: A's backlog holds mail to A (and mail to A and B); mail to B alone goes at once."""
    clock, bp = _gate()
    bp.update({A: 1000})
    assert bp.holds([A]) and bp.holds([B, A.upper()]) and not bp.holds([B])
    only_b = bp.wait([B])
    assert only_b.called and only_b.result == 0.0
    both = bp.wait([B, A])
    assert not both.called
    bp.update({A: 1000, B: 10})
    assert not both.called
    bp.update({B: 10})  # A drained
    assert both.called and bp.waiting == 0


def test_release_waits_for_every_held_recipient():
    """A waiter for A and B is released only when both gates are open."""
    clock, bp = _gate()
    bp.update({A: 200, B: 200})
    d = bp.wait([A, B])
    bp.update({A: 10, B: 200})
    assert not d.called
    bp.update({A: 10, B: 10})
    assert d.called
