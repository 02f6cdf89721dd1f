"""ClaimLoop: wake-ups coalesce, full batches repeat, failures never escape."""

from __future__ import annotations

from twisted.internet import defer

from e2a.claimloop import ClaimLoop


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
