"""The CPUs each thread of a process may run on, and its scheduling policy (``cpu_affinity`` tests)."""

from __future__ import annotations

import os


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Thread id → its CPUs, for every thread of ``pid``; a thread that ends meanwhile is left out."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            pass
    return found


def thread_policies(pid: int) -> dict[int, int]:
    """Thread id → its scheduling policy (``os.SCHED_*``), for every thread of ``pid``."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = os.sched_getscheduler(int(tid))
        except ProcessLookupError:
            pass
    return found
