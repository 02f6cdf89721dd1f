"""The backpressure gate: the hysteresis rule, the max wait and the worker feeding it, on a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest

from twisted.internet import defer, task

from e2a.config import WebhooksConfig
from e2a.delivery import worker
from e2a.delivery.backpressure import MAX_WAIT, Backpressure, gate_closed


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
    bp.update(99)
    d = bp.wait()
    assert d.called and d.result == 0.0
    assert bp.waited == 0


def test_wait_holds_until_backlog_reaches_low_water():
    """Closed at 100; a drop to 70 keeps holding; 50 releases every waiter with its wait time."""
    clock, bp = _gate()
    bp.update(150)
    assert bp.holding
    first = bp.wait()
    clock.advance(1.0)
    second = bp.wait()
    bp.update(70)
    clock.advance(1.0)
    assert not first.called and not second.called and bp.waiting == 2
    bp.update(50)
    assert first.result == pytest.approx(2.0) and second.result == pytest.approx(1.0)
    assert bp.waiting == 0 and bp.expired == 0 and not clock.getDelayedCalls()


def test_wait_gives_up_after_max_wait_and_accepts_anyway():
    """A backlog that never drains holds each accept for max_wait, then lets it through."""
    clock, bp = _gate(stale_after=60.0)
    bp.update(1000)
    d = bp.wait()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert d.result == pytest.approx(5.0)
    assert bp.expired == 1 and bp.waiting == 0
    assert bp.holding  # the gate itself stays closed: the next accept waits again
    assert not bp.wait().called


def test_cancelled_wait_withdraws_without_error():
    """An SMTP timeout or disconnect cancels the wait: no timer left, no failure logged later."""
    clock, bp = _gate()
    bp.update(1000)
    d = bp.wait()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    assert bp.waiting == 0 and not clock.getDelayedCalls()
    bp.update(0)  # releasing after the cancel must not fire d twice


def test_stale_estimate_does_not_hold():
    """An estimate nobody refreshed for stale_after seconds counts as open."""
    clock, bp = _gate(stale_after=5.0)
    bp.update(1000)
    clock.advance(5.1)
    assert not bp.holding
    assert bp.wait().called


def test_open_releases_waiters_and_forgets_the_estimate():
    """Stopping the worker opens the gate: waiters go ahead, new accepts do not wait."""
    _clock, bp = _gate()
    bp.update(1000)
    d = bp.wait()
    bp.open()
    assert d.called and not bp.holding


def test_refresh_is_rate_limited_and_single_flight():
    """One count in flight at a time, and at most one per refresh_interval."""
    clock, bp = _gate(refresh_interval=0.05)
    assert bp.refresh_due()
    bp.begin_refresh()
    assert not bp.refresh_due()
    bp.update(10)
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

    async def count_due(db: Any, now: Any, cap: int) -> int:
        counts.append(cap)
        return min(backlog[0], cap)

    async def claim_due(*args: Any) -> list[Any]:
        return []

    monkeypatch.setattr(worker.deliveries, "count_due", count_due)
    monkeypatch.setattr(worker.deliveries, "claim_due", claim_due)

    class NoClient:
        async def close(self) -> None:
            pass

    bp = Backpressure(clock, high_water=100, low_water=50, refresh_interval=0.05)
    svc = worker.DeliveryService(
        None, None, None, WebhooksConfig(), False, b"k" * 32, clock, clock, client=NoClient(), backpressure=bp
    )
    defer.ensureDeferred(svc.start())
    assert counts == [200] and bp.holding
    waiter = bp.wait()
    svc.wake()
    svc.wake()  # within refresh_interval: no second count
    assert len(counts) == 1
    backlog[0] = 40
    clock.advance(0.06)
    svc.wake()
    assert len(counts) == 2 and waiter.called and not bp.holding
    d = defer.ensureDeferred(svc.stop())
    assert d.called
