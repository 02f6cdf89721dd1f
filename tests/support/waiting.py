"""Waiting on state another process or worker commits, through the reactor (never sleep)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

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
