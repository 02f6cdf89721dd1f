"""The CPUs each thread of a process may run on, and its scheduling policy (``cpu_affinity`` tests)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def _per_thread(pid: int, read: Callable[[int], _T]) -> dict[int, _T]:
    """Thread id → ``read(tid)``, for every thread of ``pid``; a thread that ends meanwhile is left out."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = read(int(tid))
        except ProcessLookupError:
            pass
    return found


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Thread id → its CPUs, for every thread of ``pid``."""
    return _per_thread(pid, os.sched_getaffinity)


def thread_policies(pid: int) -> dict[int, int]:
    """Thread id → its scheduling policy (``os.SCHED_*``), for every thread of ``pid``."""
    return _per_thread(pid, os.sched_getscheduler)


def can_batch() -> bool:
    """Whether this process may put a thread of its own under ``SCHED_BATCH`` here: Linux, this
    thread under the default policy (the one e2a changes from; a runner started under ``chrt``
    is not), and a kernel that allows it (a sandbox may refuse). Probed on a throwaway thread."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        if os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0) != os.SCHED_OTHER:
            return False
    except OSError:
        return False
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return outcome == [True]
