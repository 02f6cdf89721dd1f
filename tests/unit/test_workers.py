"""e2a.workers.WorkerPool with real threads: results reach the reactor's thread, one collection
serves every result that finished while the reactor was busy, a slow call holds one thread only,
and stopping finishes what was handed over.

The reactor here is a stand-in that records ``callFromThread`` calls, so the test decides when
the "reactor" collects; the waits on threading events have a generous timeout only so that a
broken pool fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from twisted.python.failure import Failure

from e2a.workers import PoolStopped, WorkerPool

WAIT = 30.0


class RecordingReactor:
    """``callFromThread`` that queues the call for the test's thread to run."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []
        self._lock = threading.Lock()

    def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None:  # noqa: N802 (Twisted's name)
        with self._lock:
            self.calls.append(lambda: fn(*args))

    def run_pending(self) -> int:
        with self._lock:
            calls, self.calls = self.calls, []
        for call in calls:
            call()
        return len(calls)


@contextmanager
def _started(size: int) -> Iterator[tuple[RecordingReactor, WorkerPool]]:
    """A started pool on a recording reactor, stopped (threads joined) however the test ends."""
    reactor = RecordingReactor()
    pool = WorkerPool(reactor, size, "wp-test")
    pool.start()
    try:
        yield reactor, pool
    finally:
        pool.stop()


def _outcomes(deferreds: list[Any]) -> list[Any]:
    got: list[Any] = []
    for d in deferreds:
        d.addBoth(got.append)
    return got


def test_result_and_failure_come_back_on_the_collecting_thread() -> None:
    ran_in: list[str] = []
    finished = threading.Semaphore(0)

    def work(x: int) -> int:
        ran_in.append(threading.current_thread().name)
        finished.release()
        return x * 2

    def broken() -> None:
        finished.release()
        raise ValueError("bad input")

    with _started(2) as (reactor, pool):
        ok, bad = pool.run(work, 21), pool.run(broken)
        got_ok, got_bad = _outcomes([ok]), _outcomes([bad])
        assert finished.acquire(timeout=WAIT) and finished.acquire(timeout=WAIT)
        pool.stop()  # joins the workers: every result is in before the collection runs
        assert got_ok == [] and got_bad == []  # nothing fires until the reactor collects
        reactor.run_pending()
        assert got_ok == [42]
        assert isinstance(got_bad[0], Failure) and got_bad[0].check(ValueError)
        assert ran_in and ran_in[0].startswith("wp-test-")
        assert threading.current_thread().name not in ran_in


def test_results_finished_while_the_reactor_is_busy_take_one_wake_up() -> None:
    count = 60
    finished = threading.Semaphore(0)

    def work(i: int) -> int:
        finished.release()
        return i

    with _started(3) as (reactor, pool):
        got = _outcomes([pool.run(work, i) for i in range(count)])
        for _ in range(count):
            assert finished.acquire(timeout=WAIT)
        pool.stop()
        # Until the reactor runs the first collection, later results ride on it; a second
        # request is possible only when two workers raced past the flag at once.
        assert 1 <= len(reactor.calls) <= 3
        reactor.run_pending()
        assert sorted(got) == list(range(count))
        assert len(got) == count  # an extra collection from a race found nothing to fire again


def test_no_result_is_left_behind_when_collections_and_workers_interleave() -> None:
    """The reactor collects all the while workers finish (the race the flag is ordered for)."""
    count = 5000
    with _started(4) as (reactor, pool):
        got = _outcomes([pool.run(int, i) for i in range(count)])
        deadline = threading.Event()
        timer = threading.Timer(WAIT, deadline.set)
        timer.start()
        try:
            while len(got) < count and not deadline.is_set():
                reactor.run_pending()
        finally:
            timer.cancel()
        assert sorted(got) == list(range(count))


def test_a_slow_call_holds_one_thread_not_the_pool() -> None:
    release = threading.Event()
    quick_done = threading.Event()
    with _started(2) as (reactor, pool):
        try:
            slow = _outcomes([pool.run(release.wait, WAIT)])
            quick = _outcomes([pool.run(lambda: quick_done.set() or "quick")])
            assert quick_done.wait(WAIT)
            release.set()
            pool.stop()
            reactor.run_pending()
            assert quick == ["quick"] and slow == [True]
        finally:
            release.set()  # before the pool joins its threads, whatever failed


def test_stop_finishes_queued_calls_then_refuses_new_ones() -> None:
    reactor = RecordingReactor()
    pool = WorkerPool(reactor, 1, "wp-test")
    pool.start()
    gate = threading.Event()
    got = _outcomes([pool.run(gate.wait, WAIT)] + [pool.run(int, i) for i in range(5)])
    threads = [t for t in threading.enumerate() if t.name.startswith("wp-test-")]
    gate.set()
    pool.stop()
    assert not any(t.is_alive() for t in threads)
    reactor.run_pending()
    assert got == [True, 0, 1, 2, 3, 4]
    late = _outcomes([pool.run(int, 7)])
    assert isinstance(late[0], Failure) and late[0].check(PoolStopped)
    pool.stop()  # a second stop is harmless


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        WorkerPool(RecordingReactor(), 0, "wp-test")
