"""Waiting on state another process or worker commits, through the reactor (never sleep)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import psycopg2

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0, step: float = 0.05
) -> None:
    """Re-check ``predicate()`` (plain or async) every ``step`` seconds of reactor time until
    true (bounded)."""
    for _ in range(int(timeout / step)):
        result = predicate()
        if await result if inspect.isawaitable(result) else result:
            return
        await deferLater(reactor, step, lambda: None)
    raise AssertionError("condition not reached in time")


async def wait_for_advisory_lock_wait(dsn: str) -> None:
    """Until some session of the database at ``dsn`` waits for an advisory lock (how a test
    knows a statement it started is now blocked behind a transaction it holds open)."""

    def waiting() -> bool:
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                return cur.fetchone()[0] > 0
        finally:
            conn.close()

    await wait_for(waiting, timeout=10, step=0.02)
