"""``cpu_affinity``: keep each e2a process, all of its threads, on one CPU.

Why: SPF/DKIM/DMARC runs on the mail-auth thread pool so that slow DNS never stalls the
reactor, and that thread and the reactor thread take turns at the GIL. On different CPUs
every turn is a cross-CPU wake-up, and a woken thread often finds the GIL taken again and
sleeps once more. On one CPU the threads still never block the reactor, but hand the GIL
over without waking another CPU: measured, e2a's CPU per message fell by about 8 % and its
throughput rose by about 12 % (docs/performance.md, "Keeping a process on one CPU").

Only Linux has per-thread affinity (``os.sched_setaffinity`` on a thread id); elsewhere a
configured ``cpu_affinity`` is refused at start. External programs e2a starts (the embedded
PostgreSQL, the other processes) get the CPUs the process started with: :func:`unpinned`.

``colocate_threads`` (on by default, used when ``cpu_affinity`` is empty): the same saving
without a pin. :class:`ThreadFollower` moves the mail-auth threads to the CPU the reactor thread
is on each time it hands them a call; the reactor itself stays free to move, and they follow.

Either way, once the mail-auth threads share the reactor thread's CPU they run under Linux's
``SCHED_BATCH`` policy (:func:`batch_threads`), so that waking one does not preempt the reactor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.logger import Logger

from e2a.errors import ConfigError

log = Logger()

#: The CPUs this process could use before :func:`pin_process` (None: never pinned).
_original: frozenset[int] | None = None
#: Taken by every change of the process's pin, so that a thread leaving :func:`unpinned`
#: cannot pin itself again after :func:`unpin_process` ran.
_lock = threading.Lock()


def cpu_for_process(cpus: Sequence[int], index: int) -> int | None:
    """The CPU of process ``index`` (1 = the parent of ``processes: N``, 2..N the others).

    Processes take the listed CPUs in turn, so ``processes: 4`` over ``[2, 3]`` puts
    processes 1 and 3 on CPU 2. None: ``cpu_affinity`` is empty, the kernel decides.
    """
    if not cpus:
        return None
    return cpus[(index - 1) % len(cpus)]


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")


def check_cpu(cpu: int | None) -> None:
    """Raise ConfigError unless this process may run on ``cpu`` (None: nothing to check).

    Run when the service is built, so a wrong CPU number stops the start with its key
    instead of failing later in a thread.
    """
    if cpu is None:
        return
    if not supported():
        raise ConfigError(["cpu_affinity: per-thread CPU affinity is only supported on Linux; leave it empty"])
    allowed = os.sched_getaffinity(0) if _original is None else _original
    if cpu not in allowed:
        raise ConfigError([
            f"cpu_affinity: CPU {cpu} is not available to this process "
            f"(available: {','.join(str(c) for c in sorted(allowed))})"
        ])


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set_all(cpus: frozenset[int]) -> None:
    """Set every thread's CPUs; listed again until no thread is new (one may start meanwhile)."""
    done: set[int] = set()
    while True:
        todo = [tid for tid in _threads() if tid not in done]
        if not todo:
            return
        for tid in todo:
            done.add(tid)
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, FileNotFoundError):
                pass  # the thread ended between the listing and the call


def pin_process(cpu: int) -> None:
    """Put every thread of this process on ``cpu``; threads started later inherit it.

    The CPUs the process had before are kept for :func:`unpin_process` and :func:`unpinned`.
    One pin per process: the service pins itself at start, before its thread pools start, and
    its stop calls :func:`unpin_process` (an embedding program that starts the service must
    also stop it to get its CPUs back).
    """
    global _original
    with _lock:
        if _original is None:
            _original = frozenset(os.sched_getaffinity(0))
        try:
            _set_all(frozenset({cpu}))
        except OSError as e:  # e.g. the CPU went offline since check_cpu
            original, _original = _original, None
            _set_all(original)
            raise ConfigError([f"cpu_affinity: cannot keep the process on CPU {cpu}: {e.strerror or e}"]) from None


def unpin_process() -> None:
    """Give every thread of this process back the CPUs it had before :func:`pin_process`."""
    global _original
    with _lock:
        if _original is None:
            return
        original, _original = _original, None
        _set_all(original)


@contextmanager
def unpinned() -> Iterator[None]:
    """Run the block on the CPUs the process started with (calling thread only).

    For starting external programs: a child inherits the affinity of the thread that forks
    it, and the embedded PostgreSQL or another e2a process of ``processes: N`` must not
    share this process's one CPU. A no-op when the process is not pinned.
    """
    with _lock:
        original = _original
        if original is not None:
            pinned = os.sched_getaffinity(0)
            os.sched_setaffinity(0, original)
    if original is None:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            # Unless the process was unpinned meanwhile (service stop): then this thread keeps
            # the original CPUs like every other.
            if _original is not None:
                os.sched_setaffinity(0, pinned)


# ---------------------------------------------------------------- colocate_threads


def current_cpu_reader() -> Callable[[], int] | None:
    """A function returning the CPU the calling thread runs on, or None where there is none.

    libc's ``sched_getcpu`` (glibc and musl; on Linux a vDSO read, no system call), through
    ctypes: under a tenth of a microsecond per call, cheap enough for every hand-over.
    """
    if not supported():
        return None
    try:
        import ctypes  # here: a Python built without _ctypes still runs e2a, without following

        fn = ctypes.CDLL(None).sched_getcpu
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


class ThreadFollower:
    """Keeps a set of threads on the CPU of the thread that calls :meth:`follow`.

    Why: the reactor hands each message's verification to a mail-auth thread, and the two take
    turns at the GIL. On different CPUs every turn wakes the other CPU, and the woken thread often
    finds the lock taken again (docs/performance.md, "Keeping a process on one CPU"). Pinning the
    whole process (``cpu_affinity``) removes that but keeps the process on a CPU something else
    may keep busy. Here only the followers are pinned, each time to wherever the reactor thread
    runs when it hands them a call: the kernel still moves the reactor as it likes, and the
    threads it wakes are on its CPU when they wake.

    Cost: one ``sched_getcpu`` per :meth:`follow`, and one ``sched_setaffinity`` per thread
    when the caller's CPU changed since the last call. If the kernel refuses a move (a seccomp
    profile, a cpuset changed under the process), the threads get back the CPUs the caller had
    when the follower was made and following stops, with one warning.

    Args:
        getcpu: the calling thread's CPU (:func:`current_cpu_reader`); negative: unknown.
        setaffinity: default ``os.sched_setaffinity`` (the tests inject their own).
        getaffinity: default ``os.sched_getaffinity``; read once, for :meth:`stop`.
    """

    def __init__(
        self,
        getcpu: Callable[[], int],
        setaffinity: Callable[[int, Iterable[int]], None] | None = None,
        getaffinity: Callable[[int], Iterable[int]] | None = None,
    ) -> None:
        self._getcpu = getcpu
        self._setaffinity = setaffinity or os.sched_setaffinity
        self._original = frozenset((getaffinity or os.sched_getaffinity)(0))
        self._tids: tuple[int, ...] = ()
        self._cpu = -1
        self.active = True

    @property
    def cpu(self) -> int:
        """The CPU the threads were last moved to (-1: not yet)."""
        return self._cpu

    def set_threads(self, tids: Iterable[int]) -> None:
        """Follow these threads (native thread ids) instead of those set before; they move at the
        next :meth:`follow`. Set them again (or to none) when they end: the kernel reuses ids."""
        self._tids = tuple(tids)
        self._cpu = -1

    def follow(self) -> None:
        """Move the threads to the caller's CPU, if it is not theirs already."""
        if not self.active:
            return
        cpu = self._getcpu()
        if cpu == self._cpu or cpu < 0:
            return
        for tid in self._tids:
            try:
                self._setaffinity(tid, {cpu})
            except ProcessLookupError:
                # The thread has ended: forget it, so that its id, once the kernel gives it to
                # another thread or process, is never moved.
                self._tids = tuple(t for t in self._tids if t != tid)
                continue
            except OSError as e:
                self.stop()
                log.warn(
                    "colocate_threads: cannot move a thread to CPU {cpu} ({error}); "
                    "the mail-auth threads run on any CPU from now on",
                    cpu=cpu,
                    error=e.strerror or e,
                )
                return
        self._cpu = cpu

    def stop(self) -> None:
        """Stop following and give the threads back the CPUs the caller had at the start."""
        self.active = False
        self._cpu = -1
        for tid in self._tids:
            try:
                self._setaffinity(tid, self._original)
            except OSError:
                pass  # ended, or refused as well: nothing more to do for it


# ---------------------------------------------------------------- SCHED_BATCH


def batch_threads(
    tids: Iterable[int],
    setscheduler: Callable[[int, int, Any], None] | None = None,
    getscheduler: Callable[[int], int] | None = None,
) -> bool:
    """Run these threads (native ids) under ``SCHED_BATCH``; False where that is not possible.

    Why: on one CPU, the thread that wakes a mail-auth thread (the reactor, handing over a call
    or letting the GIL go around a system call) is preempted by it at once under the default
    policy; the woken thread then finds the GIL taken, sleeps again, and the reactor resumes:
    two context switches for nothing. A ``SCHED_BATCH`` thread never preempts on waking; it runs
    when the reactor waits or its time slice ends, and its share of the CPU is unchanged.
    Measured with ``colocate_threads``: about 3 % more 2 KB messages per second for 5 % less CPU
    per message (docs/performance.md, "Waking without preempting"); with the threads on another
    CPU than the reactor it changed nothing, so the service uses it only when they share one.

    Only from the default policy: a process its operator started under another one (systemd's
    ``CPUSchedulingPolicy=``, ``chrt``), which its threads inherit, is left as it is. Any process
    may choose this policy for its own threads; a refusal (a seccomp profile, a sandbox that
    refuses even to tell the policy) puts back the threads already changed and logs one warning.
    A thread that ended meanwhile is skipped. The threads keep the policy until they end, also
    if :class:`ThreadFollower` stops following (with the threads on CPUs of their own it
    measured no change). The tests inject ``setscheduler`` and ``getscheduler`` (the calling
    thread's policy).
    """
    if not hasattr(os, "SCHED_BATCH"):
        return False
    setscheduler = setscheduler or os.sched_setscheduler
    changed: list[int] = []
    try:
        # The flag systemd's CPUSchedulingResetOnFork= adds is not a policy of its own.
        policy = (getscheduler or os.sched_getscheduler)(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
        if policy != os.SCHED_OTHER:
            return False
        for tid in tids:
            try:
                setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            except ProcessLookupError:
                continue
            changed.append(tid)
    except OSError as e:
        for done in changed:
            try:
                setscheduler(done, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass  # ended, or refused as well: nothing more to do for it
        log.warn(
            "cannot run the mail-auth threads under SCHED_BATCH ({error}); they keep the default "
            "policy, and waking one may preempt the main thread",
            error=e.strerror or e,
        )
        return False
    return True
