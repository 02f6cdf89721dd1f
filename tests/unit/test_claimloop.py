"""ClaimLoop: wake-ups coalesce, full batches repeat, failures never escape."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from e2a.claimloop import ClaimLoop
from e2a.store.database import DatabaseUnavailable


def test_wakes_during_a_pass_ask_for_exactly_one_more():
    """Three wake-ups while a claim runs cause one further pass, not three."""
    gates: list[defer.Deferred[tuple[int, int]]] = []

    def claim() -> defer.Deferred[tuple[int, int]]:
        gates.append(defer.Deferred())
        return gates[-1]

    loop = ClaimLoop(claim, lambda: True, "test")
    loop.wake()
    loop.wake()
    loop.wake()
    loop.wake()
    assert len(gates) == 1
    gates[0].callback((0, 10))
    assert len(gates) == 2  # the coalesced extra pass
    gates[1].callback((0, 10))
    assert len(gates) == 2


def test_full_batch_runs_again_and_partial_stops():
    """A pass that filled its batch claims again at once; a partial one stops."""
    results = iter([(10, 10), (10, 10), (3, 10)])
    calls = []

    async def claim() -> tuple[int, int]:
        calls.append(1)
        return next(results)

    ClaimLoop(claim, lambda: True, "test").wake()
    assert len(calls) == 3


def test_failure_is_logged_and_next_wake_tries_again():
    """An exception in the claim ends that pass only."""
    calls = []

    async def claim() -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database down")
        return (0, 10)

    loop = ClaimLoop(claim, lambda: True, "test")
    loop.wake()
    loop.wake()
    assert len(calls) == 2


def test_not_running_means_no_claim():
    """After stop, wake-ups are ignored."""
    calls = []

    async def claim() -> tuple[int, int]:
        calls.append(1)
        return (0, 1)

    ClaimLoop(claim, lambda: False, "test").wake()
    assert calls == []


def test_database_outage_is_logged_once_then_its_end():
    """While the database is unreachable a poll logs one warning, not one traceback per pass;
    the first pass that works says so once; any other failure is logged in full every time."""
    outcomes: list[BaseException | None] = [
        DatabaseUnavailable("webhook claim: database connection failed"), DatabaseUnavailable("again"),
        DatabaseUnavailable("and again"), None, None, RuntimeError("a bug"), RuntimeError("a bug"),
    ]

    async def claim() -> tuple[int, int]:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return (0, 10)

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        loop = ClaimLoop(claim, lambda: True, "webhook delivery")
        for _ in range(7):
            loop.wake()
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e["log_level"].name, formatEvent(e)) for e in events if e.get("log_namespace") == "e2a.claimloop"]
    assert lines == [
        ("warn", "webhook delivery poll failed: webhook claim: database connection failed; retrying, "
                 "and logged again once it works"),
        ("info", "webhook delivery poll works again, after 3 failed attempts"),
        ("critical", "webhook delivery poll failed"),
        ("critical", "webhook delivery poll failed"),
    ]
