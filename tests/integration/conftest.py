"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from tests.support.dnsserver import start_dns_server
from tests.support.hitlstack import start_hitl_stack


@pytest.fixture
def dns_zone():
    """A loopback DNS server whose only record is the test sender's SPF policy (example.org
    authorises 127.0.0.1), so mail from the test client verifies without the network. A test
    module that needs more records defines its own ``dns_zone``."""
    records = {"example.org": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]}}
    handle = pytest_twisted.blockon(defer.ensureDeferred(start_dns_server(reactor, records)))
    yield handle
    pytest_twisted.blockon(defer.ensureDeferred(handle.stop()))


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
