"""RetentionService.stop: a sweep in progress finishes its statement before the database is
stopped, and starts no further step (a step on a closed pool logged a critical traceback at
a shutdown that came during a sweep)."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from e2a import retention
from e2a.config import RetentionConfig


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_the_step_in_progress_and_starts_no_other(monkeypatch):
    calls: list[str] = []
    pending: list[Deferred[None]] = []

    def step(name: str):
        def purge(_db: Any, *_args: Any) -> Deferred[None]:
            calls.append(name)
            pending.append(Deferred())
            return pending[-1]

        return purge

    monkeypatch.setattr(retention, "SWEEPS", (("first", step("first")), ("second", step("second"))))
    monkeypatch.setattr(retention, "EXPIRED", (("rate limits", step("rate limits")),))
    service = retention.RetentionService(object(), RetentionConfig(days=30, sweep_interval=3600), Clock())
    service.start()
    assert calls == ["first"]

    stopped = ensureDeferred(service.stop())
    assert not stopped.called  # the first step's statement is still running
    pending[0].callback(None)
    assert stopped.called and calls == ["first"]


@pytest_twisted.ensureDeferred
async def test_stop_between_sweeps_returns_at_once_and_the_loop_ends(monkeypatch):
    calls: list[str] = []

    async def purge(_db: Any, *_args: Any) -> None:
        calls.append("purge")

    monkeypatch.setattr(retention, "SWEEPS", (("only", purge),))
    monkeypatch.setattr(retention, "EXPIRED", (("expired", purge),))
    clock = Clock()
    service = retention.RetentionService(object(), RetentionConfig(days=30, sweep_interval=60), clock)
    service.start()
    assert calls == ["purge", "purge"]
    await service.stop()
    clock.advance(120)
    assert calls == ["purge", "purge"]
