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
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from e2a.errors import ConfigError

#: The CPUs this process could use before :func:`pin_process` (None: never pinned).
_original: frozenset[int] | None = None


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
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # the thread ended between the listing and the call


def pin_process(cpu: int) -> None:
    """Put every thread of this process on ``cpu``; threads started later inherit it.

    The CPUs the process had before are kept for :func:`unpin_process` and :func:`unpinned`.
    """
    global _original
    if _original is None:
        _original = frozenset(os.sched_getaffinity(0))
    try:
        _set_all(frozenset({cpu}))
    except OSError as e:  # e.g. the CPU went offline since check_cpu
        unpin_process()
        raise ConfigError([f"cpu_affinity: cannot keep the process on CPU {cpu}: {e.strerror or e}"]) from None


def unpin_process() -> None:
    """Give every thread of this process back the CPUs it had before :func:`pin_process`."""
    global _original
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
    original = _original
    if original is None:
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, original)
    try:
        yield
    finally:
        # A pool thread keeps following the pin; the thread may also have been unpinned
        # meanwhile (service stop): then it keeps the original CPUs.
        if _original is not None:
            os.sched_setaffinity(0, pinned)
