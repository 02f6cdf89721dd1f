"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest
import pytest_twisted

from twisted.internet import defer

from tests.support.hitlstack import start_hitl_stack


@pytest.fixture
def hitl_stacks(e2a_service_factory):
    """``await hitl_stacks(**overrides)``: a whole service with an agent that holds its mail,
    a DNS zone and an SMTP sink (tests/support/hitlstack.py); every stack is stopped after
    the test."""
    started = []

    async def make(**kw):
        stack = await start_hitl_stack(e2a_service_factory, **kw)
        started.append(stack)
        return stack

    yield make
    for stack in started:
        pytest_twisted.blockon(defer.ensureDeferred(stack.stop()))
