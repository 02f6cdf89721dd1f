"""A fixed set of worker threads for the reactor's blocking or CPU-bound calls.

Why not Twisted's ``ThreadPool`` with ``deferToThreadPool``: the mail-auth pool takes one call
per received message, and at full load the hand-off itself was a measurable share of the
reactor's time. ``ThreadPool`` routes each call through its coordinator (a lock-guarded
worker that picks an idle thread) into that thread's pure-Python ``queue.Queue`` (a
``Condition`` per put and get), and every result comes back through ``callFromThread``, which
writes a byte to the reactor's waker pipe: two system calls per message, each one a moment
the reactor gives the GIL away. Here a call goes into one C ``queue.SimpleQueue`` that all
workers take from, and finished calls are collected in a deque that the reactor empties with
one ``callFromThread`` however many finished while it was busy.

A pool may be given an :class:`~e2a.affinity.ThreadFollower` (``colocate_threads``): each
hand-over then first moves the threads to the CPU the reactor thread is on, so the one that
wakes for the call takes the GIL over from the reactor without waking another CPU. A pool whose
threads share the reactor's CPU (following it, or the process pinned) also starts them under
``SCHED_BATCH`` (``batch``; :func:`e2a.affinity.batch_threads`), so that waking one does not
preempt the reactor.

What stays the same: a bounded number of threads (a slow call, such as a DNS lookup that
times out, holds one thread and never the reactor), results and failures as a
:class:`~twisted.internet.defer.Deferred` fired on the reactor thread, and ``stop`` joining
every thread after the calls already queued.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from e2a.affinity import batch_threads

if TYPE_CHECKING:
    from e2a.affinity import ThreadFollower

_T = TypeVar("_T")

_STOP = object()


class PoolStopped(RuntimeError):
    """A call was given to a :class:`WorkerPool` that is not running."""


class WorkerPool:
    """``size`` threads named ``name-1`` … ``name-size`` that run calls handed over by
    :meth:`run`; see the module docstring for why it is not Twisted's ``ThreadPool``.

    Args:
        reactor: gives results back to its thread (``callFromThread``).
        size: the number of threads, all started by :meth:`start`.
        name: the threads' name prefix (it shows in ``py-spy``, ``top -H`` and logs).
        follower: keeps the threads on the CPU of the thread calling :meth:`run`
            (``colocate_threads``); None: the kernel places them.
        batch: run the threads under ``SCHED_BATCH`` from each :meth:`start` (Linux; see
            :attr:`batched`).
    """

    def __init__(
        self, reactor: Any, size: int, name: str, follower: ThreadFollower | None = None, batch: bool = False
    ) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self._reactor = reactor
        self._size = size
        self._name = name
        self._calls: SimpleQueue[Any] = SimpleQueue()
        self._finished: deque[tuple[defer.Deferred[Any], bool, Any]] = deque()
        # True from the moment a worker asks the reactor to collect results until the reactor
        # starts collecting; a worker that finds it set leaves its result for that collection.
        self._collect_pending = False
        self._threads: list[threading.Thread] = []
        self._running = False
        self._follower = follower
        self._batch = batch
        #: Whether the running threads are under ``SCHED_BATCH`` (set by each :meth:`start`).
        self.batched = False

    def start(self) -> None:
        """Start the threads (idle ones wait in the queue's C lock, costing nothing)."""
        if self._running:
            return
        self._running = True
        for number in range(1, self._size + 1):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self._follower is not None:
            self._follower.set_threads(self.thread_ids)
        self.batched = self._batch and batch_threads(self.thread_ids)

    @property
    def thread_ids(self) -> tuple[int, ...]:
        """The kernel's ids of the running threads (none before :meth:`start` or after :meth:`stop`)."""
        return tuple(t.native_id for t in self._threads if t.native_id is not None)

    def stop(self) -> None:
        """Let the calls already handed over finish, then end and join every thread.

        Calls handed over afterwards fail with :class:`PoolStopped`. Blocking, like
        ``ThreadPool.stop``: it runs while the service stops.
        """
        if not self._running:
            return
        self._running = False
        for _ in self._threads:
            self._calls.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self.batched = False
        if self._follower is not None:
            self._follower.set_threads(())

    def run(self, fn: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Call ``fn(*args)`` in a worker thread; the Deferred fires on the reactor thread
        with its result, or fails with what it raised."""
        if not self._running:
            return defer.fail(PoolStopped(f"the {self._name} worker pool is not running"))
        d: defer.Deferred[_T] = defer.Deferred()
        if self._follower is not None:
            self._follower.follow()  # before the put: the thread it wakes is already here
        self._calls.put((fn, args, d))
        return d

    # ------------------------------------------------------------------ worker threads

    def _work(self) -> None:
        take = self._calls.get
        finished = self._finished
        while True:
            call = take()
            if call is _STOP:
                return
            fn, args, d = call
            try:
                outcome = (d, True, fn(*args))
            except BaseException:
                outcome = (d, False, Failure())
            del call, fn, args
            finished.append(outcome)
            del outcome
            if not self._collect_pending:
                # Two workers may both get here before either sets the flag: then the reactor
                # collects twice, and the second collection finds nothing. What cannot happen
                # is a result left behind: the reactor clears the flag before it empties the
                # deque, so a result appended after its last look finds the flag clear.
                self._collect_pending = True
                self._reactor.callFromThread(self._collect)

    # ------------------------------------------------------------------ reactor thread

    def _collect(self) -> None:
        self._collect_pending = False
        finished = self._finished
        while finished:
            d, ok, result = finished.popleft()
            if ok:
                d.callback(result)
            else:
                d.errback(result)
